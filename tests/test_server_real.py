"""The real server end to end: uvicorn + gateway + AsyncEngine on a tiny random checkpoint with
eight PEFT adapters, driven by the openai SDK, LangChain and curl. (Fault injection that needs a
fake engine lives in test_gateway.py.)"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.test_gateway import running_server, wait_for

ADMIN, KEY_A = "sk-admin", "sk-acme"
N_ADAPTERS = 8


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("real-adapters")
    targets = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj"), ("k_proj", "up_proj")]
    adapters = {}
    for i in range(N_ADAPTERS):
        name = f"tenant{i}"
        adapters[name] = build_adapter(base, root / name, rank=2 + 2 * (i % 4), alpha=8,
                                       targets=targets[i % 4], seed=100 + i)
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=str(root), max_loras=4, max_lora_rank=8, kv_cache_memory=16 << 20,
                       block_size=8, max_num_seqs=32, max_model_len=256)
    engine = AsyncEngine(cfg)
    settings = GatewaySettings(
        api_keys=(ADMIN,),
        api_keys_file={"keys": [{"key": KEY_A, "tenant": "acme", "adapters": ["tenant0"]}]},
        allowed_adapter_dirs=(str(root),),
    )
    with running_server(create_app(engine, settings)) as url:
        yield {"url": url, "engine": engine, "adapters": adapters}


def client(url, key=ADMIN):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat_kwargs(model, text, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return dict(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_lists_base_and_adapters(server):
    models = client(server["url"]).models.list().data
    ids = {m.id for m in models}
    assert {"tiny", *server["adapters"]} <= ids
    assert all(getattr(m, "parent", None) == "tiny" for m in models if m.id != "tiny")


def test_chat_completion_and_usage(server):
    engine = server["engine"]
    r = client(server["url"]).chat.completions.create(**chat_kwargs("tenant1", "hello world", logprobs=True,
                                                                     top_logprobs=3))
    prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": "hello world"}])
    assert r.model == "tenant1"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)


def test_adapter_changes_output_and_base_colon_syntax(server):
    c = client(server["url"])
    texts = {m: c.completions.create(model=m, prompt="the quick brown fox", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
             for m in ("tiny", "tenant0", "tiny:tenant0", "tenant2")}
    assert texts["tenant0"] == texts["tiny:tenant0"]
    assert len({texts["tiny"], texts["tenant0"], texts["tenant2"]}) == 3


def test_streaming_with_usage_equals_non_streamed(server):
    c = client(server["url"])
    kw = chat_kwargs("tenant3", "stream me please", max_tokens=16)
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 1


def test_32_concurrent_streams_over_8_adapters_match_greedy(server):
    url = server["url"]
    names = list(server["adapters"])
    prompts = [(names[i % N_ADAPTERS], f"request {i} about cache and kernels") for i in range(32)]
    c = client(url)
    expected = [c.completions.create(model=m, prompt=p, max_tokens=10, temperature=0).choices[0].text
                for m, p in prompts]

    async def stream_one(ac, model, prompt):
        text = ""
        async for ch in await ac.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                    stream=True):
            text += ch.choices[0].text if ch.choices else ""
        return text

    async def main():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=120)
        return await asyncio.gather(*(stream_one(ac, m, p) for m, p in prompts))

    got = asyncio.run(main())
    assert got == expected
    stats = {s.name: s for s in server["engine"].list_adapters()}
    assert all(stats[n].requests_served >= 8 for n in names)


def test_disconnect_mid_stream_frees_everything(server):
    engine = server["engine"]
    body = chat_kwargs("tenant5", "a long answer", max_tokens=200)
    body.update(stream=True, ignore_eos=True)
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= 3:
                    break
    wait_for(lambda: (s := engine.stats()).running == 0 and s.waiting == 0 and s.kv_blocks_used == 0,
             timeout=20, what="engine counters back to zero")


def test_per_key_isolation(server):
    a = client(server["url"], KEY_A)
    ids = {m.id for m in a.models.list().data}
    assert "tenant0" in ids and "tenant1" not in ids
    with pytest.raises(openai.NotFoundError) as e:
        a.chat.completions.create(**chat_kwargs("tenant1", "hi"))
    assert e.value.body["code"] == "model_not_found"
    assert a.chat.completions.create(**chat_kwargs("tenant0", "hi", max_tokens=2)).choices


def test_errors_from_the_real_engine(server):
    c = client(server["url"])
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt="x " * 300, max_tokens=10)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        client(server["url"], "sk-wrong").models.list()


def test_langchain_invoke_stream_batch(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tenant4", base_url=server["url"] + "/v1", api_key=ADMIN, temperature=0,
                     max_tokens=8, max_retries=0, stream_usage=True)
    one = llm.invoke("hello there")
    streamed = list(llm.stream("hello there"))
    assert "".join(ch.content for ch in streamed) == one.content
    assert any(ch.usage_metadata for ch in streamed)
    assert [m.content for m in llm.batch(["hello there", "hello there"])] == [one.content, one.content]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_streaming(server):
    body = json.dumps(chat_kwargs("tenant6", "curl me", max_tokens=5) | {"stream": True})
    out = subprocess.run(["curl", "-sN", server["url"] + "/v1/chat/completions", "-H", f"Authorization: Bearer {ADMIN}",
                          "-H", "Content-Type: application/json", "-d", body], capture_output=True, text=True,
                         timeout=60).stdout
    events = [e for e in out.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_disconnect_during_non_streaming_request_aborts_it(server):
    engine = server["engine"]
    aborted: list[str] = []
    original = engine.abort

    def spy(request_id):
        aborted.append(request_id)
        original(request_id)

    engine.abort = spy
    inner_step = engine.engine.step

    def slow_step():  # pace generation (230 steps >= 4.6 s) so it cannot finish before the client leaves
        time.sleep(0.02)
        return inner_step()

    engine.engine.step = slow_step
    try:
        body = chat_kwargs("tenant7", "a long answer", max_tokens=230) | {"ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.3),
                       headers={"Authorization": f"Bearer {ADMIN}"})
        wait_for(lambda: aborted, timeout=20, what="the engine request to be aborted")
        wait_for(lambda: (s := engine.stats()).running == 0 and s.kv_blocks_used == 0, timeout=20,
                 what="engine counters back to zero")
    finally:
        engine.abort = original
        engine.engine.step = inner_step
