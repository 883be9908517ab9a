"""Read one PEFT LoRA directory into CPU tensors, refusing anything the engine cannot serve exactly.

An adapter is `adapter_config.json` + `adapter_model.safetensors`. Everything is validated against
the base model before a single slot is touched, so a bad adapter fails its own requests with a
message naming the cause instead of producing silently wrong outputs. Pickled weights
(`adapter_model.bin`) are refused outright: unpickling runs arbitrary code from an untrusted dir.

PEFT lets each module have its own rank and alpha (`rank_pattern`, `alpha_pattern`), but a device
slot carries one scale per adapter. We keep `scale = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA)
and fold each module's ratio `module_scale / scale` into its B, so `scale * B @ A` still equals
PEFT's delta weight for every module.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loragate.engine.errors import AdapterLoadError
from loragate.engine.model.lora import MODULE_TO_GROUP

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
SUPPORTED_MODULES = tuple(MODULE_TO_GROUP)
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")

# <module path>.lora_<kind>[.<adapter name>].weight|bias ; the adapter-name infix is optional
_TENSOR_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<infix>[^.]+))?\.(?P<param>weight|bias)$"
)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class BaseModelInfo:
    """What an adapter is validated against: the base's architecture and LoRA-able shapes."""

    model_type: str  # e.g. "llama", "mistral", "qwen2"
    num_layers: int
    module_shapes: dict[str, tuple[int, int]]  # peft module name -> (in_features, out_features)
    dtype: torch.dtype  # the engine's compute dtype (loragate.engine.host.choose_dtype)


@dataclass
class LoadedAdapter:
    """The CPU tier's unit: validated tensors in the engine's compute dtype (converted once, when
    read: a float32 engine never converts a bf16 adapter per step), ready for `LoraWeights.write_slot`."""

    name: str
    path: str
    rank: int  # max rank over modules
    scale: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    # (layer, module) -> (A [r, in], B [out, r]); per-module scale ratios already folded into B
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    targets: tuple[str, ...]
    nbytes: int


def _fail(name: str, msg: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter {name!r}: {msg}")


def _read_config(root: Path, name: str) -> dict:
    path = root / CONFIG_NAME
    if not root.is_dir():
        raise _fail(name, f"no adapter directory at {str(root)!r}")
    if not path.is_file():
        raise _fail(name, f"{CONFIG_NAME} is missing in {str(root)!r}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(name, f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _fail(name, f"{CONFIG_NAME} must hold a JSON object")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg or cfg[key] is None:
            raise _fail(name, f"{CONFIG_NAME} is missing {key!r}")
    if isinstance(cfg["r"], bool) or not isinstance(cfg["r"], int) or cfg["r"] <= 0:
        raise _fail(name, f"{CONFIG_NAME} has invalid r={cfg['r']!r}")
    if isinstance(cfg["lora_alpha"], bool) or not isinstance(cfg["lora_alpha"], (int, float)):
        raise _fail(name, f"{CONFIG_NAME} has invalid lora_alpha={cfg['lora_alpha']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise _fail(name, f"{CONFIG_NAME} has invalid {key}")
    return cfg


def _check_features(cfg: dict, name: str) -> None:
    """Refuse every PEFT option whose effect our slots cannot reproduce."""
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise _fail(name, f"peft_type {peft_type!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise _fail(name, "DoRA adapters (use_dora=true) are not supported")
    if cfg.get("bias", "none") != "none":
        raise _fail(name, f"bias={cfg.get('bias')!r} is not supported (only 'none')")
    if cfg.get("lora_bias"):
        raise _fail(name, "lora_bias=true is not supported")
    if cfg.get("modules_to_save"):
        raise _fail(name, f"modules_to_save {cfg['modules_to_save']!r} is not supported (full-weight modules)")
    if cfg.get("target_parameters"):
        raise _fail(name, "target_parameters is not supported")
    if cfg.get("trainable_token_indices"):
        raise _fail(name, "trainable_token_indices is not supported")
    if cfg.get("layer_replication"):
        raise _fail(name, "layer_replication is not supported")
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as exc:
                raise _fail(name, f"target_modules regex {targets!r} is invalid ({exc})") from None
        return
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise _fail(name, f"target_modules must be a list of names or a regex string, got {targets!r}")
    for t in targets:
        leaf = t.split(".")[-1]
        if leaf in EMBEDDING_MODULES:
            raise _fail(name, f"LoRA on embeddings / lm_head ({t!r}) is not supported")
        if leaf not in SUPPORTED_MODULES:
            raise _fail(name, f"target module {t!r} is not supported (supported: {', '.join(SUPPORTED_MODULES)})")


def _weights_file(root: Path, name: str) -> Path:
    path = root / WEIGHTS_NAME
    if path.is_file():
        return path
    pickled = [p for p in PICKLED_NAMES if (root / p).exists()]
    if pickled:
        raise _fail(name, f"only pickled weights ({pickled[0]}) found: refusing to unpickle; "
                          f"convert the adapter to {WEIGHTS_NAME}")
    raise _fail(name, f"{WEIGHTS_NAME} is missing in {str(root)!r}")


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise _fail(name, f"{WEIGHTS_NAME} could not be read ({exc})") from None


def _module_key(module_path: str) -> str:
    """The module's name inside the base model, as PEFT matches patterns against it."""
    for prefix in ("base_model.model.",):
        if module_path.startswith(prefix):
            return module_path[len(prefix):]
    return module_path


def _targeted(targets: str | list[str], key: str) -> bool:
    """PEFT's own rule: a list entry matches the name or a dotted suffix; a string is a full regex."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, key) is not None
    return any(key == t or key.endswith("." + t) for t in targets)


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern matching a dotted suffix of `key` wins."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def _group_tensors(tensors: dict[str, torch.Tensor], name: str, base: BaseModelInfo
                   ) -> dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]]:
    """{(layer, module): (module key, {"A": t, "B": t})} with every name checked."""
    pairs: dict[tuple[int, str], tuple[str, dict[str, torch.Tensor]]] = {}
    for tname, t in tensors.items():
        m = _TENSOR_RE.match(tname)
        if m is None:
            raise _fail(name, f"unexpected tensor {tname!r} (not a LoRA A/B weight)")
        kind, module_path = m.group("kind"), m.group("module")
        leaf = module_path.split(".")[-1]
        if kind.startswith("lora_embedding") or leaf in EMBEDDING_MODULES:
            raise _fail(name, f"LoRA on embeddings / lm_head ({tname!r}) is not supported")
        if kind == "lora_magnitude_vector":
            raise _fail(name, f"DoRA tensor {tname!r} is not supported")
        if m.group("param") != "weight":
            raise _fail(name, f"LoRA bias tensor {tname!r} is not supported")
        if leaf not in SUPPORTED_MODULES:
            raise _fail(name, f"tensor {tname!r} targets unsupported module {leaf!r} "
                              f"(supported: {', '.join(SUPPORTED_MODULES)})")
        lm = _LAYER_RE.search(module_path)
        if lm is None:
            raise _fail(name, f"tensor {tname!r} has no decoder layer index")
        layer = int(lm.group(1))
        if layer >= base.num_layers:
            raise _fail(name, f"tensor {tname!r} is for layer {layer} but the base model has "
                              f"{base.num_layers} layers")
        if not t.is_floating_point():
            raise _fail(name, f"tensor {tname!r} has non-float dtype {t.dtype}")
        key, slot = pairs.setdefault((layer, leaf), (_module_key(module_path), {}))
        ab = kind[-1]
        if ab in slot:
            raise _fail(name, f"duplicate lora_{ab} tensor for layer {layer} {leaf}")
        slot[ab] = t
    return pairs


def load_peft_adapter(path: str | Path, name: str, base: BaseModelInfo, max_rank: int) -> LoadedAdapter:
    """Validate and read the PEFT adapter at `path`. Raises AdapterLoadError naming the cause."""
    root = Path(path)
    cfg = _read_config(root, name)
    _check_features(cfg, name)
    tensors = _read_tensors(_weights_file(root, name), name)
    if not tensors:
        raise _fail(name, f"{WEIGHTS_NAME} holds no tensors")
    pairs = _group_tensors(tensors, name, base)

    r_cfg, alpha_cfg = int(cfg["r"]), float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    scale = alpha_cfg / (math.sqrt(r_cfg) if rslora else r_cfg)
    targets_cfg = cfg["target_modules"]

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    rank = 0
    for (layer, module), (key, ab) in sorted(pairs.items()):
        where = f"layer {layer} {module}"
        for part in ("A", "B"):
            if part not in ab:
                raise _fail(name, f"lora_{part} is missing for {where} (lora_A/lora_B pair incomplete)")
        a, b = ab["A"], ab["B"]
        if module not in base.module_shapes:
            raise _fail(name, f"the base model has no LoRA-capable {module}")
        in_f, out_f = base.module_shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise _fail(name, f"shape mismatch for {where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                              f"do not fit the base ({in_f} in, {out_f} out)")
        r_m = int(a.shape[0])
        if r_m > max_rank:
            raise _fail(name, f"rank {r_m} ({where}) exceeds max_lora_rank {max_rank}")
        if not _targeted(targets_cfg, key):
            raise _fail(name, f"config target_modules {targets_cfg!r} does not cover {key!r} found in the weights")
        r_expected = int(_pattern_value(rank_pattern, key, r_cfg))
        if r_m != r_expected:
            raise _fail(name, f"config says rank {r_expected} for {key!r} but the weights have rank {r_m}")
        alpha_m = float(_pattern_value(alpha_pattern, key, alpha_cfg))
        scale_m = alpha_m / (math.sqrt(r_m) if rslora else r_m)
        if scale == 0 and scale_m != 0:
            raise _fail(name, f"lora_alpha 0 with a non-zero alpha_pattern for {key!r} cannot be served")
        ratio = scale_m / scale if scale != 0 else 0.0
        b32 = b.to(torch.float32)
        if ratio != 1.0:
            b32 = b32 * ratio
        a_out = a.to(base.dtype).contiguous()
        b_out = b32.to(base.dtype).contiguous()
        weights[(layer, module)] = (a_out, b_out)
        nbytes += a_out.numel() * a_out.element_size() + b_out.numel() * b_out.element_size()
        rank = max(rank, r_m)

    present = {m for (_, m) in weights}
    if isinstance(targets_cfg, (list, tuple)) and not cfg.get("exclude_modules"):
        missing = sorted({t.split(".")[-1] for t in targets_cfg} - present)
        if missing:
            raise _fail(name, f"config targets {missing} but {WEIGHTS_NAME} holds no weights for them")
    return LoadedAdapter(
        name=name,
        path=str(root),
        rank=rank,
        scale=scale,
        weights=weights,
        targets=tuple(m for m in SUPPORTED_MODULES if m in present),
        nbytes=nbytes,
    )
