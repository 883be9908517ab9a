"""Named regression tests for the crashes the fuzz run (test_fuzz.py) found: each of these inputs
made the server answer 500 (or kill its engine) before it was fixed. Fast, on the fake engine,
except where the crash was in the real engine's own code."""
from __future__ import annotations

import httpx
import pytest
import torch

from loragate.engine.sampler import make_generator
from loragate.gateway import GatewaySettings, create_app
from tests.fake_engine import FakeEngine
from tests.test_gateway import assert_error_shape, make_adapter_dir, running_server


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    root = tmp_path_factory.mktemp("regress")
    engine = FakeEngine(adapters={"alpha": make_adapter_dir(root, "alpha")})
    with running_server(create_app(engine, GatewaySettings(allowed_adapter_dirs=(str(root),)))) as u:
        yield u


def raw_post(url: str, path: str, raw: bytes) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)


def test_lone_surrogate_in_model_name_was_500(url):
    # the 404 message quoted the name, and rendering it as UTF-8 raised
    r = raw_post(url, "/v1/completions", b'{"model": "\\ud800", "prompt": "x"}')
    assert_error_shape(r, 400, "invalid_unicode")


def test_echoed_lone_surrogate_prompt_was_500(url):
    # echo=true copied the prompt into the response, which could not be encoded
    r = raw_post(url, "/v1/completions", b'{"model": "fake-base", "prompt": "\\ud800", "echo": true, "max_tokens": 2}')
    assert_error_shape(r, 400, "invalid_unicode")


def test_lone_surrogate_in_unknown_field_key_is_400(url):
    r = raw_post(url, "/v1/completions", b'{"model": "fake-base", "prompt": "x", "\\udc00": 1}')
    assert_error_shape(r, 400, "invalid_unicode")


def test_nul_byte_in_adapter_path_was_500(url):
    # os.path.realpath raised ValueError("embedded null byte")
    r = raw_post(url, "/v1/adapters", b'{"name": "n", "path": "/tmp/a\\u0000b"}')
    assert_error_shape(r, 400, "invalid_path")


def test_deeply_nested_body_was_500(url):
    # json.loads recursed until RecursionError
    r = raw_post(url, "/v1/completions", b'{"model": "fake-base", "prompt": "x", "extra": '
                 + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_error_shape(r, 400, "json_too_deep")


def test_seed_beyond_64_bits_was_500():
    # torch's manual_seed overflowed ("Overflow when unpacking long long") when the engine added the
    # request; seeds are now taken modulo 2**64, as torch itself does for the in-range ones
    for seed in (10**30, -(10**30), 2**64, -(2**63) - 1):
        draws = torch.rand(4, generator=make_generator(seed, "cpu"))
        assert torch.equal(draws, torch.rand(4, generator=make_generator(seed % 2**64, "cpu")))
    assert torch.equal(torch.rand(4, generator=make_generator(-1, "cpu")),
                       torch.rand(4, generator=make_generator(2**64 - 1, "cpu")))


def test_adapter_deleted_during_submission_was_500(checkpoints):
    """Soak finding: a request that passed the adapter check just before the adapter was deleted
    reached the engine loop, whose add failed, and the client got 500 generation_error; it is the
    404 the client would have got a moment later."""
    import asyncio

    from loragate.engine.async_engine import AsyncEngine
    from loragate.engine.config import EngineConfig
    from loragate.engine.outputs import EngineRequest
    from loragate.engine.sampling_params import SamplingParams
    from loragate.gateway.generation import output_error

    engine = AsyncEngine(EngineConfig(model=str(checkpoints("llama3")), dtype="float32", device="cpu",
                                      kv_cache_memory=8 << 20))
    engine.start_sync()
    try:
        async def submit_for_missing_adapter():
            agen = engine.generate(EngineRequest("race-1", [5, 6, 7], SamplingParams(max_tokens=2), adapter=None))
            real_check, calls = engine.engine.check_request, []

            def check_passes_once(req):  # the submission's check passed, the loop's add does not
                calls.append(req)
                if len(calls) > 1:
                    real_check(req)

            engine.engine.check_request = check_passes_once
            req = EngineRequest("race-2", [5, 6, 7], SamplingParams(max_tokens=2), adapter="gone")
            out = await engine.generate(req).__anext__()  # ...but the loop's add finds no adapter
            await agen.aclose()
            return out

        out = asyncio.run(submit_for_missing_adapter())
        assert out.finished and out.error_kind == "adapter_not_found"
        err = output_error(out)
        assert err.status == 404 and err.code == "model_not_found"
    finally:
        engine.shutdown_sync()


# ---- LoRAX's routes (found once the fuzz run reached them; their errors are LoRAX-shaped) -------

def assert_lorax_error(resp: httpx.Response, status: int, error_type: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
def test_lorax_deeply_nested_body_was_500(url, path):
    # the LoRAX routes decoded bodies with json.loads themselves, which recursed until RecursionError
    r = raw_post(url, path, b'{"inputs": "x", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "nested deeper" in assert_lorax_error(r, 422, "validation")


@pytest.mark.parametrize("raw", [
    # the real tokenizer raised on it (the fake one let it through to a 200)
    b'{"inputs": "\\ud800", "parameters": {"max_new_tokens": 2}}',
    b'{"inputs": "\\ud800", "parameters": {"max_new_tokens": 2, "return_full_text": true}}',  # echoed
    b'{"inputs": "x", "parameters": {"adapter_id": "\\udfff"}}',  # quoted by the 424's message
])
def test_lorax_lone_surrogates_were_500(url, raw):
    # a string that cannot be encoded as UTF-8 reached the tokenizer, the response or the error;
    # now refused before parsing, as on the OpenAI routes
    r = raw_post(url, "/generate", raw)
    assert "surrogate" in assert_lorax_error(r, 422, "validation")
