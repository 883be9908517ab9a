"""CLI flag parsing -> EngineConfig + GatewaySettings, without loading a model."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from loragate import __version__
from loragate.cli import build_configs, build_parser, parse_size


def test_parse_size():
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1024") == 1024
    with pytest.raises(Exception):
        parse_size("lots")


def test_serve_flags_build_configs(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": "k1", "tenant": "t", "adapters": ["a"]}]}))
    args = build_parser().parse_args([
        "serve", "--model", str(tmp_path), "--served-model-name", "base", "--adapter", "a=/x/a", "--adapter", "b=/x/b",
        "--adapter-dir", "/ads", "--device", "cpu", "--dtype", "float32", "--api-key", "s1", "--api-key", "s2",
        "--api-keys-file", str(keys), "--max-loras", "4", "--max-lora-rank", "16", "--max-cpu-adapter-memory", "1GiB",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--max-model-len", "1024",
        "--kv-cache-memory", "256MiB", "--block-size", "32", "--pin-adapter", "a", "--fairness", "fcfs",
        "--allowed-adapter-dir", "/ads", "--port", "9000"])
    cfg = build_configs(args)
    e, g = cfg.engine, cfg.gateway
    assert e.model == str(tmp_path) and e.served_model_name == "base"
    assert e.adapters == (("a", "/x/a"), ("b", "/x/b")) and e.adapter_dir == "/ads"
    assert (e.device, e.dtype, e.max_loras, e.max_lora_rank) == ("cpu", "float32", 4, 16)
    assert e.max_cpu_adapter_memory == 1 << 30 and e.kv_cache_memory == 256 << 20
    assert (e.max_num_seqs, e.max_num_batched_tokens, e.max_model_len, e.block_size) == (8, 512, 1024, 32)
    assert e.pin_adapters == ("a",) and e.fairness == "fcfs"
    assert g.api_keys == ("s1", "s2") and g.api_keys_file["keys"][0]["tenant"] == "t"
    assert g.allowed_adapter_dirs == ("/ads",) and cfg.port == 9000 and cfg.host == "127.0.0.1"


def test_demo_used_without_model(monkeypatch, tmp_path):
    import loragate

    demo = types.ModuleType("loragate.demo")
    demo.demo_paths = lambda: (tmp_path / "demo-model", {"pirate": tmp_path / "pirate"})
    demo.DEMO_MODEL_NAME = "demo-name"
    monkeypatch.setitem(sys.modules, "loragate.demo", demo)
    monkeypatch.setattr(loragate, "demo", demo, raising=False)
    cfg = build_configs(build_parser().parse_args(["serve"]))
    assert cfg.engine.model == str(tmp_path / "demo-model")
    assert cfg.engine.adapters == (("pirate", str(tmp_path / "pirate")),)
    assert cfg.engine.served_model_name == "demo-name"


def test_bad_keys_file_is_rejected(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"tenant": "no key"}]}))
    with pytest.raises(ValueError):
        build_configs(build_parser().parse_args(["serve", "--model", "/m", "--api-keys-file", str(keys)]))


def test_version():
    out = subprocess.run([sys.executable, "-m", "loragate.cli", "--version"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"loragate {__version__}"


def test_tenant_weights_reach_the_engine_config(tmp_path):
    cfg = build_configs(build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--tenant-weight", "acme=2", "--tenant-weight", "globex=0.5"]))
    assert dict(cfg.engine.tenant_weights) == {"acme": 2.0, "globex": 0.5}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--tenant-weight", "acme=-1"])


def test_remote_adapter_source_flags(tmp_path):
    args = build_parser().parse_args([
        "serve", "--model", str(tmp_path), "--adapter-source", "local,hub,s3", "--adapter-cache-dir", "/dl",
        "--max-adapter-download-size", "64MiB", "--adapter-download-timeout", "20",
        "--s3-endpoint-url", "http://127.0.0.1:9000"])
    e = build_configs(args).engine
    assert e.adapter_sources == ("local", "hub", "s3") and e.adapter_cache_dir == "/dl"
    assert e.max_adapter_download_bytes == 64 << 20 and e.adapter_download_timeout == 20.0
    assert e.s3_endpoint_url == "http://127.0.0.1:9000"
    assert build_configs(build_parser().parse_args(["serve", "--model", str(tmp_path)])).engine.adapter_sources \
        == ("local",)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter-source", "local,ftp"])
