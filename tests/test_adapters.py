"""Adapters: PEFT loading equals PEFT's own delta weights, every refusal names its cause, the
registry never lets a name escape its directory, and the tiered cache loads once, evicts by LRU,
never touches a slot in use or pinned, and never holds its lock across a slot write."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loragate.engine.adapters import AdapterCache, AdapterRegistry, BaseModelInfo, load_peft_adapter
from loragate.engine.adapters.registry import is_valid_name
from loragate.engine.errors import AdapterLoadError, AdapterNotFoundError
from loragate.engine.model.lora import MODULE_TO_GROUP, LoraWeights, group_specs
from loragate.testing import DEFAULT_TARGETS, build_adapter

MAX_RANK = 16
ADAPTERS = {
    # name: (rank, alpha, targets, extra LoraConfig kwargs)
    "all-r8": (8, 16, DEFAULT_TARGETS, {}),
    "qv-r4": (4, 8, ("q_proj", "v_proj"), {}),
    "qv-r4-b": (4, 8, ("q_proj", "v_proj"), {}),
    "qv-r4-c": (4, 8, ("q_proj", "v_proj"), {}),
    "rslora-r8": (8, 12, ("q_proj", "k_proj", "o_proj", "down_proj"), {"use_rslora": True}),
    "pattern": (8, 16, ("q_proj", "v_proj", "gate_proj", "down_proj"),
                {"rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
                 "alpha_pattern": {"v_proj": 5.0, "gate_proj": 32}}),
}


# ---- fixtures: one checkpoint and a handful of adapters per module ---------------------------------
@pytest.fixture(scope="module")
def base_dir(checkpoints):
    return checkpoints("llama3")


@pytest.fixture(scope="module")
def base_info(base_dir) -> BaseModelInfo:
    cfg = json.loads((Path(base_dir) / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out, kv_out = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
              "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    return BaseModelInfo(cfg["model_type"], cfg["num_hidden_layers"], shapes, torch.float32)


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(base_dir, root / name, rank=r, alpha=a, targets=t, seed=i + 1, **kw)
            for i, (name, (r, a, t, kw)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def peft_deltas(base_dir, adapters) -> dict[str, dict[tuple[int, str], torch.Tensor]]:
    """PEFT's own get_delta_weight for every adapter, layer and module: the reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    names = list(adapters)
    pm = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    out: dict[str, dict] = {n: {} for n in names}
    for key, module in pm.named_modules():
        leaf = key.split(".")[-1]
        if leaf not in MODULE_TO_GROUP or not hasattr(module, "lora_A"):
            continue
        layer = int(key.split("layers.")[1].split(".")[0])
        for n in names:
            if n in module.lora_A:
                out[n][(layer, leaf)] = module.get_delta_weight(n).detach().clone()
    return out


def lora_weights(base_info: BaseModelInfo, max_loras: int) -> LoraWeights:
    s = base_info.module_shapes
    specs = group_specs(s["q_proj"][0], s["q_proj"][1], s["k_proj"][1], s["gate_proj"][1])
    return LoraWeights(specs, base_info.num_layers, max_loras, MAX_RANK, torch.device("cpu"), torch.float32)


# ---- peft_loader ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_loaded_weights_reproduce_peft_delta(name, adapters, base_info, peft_deltas):
    loaded = load_peft_adapter(adapters[name], name, base_info, MAX_RANK)
    ref = peft_deltas[name]
    assert set(loaded.weights) == set(ref) and ref
    for key, (a, b) in loaded.weights.items():
        assert a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype == base_info.dtype
        torch.testing.assert_close(loaded.scale * (b @ a), ref[key], rtol=1e-5, atol=1e-6)
    r, alpha, targets, kw = ADAPTERS[name]
    assert loaded.rank == r
    assert set(loaded.targets) == set(targets)
    assert loaded.scale == pytest.approx(alpha / (r**0.5 if kw.get("use_rslora") else r))
    assert loaded.nbytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in loaded.weights.values())


def test_pattern_adapter_has_per_module_ranks(adapters, base_info):
    loaded = load_peft_adapter(adapters["pattern"], "pattern", base_info, MAX_RANK)
    assert loaded.weights[(0, "q_proj")][0].shape[0] == 4
    assert loaded.weights[(0, "down_proj")][0].shape[0] == 8
    assert loaded.weights[(1, "down_proj")][0].shape[0] == 2


def _copy(adapters, tmp_path, name="qv-r4") -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(adapters[name], dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, fn) -> None:
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file(fn(dict(tensors)), str(path))


_DELETE = object()
_A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
_B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _pickled_only(d: Path) -> None:
    tensors = load_file(str(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    torch.save(tensors, d / "adapter_model.bin")


def _rename_layer(t: dict) -> dict:
    return {k.replace("layers.1.", "layers.5."): v for k, v in t.items()}


def _add(key: str, shape: tuple[int, ...]):
    def fn(t: dict) -> dict:
        t[key] = torch.zeros(shape)
        return t
    return fn


def _fc1_tensor(d: Path) -> None:
    """A regex target that lets an unsupported module's weights through the config check."""
    _edit_config(d, target_modules=".*")
    _edit_tensors(d, _add("base_model.model.model.layers.0.mlp.fc1.lora_A.weight", (4, 64)))


REFUSALS = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    "not an object": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "JSON object"),
    "no r": (lambda d: _edit_config(d, r=_DELETE), "missing 'r'"),
    "no alpha": (lambda d: _edit_config(d, lora_alpha=_DELETE), "missing 'lora_alpha'"),
    "no targets": (lambda d: _edit_config(d, target_modules=_DELETE), "missing 'target_modules'"),
    "ia3": (lambda d: _edit_config(d, peft_type="IA3"), "peft_type 'IA3'"),
    "pickled": (_pickled_only, "pickled"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    "corrupt weights": (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x00garbage"), "could not be read"),
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "bias": (lambda d: _edit_config(d, bias="lora_only"), "bias='lora_only'"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "embed target": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "embed_tokens"]), "embeddings"),
    "lm_head target": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "lm_head"]), "lm_head"),
    "embedding tensors": (lambda d: _edit_tensors(d, _add(
        "base_model.model.model.embed_tokens.lora_embedding_A.weight", (4, 475))), "embeddings"),
    "unsupported target": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "fc1"]),
                           "'fc1' is not supported"),
    "unsupported tensor": (_fc1_tensor, "unsupported module 'fc1'"),
    "in features": (lambda d: _edit_tensors(d, lambda t: {**t, _A0: torch.zeros(4, 65)}), "shape mismatch"),
    "out features": (lambda d: _edit_tensors(d, lambda t: {**t, _B0: torch.zeros(63, 4)}), "shape mismatch"),
    "layer index": (lambda d: _edit_tensors(d, _rename_layer), "layer 5"),
    "pair missing": (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if k != _B0}),
                     "lora_B is missing"),
    "config disagrees": (lambda d: _edit_config(d, target_modules=["q_proj"]), "does not cover"),
    "config rank disagrees": (lambda d: _edit_config(d, r=6), "rank 6"),
    "target without weights": (lambda d: _edit_config(d, target_modules=["q_proj", "v_proj", "o_proj"]),
                               "no weights for them"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_their_cause(case, adapters, base_info, tmp_path):
    mutate, expected = REFUSALS[case]
    d = _copy(adapters, tmp_path)
    load_peft_adapter(d, "x", base_info, MAX_RANK)  # the unmodified copy loads
    mutate(d)
    with pytest.raises(AdapterLoadError) as info:
        load_peft_adapter(d, "x", base_info, MAX_RANK)
    assert expected in str(info.value)


def test_pickled_weights_are_never_unpickled(adapters, base_info, tmp_path, monkeypatch):
    d = _copy(adapters, tmp_path)
    _pickled_only(d)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(AdapterLoadError, match="pickled"):
        load_peft_adapter(d, "x", base_info, MAX_RANK)


def test_rank_over_max_is_refused(adapters, base_info):
    with pytest.raises(AdapterLoadError, match="exceeds max_lora_rank 4"):
        load_peft_adapter(adapters["all-r8"], "x", base_info, 4)


def test_adapter_name_infix_regex_and_all_linear_targets(adapters, base_info, tmp_path):
    ref = load_peft_adapter(adapters["qv-r4"], "x", base_info, MAX_RANK)
    d = _copy(adapters, tmp_path)
    _edit_tensors(d, lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    for targets in (r".*\.(q_proj|v_proj)", "all-linear", ["q_proj", "v_proj"]):
        _edit_config(d, target_modules=targets)
        got = load_peft_adapter(d, "x", base_info, MAX_RANK)
        assert set(got.weights) == set(ref.weights)
        for key, (a, b) in got.weights.items():
            assert torch.equal(a, ref.weights[key][0]) and torch.equal(b, ref.weights[key][1])
    _edit_config(d, target_modules=r".*\.q_proj")  # the regex does not cover v_proj
    with pytest.raises(AdapterLoadError, match="does not cover"):
        load_peft_adapter(d, "x", base_info, MAX_RANK)


def test_weights_are_cast_to_base_dtype(adapters, base_info):
    bf16 = BaseModelInfo(base_info.model_type, base_info.num_layers, base_info.module_shapes, torch.bfloat16)
    got = load_peft_adapter(adapters["pattern"], "p", bf16, MAX_RANK)
    ref = load_peft_adapter(adapters["pattern"], "p", base_info, MAX_RANK)
    for key, (a, b) in got.weights.items():
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), ref.weights[key][1], rtol=1e-2, atol=1e-3)
    assert got.nbytes * 2 == ref.nbytes


# ---- registry ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,ok", [
    ("my-adapter_1.v2", True), ("A", True), ("../x", False), ("a/b", False), ("a\\b", False), ("..", False),
    ("a..b", False), (".hidden", False), ("/abs", False), ("a\x00b", False), ("base:ad", False), ("", False),
    ("a b", False), ("x" * 129, False), (None, False),
])
def test_name_rules(name, ok):
    assert is_valid_name(name) is ok
    assert AdapterRegistry.is_valid_name(name) is ok


def test_registry_path_safety_and_dynamic_discovery(adapters, tmp_path):
    adir, outside = tmp_path / "adir", tmp_path / "outside"
    adir.mkdir()
    shutil.copytree(adapters["qv-r4"], adir / "good")
    shutil.copytree(adapters["qv-r4"], outside / "evil")
    os.symlink(outside / "evil", adir / "escape")  # symlink leaving adapter_dir
    os.symlink(adir / "good", adir / "alias")  # symlink staying inside is fine
    (adir / "empty").mkdir()  # no adapter_config.json
    reg = AdapterRegistry([("explicit", str(adapters["all-r8"]))], adapter_dir=str(adir))
    assert reg.resolve("good") == os.path.realpath(adir / "good")
    assert reg.resolve("alias") == os.path.realpath(adir / "good")
    assert reg.resolve("explicit") == str(adapters["all-r8"])
    for bad in ("escape", "empty", "missing", "../outside/evil", str(outside / "evil"), "..", ".", "good/"):
        assert reg.resolve(bad) is None, bad
    assert reg.names() == ["explicit", "alias", "good"]
    shutil.copytree(adapters["qv-r4"], adir / "late")  # created after start-up
    assert reg.resolve("late") == os.path.realpath(adir / "late")
    assert "late" in reg.names()


def test_registry_register_and_unregister(adapters, tmp_path):
    adir, allowed, outside = tmp_path / "adir", tmp_path / "allowed", tmp_path / "outside"
    adir.mkdir()
    shutil.copytree(adapters["qv-r4"], adir / "indir")
    shutil.copytree(adapters["qv-r4"], allowed / "ok")
    shutil.copytree(adapters["qv-r4"], outside / "evil")
    os.symlink(outside / "evil", allowed / "link")
    reg = AdapterRegistry(adapter_dir=str(adir), allowed_dirs=[str(allowed)])
    reg.register("new", str(allowed / "ok"))
    assert reg.resolve("new") == os.path.realpath(allowed / "ok")
    with pytest.raises(ValueError, match="outside"):
        reg.register("evil", str(outside / "evil"))
    with pytest.raises(ValueError, match="outside"):
        reg.register("evil", str(allowed / "link"))  # symlink resolved before the check
    with pytest.raises(ValueError, match="outside"):
        reg.register("evil", str(allowed / ".." / "outside" / "evil"))
    with pytest.raises(ValueError, match="invalid adapter name"):
        reg.register("../x", str(allowed / "ok"))
    with pytest.raises(ValueError, match="already exists"):
        reg.register("indir", str(allowed / "ok"))
    assert reg.resolve("evil") is None
    reg.unregister("new")
    assert reg.resolve("new") is None
    reg.unregister("indir")  # a directory entry is hidden, its files stay
    assert reg.resolve("indir") is None and "indir" not in reg.names() and (adir / "indir").is_dir()
    with pytest.raises(AdapterNotFoundError):
        reg.unregister("indir")
    reg.register("indir", str(adir / "indir"))
    assert reg.resolve("indir") is not None
    with pytest.raises(ValueError):
        AdapterRegistry([("bad/name", "/tmp")])


def test_registry_is_thread_safe(adapters, tmp_path):
    allowed = tmp_path / "allowed"
    shutil.copytree(adapters["qv-r4"], allowed / "ok")
    reg = AdapterRegistry(allowed_dirs=[str(allowed)])
    errors: list[Exception] = []

    def worker(i: int) -> None:
        try:
            for j in range(50):
                reg.register(f"t{i}-{j}", str(allowed / "ok"))
                assert reg.resolve(f"t{i}-{j}") is not None
                reg.names()
                reg.unregister(f"t{i}-{j}")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and reg.names() == []


# ---- cache ---------------------------------------------------------------------------------------
class FakeClock:
    """The cache's clock for fresh-slot protection: time moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(adapters, base_info, max_loras=2, max_cpu_bytes=1 << 30, pinned=(), weights=None, registry=None,
               clock=None):
    reg = registry or AdapterRegistry([(n, str(p)) for n, p in adapters.items()])
    cache = AdapterCache(reg, weights or lora_weights(base_info, max_loras), base_info, max_cpu_bytes, MAX_RANK,
                         pinned=pinned, fresh_grace=5.0, clock=clock or FakeClock())
    cache.start()
    return cache


def stats_of(cache, name):
    return {s.name: s for s in cache.stats()}[name]


def assert_slot_holds(weights: LoraWeights, slot: int, loaded) -> None:
    assert weights.slot_ranks[slot] == loaded.rank
    assert weights.slot_scales[slot] == pytest.approx(loaded.scale)
    for layer in range(weights.num_layers):
        for module, (group, idx) in MODULE_TO_GROUP.items():
            spec = weights.specs[group]
            off, n = spec.slice_offsets[idx], spec.slice_out[idx]
            a_slot = weights.A[layer][group][slot, idx]
            b_slot = weights.B[layer][group][slot, off:off + n]
            if (layer, module) not in loaded.weights:
                assert not a_slot.any() and not b_slot.any()
                continue
            a, b = loaded.weights[(layer, module)]
            r = a.shape[0]
            assert torch.equal(a_slot[:r], a) and torch.equal(b_slot[:, :r], b)
            assert not a_slot[r:].any() and not b_slot[:, r:].any()


def test_many_requests_load_once_and_slot_holds_adapter(adapters, base_info):
    cache = make_cache(adapters, base_info)
    try:
        threads = [threading.Thread(target=lambda: [cache.request("pattern") for _ in range(25)]) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert cache.wait_idle()
        slot = cache.slot_of("pattern")
        assert slot is not None
        st = stats_of(cache, "pattern")
        assert st.load_count == 1 and st.tier == "device" and st.rank == 8
        assert st.last_load_seconds is not None and st.last_load_seconds > 0
        loaded = load_peft_adapter(adapters["pattern"], "pattern", base_info, MAX_RANK)
        assert st.size_bytes == loaded.nbytes
        assert_slot_holds(cache.weights, slot, loaded)
        for _ in range(3):
            cache.request("pattern")
        assert cache.wait_idle() and stats_of(cache, "pattern").load_count == 1
        assert cache.acquire("pattern") == slot and cache.acquire("pattern") == slot
        cache.release("pattern")
        cache.release("pattern")
        assert stats_of(cache, "pattern").requests_served == 2
        with pytest.raises(RuntimeError):
            cache.release("pattern")
        with pytest.raises(RuntimeError):
            cache.acquire("qv-r4")  # not resident
    finally:
        cache.shutdown()


def load(cache, name, use_it: bool = True) -> int:
    """Bring `name` into a slot; by default also run one request on it, as the scheduler would,
    which ends its fresh-load protection."""
    cache.request(name)
    assert cache.wait_idle()
    slot = cache.slot_of(name)
    assert slot is not None, name
    if use_it:
        use(cache, name)
    return slot


def use(cache, name) -> None:
    cache.acquire(name)
    cache.release(name)


def test_lru_eviction_in_use_and_pending_load(adapters, base_info):
    cache = make_cache(adapters, base_info, max_loras=2)
    try:
        sa, sb = load(cache, "qv-r4"), load(cache, "all-r8")
        assert sa != sb
        use(cache, "qv-r4")  # all-r8 is now least recently used
        assert load(cache, "pattern") == sb
        assert cache.slot_of("all-r8") is None and cache.slot_of("qv-r4") == sa
        assert stats_of(cache, "all-r8").tier == "cpu"
        assert_slot_holds(cache.weights, sb, load_peft_adapter(adapters["pattern"], "p", base_info, MAX_RANK))

        # both slots in use: the next adapter waits (in the CPU tier) without evicting either
        cache.acquire("qv-r4")
        cache.acquire("pattern")
        use(cache, "qv-r4")  # pattern is LRU now, but in use all the same
        cache.request("all-r8")
        assert cache.wait_idle()
        assert cache.slot_of("all-r8") is None and stats_of(cache, "all-r8").tier == "loading"
        assert cache.slot_of("qv-r4") == sa and cache.slot_of("pattern") == sb
        cache.release("pattern")  # frees the LRU slot: the pending load proceeds
        assert cache.wait_idle()
        assert cache.slot_of("all-r8") == sb and cache.slot_of("pattern") is None
        assert cache.slot_of("qv-r4") == sa
        assert stats_of(cache, "all-r8").load_count == 2 and stats_of(cache, "qv-r4").load_count == 1
        cache.release("qv-r4")
    finally:
        cache.shutdown()


def test_pinned_adapter_is_never_evicted(adapters, base_info):
    cache = make_cache(adapters, base_info, max_loras=2, pinned=["qv-r4"])
    try:
        sa = load(cache, "qv-r4")
        load(cache, "all-r8")
        use(cache, "all-r8")  # the pinned one is LRU, but pinned
        load(cache, "pattern")
        assert cache.slot_of("qv-r4") == sa and cache.slot_of("all-r8") is None
        load(cache, "rslora-r8")
        assert cache.slot_of("qv-r4") == sa and cache.slot_of("pattern") is None
        assert stats_of(cache, "qv-r4").pinned and stats_of(cache, "qv-r4").load_count == 1
        cache.pin("rslora-r8")  # both slots pinned: further adapters wait
        cache.request("pattern")
        assert cache.wait_idle() and cache.slot_of("pattern") is None
    finally:
        cache.shutdown()


def test_cpu_byte_budget(adapters, base_info):
    names = ["qv-r4", "qv-r4-b", "qv-r4-c"]
    size = load_peft_adapter(adapters["qv-r4"], "x", base_info, MAX_RANK).nbytes
    cache = make_cache(adapters, base_info, max_loras=1, max_cpu_bytes=2 * size + size // 2)
    try:
        for n in names:
            load(cache, n)
            assert cache.cpu_bytes <= 2 * size + size // 2
        assert cache.cpu_names() == names[1:]  # the oldest was dropped
        assert stats_of(cache, names[0]).tier == "disk"
        load(cache, names[1])  # from the CPU tier: refreshed in the LRU
        assert cache.cpu_names() == [names[2], names[1]]
    finally:
        cache.shutdown()
    # a budget smaller than one adapter: it passes through to the device but is not kept
    cache = make_cache(adapters, base_info, max_loras=1, max_cpu_bytes=size - 1)
    try:
        load(cache, "qv-r4")
        assert cache.cpu_bytes == 0 and cache.cpu_names() == []
    finally:
        cache.shutdown()


def test_load_failure_is_reported_and_retried_after_change(adapters, base_info, tmp_path):
    adir = tmp_path / "adir"
    (adir / "broken").mkdir(parents=True)
    (adir / "broken" / "adapter_config.json").write_text("{not json")
    cache = make_cache(adapters, base_info, registry=AdapterRegistry(adapter_dir=str(adir)))
    try:
        cache.request("broken")
        cache.request("nope")
        assert cache.wait_idle()
        assert "adapter_config.json" in cache.error_of("broken")
        assert "not found" in cache.error_of("nope")
        st = stats_of(cache, "broken")
        assert st.tier == "failed" and st.error == cache.error_of("broken") and st.load_count == 0
        assert cache.slot_of("broken") is None
        cache.request("broken")  # nothing changed: stays failed
        assert cache.wait_idle() and cache.error_of("broken") is not None
        shutil.rmtree(adir / "broken")
        shutil.copytree(adapters["qv-r4"], adir / "broken")  # fixed on disk
        cache.request("broken")
        assert cache.wait_idle()
        assert cache.error_of("broken") is None and cache.slot_of("broken") is not None
        assert stats_of(cache, "broken").tier == "device"
    finally:
        cache.shutdown()


def test_unregister_drops_all_tiers(adapters, base_info):
    cache = make_cache(adapters, base_info)
    try:
        slot = load(cache, "all-r8")
        cache.acquire("all-r8")
        with pytest.raises(RuntimeError):
            cache.unregister("all-r8")  # in use
        cache.release("all-r8")
        cache.unregister("all-r8")
        assert cache.slot_of("all-r8") is None and cache.cpu_names() == []
        assert cache.weights.slot_ranks[slot] == 0
        assert "all-r8" not in {s.name for s in cache.stats()}
        assert load(cache, "qv-r4") is not None
    finally:
        cache.shutdown()


class GatedWeights(LoraWeights):
    """write_slot blocks until the test opens the gate, to observe the cache mid-write."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write_slot(self, *args, **kwargs) -> None:
        self.entered.set()
        assert self.gate.wait(30)
        super().write_slot(*args, **kwargs)


def test_slot_is_unreadable_while_written_and_lock_is_free(adapters, base_info):
    s = base_info.module_shapes
    specs = group_specs(s["q_proj"][0], s["q_proj"][1], s["k_proj"][1], s["gate_proj"][1])
    weights = GatedWeights(specs, base_info.num_layers, 1, MAX_RANK, torch.device("cpu"), torch.float32)
    cache = make_cache(adapters, base_info, weights=weights)
    try:
        weights.gate.set()
        slot = load(cache, "qv-r4")
        weights.gate.clear()
        weights.entered.clear()
        use(cache, "qv-r4")
        cache.request("all-r8")
        assert weights.entered.wait(30)  # the loader is inside write_slot, evicting qv-r4
        # every step-loop call answers while the write is in progress: the lock is not held
        assert cache.slot_of("qv-r4") is None and cache.slot_of("all-r8") is None
        assert stats_of(cache, "all-r8").tier == "loading" and cache.error_of("all-r8") is None
        cache.request("qv-r4")
        assert not cache.wait_idle(timeout=0.05)
        weights.gate.set()
        assert cache.wait_idle()
        assert cache.slot_of("all-r8") == slot and cache.slot_of("qv-r4") is None
        assert stats_of(cache, "qv-r4").tier == "loading"  # waits for the slot all-r8 is fresh in
    finally:
        weights.gate.set()
        cache.shutdown()


def test_fresh_slot_waits_for_first_use_or_grace(adapters, base_info):
    clock = FakeClock()
    cache = make_cache(adapters, base_info, max_loras=1, clock=clock)
    try:
        slot = load(cache, "qv-r4", use_it=False)
        cache.request("all-r8")  # would evict qv-r4 before anyone could run on it
        assert cache.wait_idle()
        assert cache.slot_of("qv-r4") == slot and cache.slot_of("all-r8") is None
        use(cache, "qv-r4")  # first use ends the protection
        assert cache.wait_idle()
        assert cache.slot_of("all-r8") == slot and cache.slot_of("qv-r4") is None
        cache.request("qv-r4")  # all-r8 is fresh now; nobody comes for it
        assert cache.wait_idle() and cache.slot_of("all-r8") == slot
        clock.now += 5.0 + 1e-3  # the grace lapses: the waiting load may take the slot
        cache.request("qv-r4")  # wakes the loader
        assert cache.wait_idle()
        assert cache.slot_of("qv-r4") == slot and cache.slot_of("all-r8") is None
    finally:
        cache.shutdown()
