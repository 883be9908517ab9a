"""Hostile adapter files: every malformed or malicious upload fails with an error that names the
adapter and the cause (never the folder's path), without a crash or an allocation the file dictates,
and a running request on another adapter is not disturbed."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
from pathlib import Path

import httpx
import openai
import pytest
import torch

from loragate.engine.adapters import load_peft_adapter, peft_loader
from loragate.engine.adapters.peft_loader import MAX_CONFIG_BYTES, max_weights_bytes
from loragate.engine.errors import AdapterLoadError
from loragate.testing import build_adapter
from tests.test_adapters import _A0, _B0, MAX_RANK, _copy, _edit_config, _edit_tensors
from tests.test_adapters import adapters, base_dir, base_info  # noqa: F401 - module fixtures

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _raw_safetensors(header: dict | bytes, data: bytes = b"", claimed_len: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if claimed_len is None else claimed_len) + text + data


def _write_weights(raw: bytes):
    def fn(d: Path) -> None:
        (d / WEIGHTS).write_bytes(raw)
    return fn


def _truncate(d: Path) -> None:
    raw = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(raw[:-100])


def _tensor_value(value: float):
    def fn(d: Path) -> None:
        def edit(t: dict) -> dict:
            a = t[_A0].clone()
            a[0, 0] = value
            return {**t, _A0: a}
        _edit_tensors(d, edit)
    return fn


def _int_tensor(d: Path) -> None:
    _edit_tensors(d, lambda t: {**t, _A0: torch.zeros(t[_A0].shape, dtype=torch.int64)})


def _deep_config(d: Path) -> None:
    cfg = json.loads((d / CONFIG).read_text())
    text = json.dumps(cfg)[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (d / CONFIG).write_text(text)


def _huge_config(d: Path) -> None:
    cfg = json.loads((d / CONFIG).read_text())
    cfg["padding"] = "x" * (MAX_CONFIG_BYTES + 10)
    (d / CONFIG).write_text(json.dumps(cfg))


def _symlink_out(fname: str):
    def fn(d: Path) -> None:
        outside = d.parent / f"outside-{fname}"
        shutil.copy(d / fname, outside)
        (d / fname).unlink()
        os.symlink(outside, d / fname)
    return fn


def _dotdot_out(d: Path) -> None:
    outside = d.parent / "elsewhere.safetensors"
    shutil.move(d / WEIGHTS, outside)
    os.symlink(Path("..") / "elsewhere.safetensors", d / WEIGHTS)


def _fifo(d: Path) -> None:
    (d / WEIGHTS).unlink()
    os.mkfifo(d / WEIGHTS)


def _oversized(d: Path) -> None:
    with open(d / WEIGHTS, "r+b") as f:  # sparse: no disk or memory is used
        f.truncate(max_weights_bytes(_BASE_INFO[0], MAX_RANK) + 1)


_BASE_INFO: list = []

HOSTILE = {
    # safetensors files
    "header longer than file": (_write_weights(_raw_safetensors({}, claimed_len=1000)), "only"),
    "absurd header length": (_write_weights(_raw_safetensors(b"{}", claimed_len=1 << 60)), "header"),
    "truncated file": (_truncate, "truncated"),
    "tiny file": (_write_weights(b"\x01\x02"), "truncated"),
    "header not json": (_write_weights(_raw_safetensors(b"{not json")), "not valid JSON"),
    "header not object": (_write_weights(_raw_safetensors(b"[1]")), "not a JSON object"),
    "header deeply nested": (_write_weights(_raw_safetensors(b"[" * 5000 + b"]" * 5000)), "nested deeper"),
    "offsets disagree with shape": (_write_weights(_raw_safetensors(
        {_A0: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 16]}}, b"\x00" * 16)), "do not match"),
    "offsets past the end": (_write_weights(_raw_safetensors(
        {_A0: {"dtype": "F32", "shape": [1 << 20, 1 << 10], "data_offsets": [0, 4 << 30]}}, b"\x00" * 16)),
        "truncated"),
    "negative dimension": (_write_weights(_raw_safetensors(
        {_A0: {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, b"\x00" * 16)), "invalid shape"),
    "overlapping tensors": (_write_weights(_raw_safetensors(
        {_A0: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         _B0: {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12)), "overlap"),
    "integer dtype": (_int_tensor, "dtype 'I64'"),
    "wrong rank of tensor": (lambda d: _edit_tensors(d, lambda t: {**t, _A0: torch.zeros(4, 64, 2)}),
                             "shape mismatch"),
    "nan weight": (_tensor_value(float("nan")), "NaN or infinite"),
    "inf weight": (_tensor_value(float("inf")), "NaN or infinite"),
    "weights larger than any valid adapter": (_oversized, "bytes accepted"),
    "weights are a fifo": (_fifo, "not a regular file"),
    # adapter_config.json
    "config huge": (_huge_config, "bytes accepted"),
    "config deeply nested": (_deep_config, "nested deeper"),
    "config not an object": (lambda d: (d / CONFIG).write_text('"r"'), "JSON object"),
    "config not utf-8": (lambda d: (d / CONFIG).write_bytes(b'{"r": "\xff\xfe"}'), "not valid JSON"),
    "rank zero": (lambda d: _edit_config(d, r=0), "invalid r=0"),
    "rank negative": (lambda d: _edit_config(d, r=-4), "invalid r=-4"),
    "rank enormous": (lambda d: _edit_config(d, r=10**30), "exceeds max_lora_rank"),
    "rank not an integer": (lambda d: _edit_config(d, r=4.5), "invalid r=4.5"),
    "rank_pattern zero": (lambda d: _edit_config(d, rank_pattern={"q_proj": 0}), "rank_pattern['q_proj']"),
    "alpha zero": (lambda d: _edit_config(d, lora_alpha=0), "invalid lora_alpha=0"),
    "alpha negative": (lambda d: _edit_config(d, lora_alpha=-8), "invalid lora_alpha=-8"),
    "alpha enormous": (lambda d: _edit_config(d, lora_alpha=1e300), "above the"),
    "alpha nan": (lambda d: (d / CONFIG).write_text(
        (d / CONFIG).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')), "invalid lora_alpha=nan"),
    "alpha infinite": (lambda d: (d / CONFIG).write_text(
        (d / CONFIG).read_text().replace('"lora_alpha": 8', '"lora_alpha": Infinity')), "invalid lora_alpha=inf"),
    "alpha_pattern negative": (lambda d: _edit_config(d, alpha_pattern={"v_proj": -1}), "alpha_pattern['v_proj']"),
    # escapes from the folder
    "config symlink outside": (_symlink_out(CONFIG), "points outside"),
    "weights symlink outside": (_symlink_out(WEIGHTS), "points outside"),
    "weights via ..": (_dotdot_out, "points outside"),
    "weights symlink to /dev/zero": (lambda d: ((d / WEIGHTS).unlink(), os.symlink("/dev/zero", d / WEIGHTS)),
                                     "points outside"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_a_clear_error(case, adapters, base_info, tmp_path):  # noqa: F811
    _BASE_INFO[:] = [base_info]
    mutate, expected = HOSTILE[case]
    d = _copy(adapters, tmp_path)
    load_peft_adapter(d, "victim-adapter", base_info, MAX_RANK)  # the unmodified copy loads
    mutate(d)
    with pytest.raises(AdapterLoadError) as info:
        load_peft_adapter(d, "victim-adapter", base_info, MAX_RANK)
    msg = str(info.value)
    assert msg.startswith("adapter 'victim-adapter': ") and expected in msg, msg
    assert str(tmp_path) not in msg and len(msg) < 1000


def test_folder_changing_during_load_is_refused_then_reread(adapters, base_info, tmp_path, monkeypatch):  # noqa: F811
    d = _copy(adapters, tmp_path)
    real_read = peft_loader.read_file

    def read_then_rewrite_config(root, fname, limit, boundary=None):
        out = real_read(root, fname, limit, boundary)
        if fname == WEIGHTS:  # someone rewrites the config while the weights are being read
            cfg = json.loads((d / CONFIG).read_text())
            cfg["note"] = "re-uploaded"
            (d / CONFIG).write_text(json.dumps(cfg))
        return out

    monkeypatch.setattr(peft_loader, "read_file", read_then_rewrite_config)
    with pytest.raises(AdapterLoadError, match="changed while it was being loaded"):
        load_peft_adapter(d, "moving", base_info, MAX_RANK)
    monkeypatch.setattr(peft_loader, "read_file", real_read)
    assert load_peft_adapter(d, "moving", base_info, MAX_RANK).rank == 4  # read again: fine


def test_weights_replaced_between_stat_and_read_never_crash(adapters, base_info, tmp_path):  # noqa: F811
    """Replace the weights file over and over while loading it: every load either succeeds with a
    consistent adapter or fails with an AdapterLoadError (never SIGBUS, never another exception)."""
    import threading

    d = _copy(adapters, tmp_path)
    good = (d / WEIGHTS).read_bytes()
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            tmp = d / f".w{i % 2}"
            tmp.write_bytes(good[: len(good) // 2] if i % 2 else good)
            os.replace(tmp, d / WEIGHTS)
            i += 1

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    outcomes = set()
    try:
        for _ in range(40):
            try:
                load_peft_adapter(d, "churned", base_info, MAX_RANK)
                outcomes.add("ok")
            except AdapterLoadError:
                outcomes.add("refused")
    finally:
        stop.set()
        t.join(timeout=10)
    assert outcomes <= {"ok", "refused"} and outcomes


# ---- end to end: a hostile folder in --adapter-dir next to a running request ----------------------

@pytest.fixture(scope="module")
def hostile_server(checkpoints, tmp_path_factory):
    from loragate.engine.async_engine import AsyncEngine
    from loragate.engine.config import EngineConfig
    from loragate.gateway import GatewaySettings, create_app
    from tests.test_gateway import running_server

    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("hostile-dir")
    build_adapter(base, root / "good", rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=7)
    for name, mutate in (("nan-weights", _tensor_value(float("nan"))), ("alpha-zero",
                         lambda d: _edit_config(d, lora_alpha=0)), ("truncated", _truncate)):
        shutil.copytree(root / "good", root / name)
        mutate(root / name)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "good", outside / "evil")
    os.symlink(outside / "evil", root / "escape")
    cfg = EngineConfig(model=str(base), served_model_name="tiny", dtype="float32", device="cpu",
                       adapter_dir=str(root), max_loras=2, max_lora_rank=8, kv_cache_memory=16 << 20,
                       block_size=8, max_model_len=256)
    engine = AsyncEngine(cfg)
    with running_server(create_app(engine, GatewaySettings())) as url:
        yield {"url": url, "root": root, "engine": engine}


def test_hostile_folders_fail_their_requests_only(hostile_server):
    url, root = hostile_server["url"], hostile_server["root"]
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(prompt="the quick brown fox", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    reference = c.completions.create(model="good", **kw).choices[0].text

    async def scenario():
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        async def stream_good() -> str:
            text = ""
            async for ch in await ac.completions.create(model="good", stream=True, **kw):
                text += ch.choices[0].text if ch.choices else ""
            return text

        async def hostile(name: str):
            async with httpx.AsyncClient(timeout=60) as h:
                return name, await h.post(url + "/v1/completions", json={"model": name, "prompt": "x",
                                                                         "max_tokens": 2})

        return await asyncio.gather(stream_good(), *(hostile(n) for n in
                                                     ("nan-weights", "alpha-zero", "truncated", "escape")))

    got, *answers = asyncio.run(scenario())
    assert got == reference  # the running request was not disturbed
    causes = {"nan-weights": "NaN or infinite", "alpha-zero": "invalid lora_alpha=0", "truncated": "truncated"}
    for name, r in answers:
        err = r.json()["error"]
        assert str(root) not in r.text
        if name == "escape":  # a symlink out of --adapter-dir does not exist as far as clients know
            assert r.status_code == 404 and err["code"] == "model_not_found"
            continue
        assert r.status_code == 400 and err["code"] == "adapter_load_error", r.text
        assert f"adapter {name!r}" in err["message"] and causes[name] in err["message"], err
    assert httpx.get(url + "/health").status_code == 200
    assert c.completions.create(model="good", **kw).choices[0].text == reference
