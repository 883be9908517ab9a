"""Drop-in for LoRAX and vLLM users, on the real server (uvicorn + gateway + AsyncEngine on a tiny
checkpoint): LoRAX's native API driven by the real `lorax-client` (Client and AsyncClient:
generate, generate_stream, details, alternatives, best_of, merged adapters, hub and s3 adapter
sources, errors and per-key scoping), and vLLM's adapter and tokenizer endpoints over plain HTTP
as vLLM's docs show them. Fault injection (429, a failure mid-stream, a dead engine) uses the
fake engine."""
from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

import lorax_fixtures as fx
from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter
from tests.fake_engine import FakeEngine
from tests.test_gateway import running_server, switched

lorax = pytest.importorskip("lorax")
from lorax.errors import GenerationError, ValidationError  # noqa: E402

ADMIN, KEY_A, KEY_HUB = "sk-admin", "sk-acme", "sk-hub"
LIMIT = 256 << 10  # download limit: the test adapters are ~10 KiB
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def env(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("lorax-adapters")
    adapters = {f"tenant{i}": build_adapter(base, root / f"tenant{i}", rank=4, alpha=8, targets=t, seed=40 + i)
                for i, t in enumerate([("q_proj", "v_proj"), ("q_proj", "v_proj", "o_proj"), ("gate_proj", "down_proj")])}
    hf_cache = tmp_path_factory.mktemp("hf-cache")
    fx.lay_out_hf_cache(hf_cache, "acme/support-bot", adapters["tenant1"])
    dl_cache = tmp_path_factory.mktemp("downloads")
    with fx.moto_s3() as (s3_url, s3):
        s3.create_bucket(Bucket="adapters")
        fx.upload_adapter(s3, "adapters", "team/tenant2", adapters["tenant2"])
        fx.upload_adapter(s3, "adapters", "huge", adapters["tenant2"], pad_to=LIMIT + 1)
        s3.put_object(Bucket="adapters", Key="only-config/adapter_config.json", Body=b"{}")
        cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                           adapter_dir=str(root), max_loras=4, max_lora_rank=8, kv_cache_memory=16 << 20,
                           block_size=8, max_num_seqs=32, max_model_len=256,
                           adapter_sources=("local", "hub", "s3"), hf_cache_dir=str(hf_cache),
                           adapter_cache_dir=str(dl_cache), max_adapter_download_bytes=LIMIT,
                           adapter_download_timeout=30, s3_endpoint_url=s3_url)
        engine = AsyncEngine(cfg)
        settings = GatewaySettings(api_keys=(ADMIN,), api_keys_file={"keys": [
            {"key": KEY_A, "tenant": "acme", "adapters": ["tenant0"]},
            {"key": KEY_HUB, "tenant": "hubby", "adapters": ["tenant0"], "sources": ["hub"]},
        ]}, allowed_adapter_dirs=(str(root),))
        with running_server(create_app(engine, settings)) as url:
            yield {"url": url, "engine": engine, "adapters": adapters, "s3": s3, "downloads": dl_cache, "root": root}


def client(env, key=ADMIN):
    return lorax.Client(env["url"], headers={"Authorization": f"Bearer {key}"}, timeout=60)


def oai(env, key=ADMIN):
    return openai.OpenAI(base_url=env["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy_text(env, model, prompt=PROMPT, n=8, **extra):
    return oai(env).completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True, **extra}).choices[0].text


def test_generate_with_details_matches_openai_route(env):
    tok = env["engine"].tokenizer
    r = client(env).generate(PROMPT, adapter_id="tenant0", max_new_tokens=8, ignore_eos_token=True, details=True)
    assert r.generated_text == greedy_text(env, "tenant0")
    d = r.details
    assert d.finish_reason == "length" and d.generated_tokens == 8 == len(d.tokens)
    assert d.prompt_tokens == len(tok.encode(PROMPT)) and d.seed is None and d.prefill == []
    assert "".join(t.text for t in d.tokens if not t.special) == r.generated_text
    assert all(t.logprob <= 0 and t.alternative_tokens is None for t in d.tokens)
    assert r.generated_text != client(env).generate(PROMPT, max_new_tokens=8, ignore_eos_token=True).generated_text


def hf_logprobs(base, adapter, ids):
    """transformers' (PEFT's) log_softmax over the prompt, [len(ids), vocab], fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return torch.log_softmax(model.eval()(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("adapter", [None, "tenant0"])
def test_decoder_input_details_prefill_matches_transformers(env, checkpoints, adapter):
    """`details.prefill`: every prompt token, its own text, its logprob given the tokens before it
    (null for the first), as transformers (PEFT for an adapter) computes it; the tokens generated
    are the ones a request without it gets."""
    tok = env["engine"].tokenizer
    ids = tok.encode(PROMPT)
    kw = dict(adapter_id=adapter, max_new_tokens=4, ignore_eos_token=True, details=True)
    r = client(env).generate(PROMPT, decoder_input_details=True, **kw)
    prefill = r.details.prefill
    assert [t.id for t in prefill] == ids and len(ids) > 2
    assert [t.text for t in prefill] == [tok.decode([i], skip_special_tokens=False) for i in ids]
    assert prefill[0].logprob is None
    ref = hf_logprobs(checkpoints("llama3"), env["adapters"][adapter] if adapter else None, ids)
    for i in range(1, len(ids)):
        assert prefill[i].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
    plain = client(env).generate(PROMPT, **kw)
    assert plain.details.prefill == [] and plain.generated_text == r.generated_text
    assert [t.logprob for t in plain.details.tokens] == pytest.approx([t.logprob for t in r.details.tokens], abs=1e-5)


def test_decoder_input_details_with_best_of_and_stream(env):
    """best_of: every sequence reports the one prompt's prefill; the stream refuses it (422, as LoRAX;
    `lorax-client`'s generate_stream never asks for it)."""
    r = client(env).generate(PROMPT, max_new_tokens=3, best_of=2, do_sample=True, details=True,
                             decoder_input_details=True)
    first = r.details.prefill
    assert len(first) == len(env["engine"].tokenizer.encode(PROMPT)) and first[0].logprob is None
    assert [s.prefill for s in r.details.best_of_sequences] == [first]
    body = {"inputs": PROMPT, "parameters": {"decoder_input_details": True, "details": True}}
    raw = httpx.post(env["url"] + "/generate_stream", json=body, headers={"Authorization": f"Bearer {ADMIN}"},
                     timeout=30)
    assert raw.status_code == 422 and "decoder_input_details" in raw.json()["error"]


def test_openai_completions_echo_with_logprobs(env, checkpoints):
    """`echo` with `logprobs` on /v1/completions (the openai SDK): the prompt's tokens come first
    in `logprobs`, the first with null logprob and top_logprobs, the rest as transformers computes
    them; then the generated tokens as without echo. The stream sends the same in its chunks."""
    tok = env["engine"].tokenizer
    ids = tok.encode(PROMPT)
    ref = hf_logprobs(checkpoints("llama3"), None, ids)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    e = oai(env).completions.create(echo=True, **kw).choices[0]
    plain = oai(env).completions.create(**kw).choices[0]
    lp = e.logprobs
    assert e.text == PROMPT + plain.text
    assert lp.tokens == [tok.token_text(i) for i in ids] + plain.logprobs.tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
        best = ref[i - 1].topk(2)
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert lp.token_logprobs[len(ids):] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[0] == 0 and lp.text_offset[len(ids):] == [o + len(PROMPT) for o in plain.logprobs.text_offset]
    chunks = list(oai(env).completions.create(echo=True, stream=True, **kw))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert "".join(ch.text for c in chunks for ch in c.choices) == e.text
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_generate_endpoint_and_stream_endpoint_directly(env):
    """/generate answers one object; /generate_stream one `data:` event per token."""
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "tenant1", "max_new_tokens": 5, "details": True,
                                             "ignore_eos_token": True}}
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}) as h:
        one = h.post(env["url"] + "/generate", json=body).json()
        assert one["generated_text"] == greedy_text(env, "tenant1", n=5)
        assert one["details"]["finish_reason"] == "length" and len(one["details"]["tokens"]) == 5
        raw = h.post(env["url"] + "/generate_stream", json=body).text
    events = [e for e in raw.split("\n\n") if e]
    assert len(events) == 5 and all(e.startswith("data:") for e in events)


def test_stream_sync_and_async_equal_generate(env):
    kw = dict(adapter_id="tenant2", max_new_tokens=10, ignore_eos_token=True)
    full = client(env).generate(PROMPT, **kw)
    events = list(client(env).generate_stream(PROMPT, **kw))
    assert len(events) == 10
    assert "".join(e.token.text for e in events if not e.token.special) == full.generated_text
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == full.generated_text
    assert events[-1].details.finish_reason == "length" and events[-1].details.generated_tokens == 10

    async def both():
        ac = lorax.AsyncClient(env["url"], headers={"Authorization": f"Bearer {ADMIN}"}, timeout=2)
        one = await ac.generate(PROMPT, **kw)
        streamed = [e async for e in ac.generate_stream(PROMPT, **kw)]
        return one, streamed

    one, streamed = asyncio.run(both())
    assert one.generated_text == full.generated_text
    assert [e.token.id for e in streamed] == [e.token.id for e in events]


def test_eos_and_stop_sequence_finish_reasons(env):
    c = client(env)
    text = c.generate(PROMPT, adapter_id="tenant0", max_new_tokens=12, ignore_eos_token=True).generated_text
    stop = text[3:6]
    r = c.generate(PROMPT, adapter_id="tenant0", max_new_tokens=12, ignore_eos_token=True, stop_sequences=[stop])
    assert r.details.finish_reason == "stop_sequence" and stop not in r.generated_text
    assert text.startswith(r.generated_text)
    eos = env["engine"].tokenizer.eos_token_ids
    natural = c.generate("hello world", max_new_tokens=200)
    if natural.details.finish_reason == "eos_token":  # a tiny random model may never say </s>
        assert natural.details.tokens[-1].id in eos and natural.details.tokens[-1].special


def test_alternatives_are_top_k_and_include_the_greedy_choice(env):
    r = client(env).generate(PROMPT, adapter_id="tenant1", max_new_tokens=4, return_k_alternatives=3)
    for t in r.details.tokens:
        alts = t.alternative_tokens
        assert len(alts) == 3 and [a.logprob for a in alts] == sorted((a.logprob for a in alts), reverse=True)
        assert alts[0].id == t.id and abs(alts[0].logprob - t.logprob) < 1e-5


def test_sampling_seed_best_of_and_full_text(env):
    c = client(env)
    kw = dict(adapter_id="tenant0", max_new_tokens=10, do_sample=True, temperature=1.5, ignore_eos_token=True)
    a, b = c.generate(PROMPT, seed=7, **kw), c.generate(PROMPT, seed=7, **kw)
    assert a.generated_text == b.generated_text and a.details.seed == 7
    unseeded = c.generate(PROMPT, **kw)
    assert isinstance(unseeded.details.seed, int)  # LoRAX reports the seed it drew
    best = c.generate(PROMPT, best_of=3, **kw)
    seqs = best.details.best_of_sequences
    assert len(seqs) == 2

    def mean(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert all(mean(best.details.tokens) >= mean(s.tokens) for s in seqs)
    full = c.generate(PROMPT, adapter_id="tenant0", max_new_tokens=4, return_full_text=True)
    assert full.generated_text.startswith(PROMPT) and full.generated_text[len(PROMPT):] == greedy_text(
        env, "tenant0", n=4, ignore_eos=False)
    typical = c.generate(PROMPT, adapter_id="tenant0", max_new_tokens=6, typical_p=0.5, seed=3)
    assert typical.details.generated_tokens >= 1


def test_merged_adapters_lorax_and_openai_agree(env):
    merged = lorax.MergedAdapters(ids=["tenant0", "tenant1"], weights=[0.6, 0.6], merge_strategy="ties",
                                  density=0.5, majority_sign_method="total")
    r = client(env).generate(PROMPT, merged_adapters=merged, max_new_tokens=8, ignore_eos_token=True)
    spec = {"ids": ["tenant0", "tenant1"], "weights": [0.6, 0.6], "merge_strategy": "ties", "density": 0.5}
    assert r.generated_text == greedy_text(env, "tiny", merged_adapters=spec)
    assert r.generated_text not in (greedy_text(env, "tenant0"), greedy_text(env, "tenant1"))
    with pytest.raises(ValidationError, match="density"):
        client(env).generate(PROMPT, merged_adapters=lorax.MergedAdapters(
            ids=["tenant0", "tenant1"], weights=[1, 1], merge_strategy="dare_linear", density=0.0))


def test_scoping_and_auth(env):
    a = client(env, KEY_A)
    assert a.generate(PROMPT, adapter_id="tenant0", max_new_tokens=2).generated_text is not None
    with pytest.raises(GenerationError, match="does not exist or you do not have access") as unknown:
        a.generate(PROMPT, adapter_id="no-such-adapter", max_new_tokens=2)
    with pytest.raises(GenerationError) as hidden:
        a.generate(PROMPT, adapter_id="tenant1", max_new_tokens=2)
    assert str(hidden.value).replace("tenant1", "X") == str(unknown.value).replace("no-such-adapter", "X")
    merged = lorax.MergedAdapters(ids=["tenant0", "tenant1"], weights=[1, 1], density=1.0)
    with pytest.raises(GenerationError):  # a merge needs every part allowed
        a.generate(PROMPT, merged_adapters=merged, max_new_tokens=2)
    r = httpx.post(env["url"] + "/generate", json={"inputs": PROMPT}, timeout=30)
    assert r.status_code == 401 and set(r.json()) == {"error", "error_type"}
    with pytest.raises(lorax.errors.ShardNotReadyError, match="may not use adapters"):  # 403: needs an allowance
        a.generate(PROMPT, adapter_id="acme/support-bot", adapter_source="hub", max_new_tokens=2)


@pytest.mark.parametrize("params, field", [
    ({"watermark": True}, "watermark"),
    ({"top_k": 0}, "top_k"),
    ({"typical_p": 1.0}, "typical_p"),
    ({"temperature": -1}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"best_of": 2}, "sampling"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "seed"),
    ({"return_k_alternatives": 99}, "return_k_alternatives"),
    ({"adapter_id": "tenant0", "merged_adapters": {"ids": ["tenant0"], "weights": [1]}}, "merged_adapters"),
    ({"merged_adapters": {"ids": ["tenant0", "tenant1"], "weights": [1]}}, "weights"),
    ({"merged_adapters": {"ids": ["tenant0"], "weights": [1], "merge_strategy": "svd"}}, "merge_strategy"),
    ({"adapter_id": "tenant0", "adapter_source": "pbase"}, "adapter_source"),
    ({"adapter_id": "not a repo/x y", "adapter_source": "hub"}, "repo id"),
    ({"max_new_tokens": 1000}, "context length"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_object", "schema": {"type": 5}}}, "response_format"),
])
def test_validation_errors_are_422_naming_the_field(env, params, field):
    r = httpx.post(env["url"] + "/generate", json={"inputs": PROMPT, "parameters": params},
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and field in r.json()["error"]


def test_stream_validation_and_empty_inputs(env):
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(env["url"] + "/generate_stream", json={"inputs": PROMPT, "parameters": {
        "best_of": 2, "do_sample": True}}, headers=h, timeout=30)
    assert r.status_code == 422 and "stream" in r.json()["error"]
    r = httpx.post(env["url"] + "/", json={"inputs": "", "stream": False}, headers=h, timeout=30)
    assert r.status_code == 422 and "inputs" in r.json()["error"]
    r = httpx.post(env["url"] + "/generate", content=b"{not json", headers=h, timeout=30)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


# ---- adapter sources --------------------------------------------------------------------------

def test_hub_adapter_from_the_offline_cache(env):
    """`acme/support-bot` is tenant1's files in a Hugging Face cache: same tokens as tenant1."""
    r = client(env).generate(PROMPT, adapter_id="acme/support-bot", adapter_source="hub", max_new_tokens=8,
                             ignore_eos_token=True)
    assert r.generated_text == greedy_text(env, "tenant1")
    # the key with a hub allowance (and LoRAX's default source for org/name ids)
    assert client(env, KEY_HUB).generate(PROMPT, adapter_id="acme/support-bot", max_new_tokens=8,
                                         ignore_eos_token=True).generated_text == r.generated_text
    # the OpenAI routes take the same source as an extra field
    assert greedy_text(env, "acme/support-bot", adapter_source="hub") == r.generated_text
    with pytest.raises(GenerationError, match="not in the local Hugging Face cache"):
        client(env).generate(PROMPT, adapter_id="acme/missing", adapter_source="hub", max_new_tokens=2)
    with pytest.raises(openai.BadRequestError, match="acme/missing"):
        greedy_text(env, "acme/missing", adapter_source="hub")


def test_s3_adapter_downloads_once_for_concurrent_requests(env, monkeypatch):
    import loragate.engine.adapters.virtual as virtual

    calls: list[str] = []
    real = virtual.fetch_s3

    def counting(url, settings):
        calls.append(url)
        return real(url, settings)

    monkeypatch.setattr(virtual, "fetch_s3", counting)
    url = "s3://adapters/team/tenant2"

    def one(out, i):
        out[i] = client(env).generate(PROMPT, adapter_id=url, adapter_source="s3", max_new_tokens=8,
                                      ignore_eos_token=True).generated_text

    results: dict[int, str] = {}
    threads = [threading.Thread(target=one, args=(results, i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and set(results.values()) == {greedy_text(env, "tenant2")}
    assert calls == [url]
    assert fx.leftovers(env["downloads"]) == []


def test_s3_failures_are_424_and_leave_no_partial_files(env):
    c = client(env)
    with pytest.raises(GenerationError, match="above the adapter download limit"):
        c.generate(PROMPT, adapter_id="s3://adapters/huge", adapter_source="s3", max_new_tokens=2)
    with pytest.raises(GenerationError, match="has no adapter_model.safetensors"):
        c.generate(PROMPT, adapter_id="s3://adapters/only-config", adapter_source="s3", max_new_tokens=2)
    with pytest.raises(GenerationError, match="could not be fetched"):
        c.generate(PROMPT, adapter_id="s3://no-such-bucket/x", adapter_source="s3", max_new_tokens=2)
    assert fx.leftovers(env["downloads"]) == []
    with pytest.raises(openai.BadRequestError) as e:  # the OpenAI routes name the adapter
        greedy_text(env, "s3://adapters/huge", adapter_source="s3")
    assert e.value.body["code"] == "adapter_load_error" and "s3://adapters/huge" in e.value.body["message"]
    # the server is fine afterwards
    assert c.generate(PROMPT, adapter_id="tenant0", max_new_tokens=2).generated_text is not None


def test_s3_download_streaming_guard_and_etag_reuse(tmp_path, env):
    """The size limit also holds while bytes arrive (a listing can be stale), and an unchanged
    adapter is not downloaded again."""
    from loragate.engine.adapters.sources import SourceSettings, fetch_s3, s3_cache_path
    from loragate.engine.errors import AdapterLoadError

    settings = SourceSettings(("local", "s3"), str(tmp_path), None, LIMIT, 30, env["engine"].config.s3_endpoint_url)
    path = fetch_s3("s3://adapters/team/tenant2", settings)
    stamp = (path / "adapter_model.safetensors").stat().st_mtime_ns
    assert fetch_s3("s3://adapters/team/tenant2", settings) == path
    assert (path / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    tiny = SourceSettings(("local", "s3"), str(tmp_path / "t"), None, LIMIT, 30, settings.s3_endpoint_url)
    real_list = None

    def shrunk_listing(client, **kw):  # the listing claims small objects; the bytes say otherwise
        out = real_list(**kw)
        for o in out.get("Contents", []):
            o["Size"] = 1
        return out

    import boto3

    real_client = boto3.client

    def patched(*a, **kw):
        nonlocal real_list
        c = real_client(*a, **kw)
        real_list = c.list_objects_v2
        c.list_objects_v2 = lambda **kw2: shrunk_listing(c, **kw2)
        return c

    boto3.client = patched
    try:
        with pytest.raises(AdapterLoadError, match="above the adapter download limit"):
            fetch_s3("s3://adapters/huge", tiny)
    finally:
        boto3.client = real_client
    assert fx.leftovers(tmp_path) == [] and not s3_cache_path("s3://adapters/huge", tiny).exists()


# ---- LoRAX errors the real engine cannot be made to produce on demand ------------------------------

@pytest.fixture(scope="module")
def fake_env():
    engine = FakeEngine(model_name="fake-base", max_model_len=256)
    with running_server(create_app(engine, GatewaySettings())) as url:
        yield url, engine


def test_overloaded_is_429_and_dead_engine_503(fake_env):
    url, engine = fake_env
    with switched(engine, queue_full=True):
        with pytest.raises(lorax.errors.OverloadedError):
            lorax.Client(url).generate("hi", max_new_tokens=3)
        r = httpx.post(url + "/generate", json={"inputs": "hi"}, timeout=30)
        assert r.status_code == 429 and r.json()["error_type"] == "overloaded" and "retry-after" in r.headers
    with switched(engine, dead=True):
        r = httpx.post(url + "/", json={"inputs": "hi", "stream": True}, timeout=30)
        assert r.status_code == 503 and set(r.json()) == {"error", "error_type"}


def test_failure_mid_stream_is_an_error_event(fake_env):
    url, engine = fake_env
    with switched(engine, fail_after=2):
        with pytest.raises(GenerationError):
            list(lorax.Client(url).generate_stream("hello", max_new_tokens=20))
        with pytest.raises(GenerationError):  # before the response starts: a 424
            lorax.Client(url).generate("hello", max_new_tokens=20)
    assert engine.running == set()


def test_errors_before_routing_and_unexpected_ones_are_lorax_shaped(fake_env):
    """A body over the size limit is refused before routing (413), and an unexpected exception is
    a 500: on LoRAX's routes both in LoRAX's shape, so lorax-client raises its own errors."""
    url, engine = fake_env
    app = create_app(FakeEngine(model_name="fake-base"), GatewaySettings(max_request_bytes=4096))
    with running_server(app) as small:
        big = {"inputs": "x" * 8000}
        for path in ("/generate", "/generate_stream", "/"):
            r = httpx.post(small + path, json=big, timeout=30)  # declared Content-Length
            assert r.status_code == 413 and r.json()["error_type"] == "validation", r.text
        r = httpx.post(small + "/v1/completions", json={"model": "fake-base", "prompt": "x" * 8000}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        with pytest.raises(ValidationError):
            lorax.Client(small).generate("x" * 8000)

    def broken(*_, **__):
        raise RuntimeError("a bug")

    with switched(engine.tokenizer, encode=broken):
        r = httpx.post(url + "/generate", json={"inputs": "hi"}, timeout=30)
        assert r.status_code == 500 and r.json() == {"error": "internal server error",
                                                     "error_type": "incomplete_generation"}
        with pytest.raises(lorax.errors.IncompleteGenerationError):
            lorax.Client(url).generate("hi")


def test_remote_sources_are_off_unless_enabled(fake_env):
    url, _ = fake_env
    r = httpx.post(url + "/generate", json={"inputs": "hi", "parameters": {
        "adapter_id": "acme/bot", "adapter_source": "hub"}}, timeout=30)
    assert r.status_code == 422 and "--adapter-source" in r.json()["error"]
    r = httpx.post(url + "/v1/completions", json={"model": "acme/bot", "prompt": "hi", "adapter_source": "s3"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_source"


LORAX_SCHEMA = {"type": "object", "properties": {
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "tag": {"enum": ["red", "green", "blue"]},
    "word": {"type": "string", "maxLength": 6, "pattern": "^[a-z]*$"},
}, "required": ["n", "ok", "tag", "word"], "additionalProperties": False}


@pytest.mark.parametrize("adapter_id", [None, "tenant0", "tenant2"])
def test_response_format_maps_to_structured_output(env, adapter_id):
    """LoRAX's response_format ({"type": "json_object", "schema"}) constrains the output to the
    schema through the real lorax-client, greedy and sampled, on the base and on adapters; a stream
    reassembles to the same text."""
    import json as _json

    import jsonschema

    c = client(env)
    fmt = {"type": "json_object", "schema": LORAX_SCHEMA}
    r = c.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=120, response_format=fmt, details=True)
    jsonschema.validate(_json.loads(r.generated_text), LORAX_SCHEMA)
    assert r.details.finish_reason == "eos_token"
    streamed = "".join(t.token.text for t in c.generate_stream(PROMPT, adapter_id=adapter_id, max_new_tokens=120,
                                                               response_format=fmt) if not t.token.special)
    assert streamed == r.generated_text
    for seed in (1, 2, 3):
        s = c.generate(PROMPT, adapter_id=adapter_id, max_new_tokens=120, response_format=fmt, do_sample=True,
                       temperature=1.0, seed=seed)
        jsonschema.validate(_json.loads(s.generated_text), LORAX_SCHEMA)


def test_response_format_json_object_without_schema_is_any_object(env):
    import json as _json

    r = httpx.post(env["url"] + "/generate", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 40, "details": True,
                                         "response_format": {"type": "json_object"}}})
    assert r.status_code == 200, r.text
    text = r.json()["generated_text"]
    assert text.lstrip().startswith("{")
    if r.json()["details"]["finish_reason"] == "eos_token":  # else cut at max_new_tokens: a prefix of one
        assert isinstance(_json.loads(text), dict)


def test_response_format_that_cannot_compile_is_422(env):
    """A schema jsonschema accepts but the grammar compiler refuses (a look-around pattern) is a
    validation error before any engine work, through the client too."""
    bad = {"type": "object", "properties": {"s": {"type": "string", "pattern": "(?=a)b"}}, "required": ["s"]}
    r = httpx.post(env["url"] + "/generate", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 8, "response_format": {"type": "json_object",
                                                                                     "schema": bad}}})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and "response_format" in r.json()["error"]
    with pytest.raises(ValidationError):
        client(env).generate(PROMPT, max_new_tokens=8, response_format={"type": "json_object", "schema": bad})


# ---- vLLM's endpoints ---------------------------------------------------------------------------------

def test_vllm_tokenize_detokenize(env):
    tok = env["engine"].tokenizer
    h = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=env["url"], headers=h, timeout=30) as c:
        r = c.post("/tokenize", json={"model": "tiny", "prompt": "hello world", "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == 256 and r["token_strs"] == [tok.token_text(t) for t in r["tokens"]]
        plain = c.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
        assert plain["tokens"] == tok.encode("hello world", add_special_tokens=False) and plain["token_strs"] is None
        msgs = [{"role": "user", "content": "hi there"}]
        chat = c.post("/tokenize", json={"model": "tenant0", "messages": msgs}).json()
        assert chat["tokens"] == tok.encode_chat(msgs, add_generation_prompt=True)
        back = c.post("/detokenize", json={"model": "tiny", "tokens": plain["tokens"]}).json()
        assert back == {"prompt": "hello world"}
        assert c.post("/detokenize", json={"tokens": [10 ** 9]}).status_code == 400
        assert c.post("/tokenize", json={"model": "tiny"}).status_code == 400
    a = httpx.post(env["url"] + "/tokenize", json={"model": "tenant1", "prompt": "x"},
                   headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    assert a.status_code == 404  # the key may not see tenant1: the same 404 as an unknown name


def test_vllm_load_and_unload_lora_adapter(env, tmp_path_factory):
    url, root = env["url"], env["root"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    fx.copy_adapter(env["adapters"]["tenant2"], root / "uploaded" / "v2")
    body = {"lora_name": "fresh", "lora_path": str(root / "uploaded" / "v2")}
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 403
    outside = tmp_path_factory.mktemp("outside")
    fx.copy_adapter(env["adapters"]["tenant2"], outside / "x")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "evil", "lora_path": str(outside / "x")},
                   headers=admin)
    assert r.status_code == 403
    r = httpx.post(url + "/v1/load_lora_adapter", json=body, headers=admin, timeout=30)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'fresh' added successfully."
    assert greedy_text(env, "fresh") == greedy_text(env, "tenant2")
    assert httpx.post(url + "/v1/load_lora_adapter", json=body, headers=admin).status_code == 400
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=admin, timeout=30)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'fresh' removed successfully."
    with pytest.raises(openai.NotFoundError):
        greedy_text(env, "fresh")
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "fresh"}, headers=admin)
    assert r.status_code == 404


def test_full_waiting_queue_is_lorax_overloaded():
    """`--max-waiting` answers 503 on the OpenAI routes; LoRAX's clients expect 429 `overloaded`
    for a full queue (lorax-client raises OverloadedError for it)."""
    from loragate.gateway.errors import APIError
    from loragate.gateway.lorax_protocol import error_status

    assert error_status(APIError(503, "x", code="server_overloaded")) == (429, "overloaded")
    assert error_status(APIError(503, "x", code="engine_dead")) == (503, "unhealthy")
