"""Prefix caching through the real server: `usage.prompt_tokens_details.cached_tokens` exact in the
openai SDK (chat, completions, streamed usage, n > 1), the /metrics series, the admin API's
delete-and-re-register never reusing the old adapter's blocks, and the CLI flag."""
from __future__ import annotations

import re
import uuid

import httpx
import openai
import pytest

from loragate.cli import build_configs, build_parser
from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.test_gateway import running_server

ADMIN = "sk-admin"
BLOCK = 8
SYSTEM = ("You are the support assistant of a small bakery. Answer briefly, politely and only about "
          "bread, cakes, opening hours and orders. ")


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("prefix-server")
    v1 = build_adapter(base, root / "v1", rank=8, targets=("q_proj", "v_proj"), seed=31)
    v2 = build_adapter(base, root / "v2", rank=8, targets=("q_proj", "v_proj"), seed=32)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapters=(("fixed", str(v1)),), max_loras=2, max_lora_rank=8, kv_cache_memory=16 << 20,
                       block_size=BLOCK, max_model_len=256, allowed_adapter_dirs=(str(root),))
    engine = AsyncEngine(cfg)
    settings = GatewaySettings(api_keys=(ADMIN,), allowed_adapter_dirs=(str(root),))
    with running_server(create_app(engine, settings)) as url:
        yield {"url": url, "engine": engine, "v1": str(v1), "v2": str(v2)}


def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)


def messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def aligned(n: int) -> int:
    """What a prompt of n tokens can find cached: whole blocks, its last token excluded."""
    return (n - 1) // BLOCK * BLOCK


def cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_are_exact_in_the_sdk_usage(server):
    c, tok = client(server["url"]), server["engine"].tokenizer
    user = f"when do you open on sunday? ({uuid.uuid4().hex[:6]})"  # a prompt nobody sent before
    kw = dict(model="tiny", messages=messages(user), max_tokens=6, temperature=0)
    first = c.chat.completions.create(**kw)
    n = first.usage.prompt_tokens
    assert n == len(tok.encode_chat(messages(user))) and n > 3 * BLOCK
    assert cached(first.usage) == 0
    again = c.chat.completions.create(**kw)
    assert cached(again.usage) == aligned(n) and again.choices[0].message.content == first.choices[0].message.content
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and cached(chunks[-1].usage) == aligned(n)
    # another user turn after the same system prompt finds the blocks of their common prefix
    other = messages(f"and on monday? ({uuid.uuid4().hex[:6]})")
    ids, other_ids = tok.encode_chat(messages(user)), tok.encode_chat(other)
    common = next(i for i, (a, b) in enumerate(zip(ids, other_ids)) if a != b)
    r = c.chat.completions.create(model="tiny", messages=other, max_tokens=4, temperature=0)
    assert cached(r.usage) == min(common // BLOCK * BLOCK, aligned(len(other_ids))) > 0
    # completions, with token ids as the prompt, and n > 1: prompts counted once each
    cmpl = c.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert cached(cmpl.usage) == aligned(n)
    fresh = tok.encode(f"a brand new prompt {uuid.uuid4().hex} about rye bread and sourdough starters")
    two = c.completions.create(model="tiny", prompt=fresh, max_tokens=3, n=2, temperature=0.8, seed=3)
    assert two.usage.prompt_tokens == len(fresh) and cached(two.usage) == 0  # nothing was cached before it
    two = c.completions.create(model="tiny", prompt=fresh, max_tokens=3, n=2, temperature=0.8, seed=3)
    assert cached(two.usage) == aligned(len(fresh))
    batch = c.completions.create(model="tiny", prompt=[fresh, ids], max_tokens=2, temperature=0)
    assert cached(batch.usage) == aligned(len(fresh)) + aligned(n)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_metrics_count_prefix_cache_queries_hits_and_blocks(server):
    c = client(server["url"])
    kw = dict(model="tiny", messages=messages(f"any gluten free cakes? ({uuid.uuid4().hex[:6]})"), max_tokens=2,
              temperature=0)
    c.chat.completions.create(**kw)
    before = httpx.get(server["url"] + "/metrics").text
    r = c.chat.completions.create(**kw)
    after = httpx.get(server["url"] + "/metrics").text
    assert metric(after, "loragate_prefix_cache_queries_total") - metric(before, "loragate_prefix_cache_queries_total") \
        == r.usage.prompt_tokens
    assert metric(after, "loragate_prefix_cache_hits_total") - metric(before, "loragate_prefix_cache_hits_total") \
        == cached(r.usage) > 0
    assert metric(after, "loragate_prefix_cache_blocks") >= cached(r.usage) // BLOCK


def test_delete_and_reregister_through_the_admin_api_never_reuses_old_blocks(server):
    url, c = server["url"], client(server["url"])
    admin = {"Authorization": f"Bearer {ADMIN}"}
    kw = dict(model="swap", messages=messages(f"do you deliver? ({uuid.uuid4().hex[:6]})"), max_tokens=8,
              temperature=0, extra_body={"ignore_eos": True})

    def register(path: str) -> None:
        r = httpx.post(url + "/v1/adapters", json={"name": "swap", "path": path}, headers=admin, timeout=30)
        assert r.status_code == 200, r.text

    register(server["v1"])
    one = c.chat.completions.create(**kw)
    n = one.usage.prompt_tokens
    assert cached(one.usage) == 0
    assert cached(c.chat.completions.create(**kw).usage) == aligned(n)
    assert httpx.delete(url + "/v1/adapters/swap", headers=admin, timeout=30).status_code == 200
    register(server["v2"])
    two = c.chat.completions.create(**kw)
    assert cached(two.usage) == 0  # same name, same tokens, other weights: nothing shared
    assert two.choices[0].message.content != one.choices[0].message.content
    # the cache follows content, not names: "fixed" serves v1's weights and finds swap's old blocks
    same = c.chat.completions.create(**{**kw, "model": "fixed"})
    assert cached(same.usage) == aligned(n) and same.choices[0].message.content == one.choices[0].message.content
    assert httpx.delete(url + "/v1/adapters/swap", headers=admin, timeout=30).status_code == 200


def test_prefix_caching_flag(tmp_path):
    on = build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path)]))
    off = build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path), "--no-enable-prefix-caching"]))
    assert on.engine.enable_prefix_caching is True and off.engine.enable_prefix_caching is False
    assert EngineConfig(model="m").enable_prefix_caching is True
