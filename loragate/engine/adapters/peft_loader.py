"""Read one PEFT LoRA directory into CPU tensors, refusing anything the engine cannot serve exactly.

An adapter is `adapter_config.json` + `adapter_model.safetensors`. Everything is validated against
the base model before a single slot is touched, so a bad adapter fails its own requests with a
message naming the cause instead of producing silently wrong outputs. Pickled weights
(`adapter_model.bin`) are refused outright: unpickling runs arbitrary code from an untrusted dir.

Adapter folders are customer uploads, so their files are read as hostile (`safe_files.py`): every
file must be a regular file inside the folder, sizes are bounded before reading (the weights by the
largest valid adapter for this base at `max_rank`), the safetensors header is validated before any
tensor is built, tensors are deserialised from memory rather than memory-mapped, NaN/inf weights,
non-positive or enormous ranks and alphas are refused, and a folder that changed while it was read
fails this load (the next request reads it again). Messages name the adapter and the cause, never
the folder's path, because they reach API clients.

PEFT lets each module have its own rank and alpha (`rank_pattern`, `alpha_pattern`), but a device
slot carries one scale per adapter. We keep `scale = lora_alpha / r` (or `/ sqrt(r)` with rsLoRA)
and fold each module's ratio `module_scale / scale` into its B, so `scale * B @ A` still equals
PEFT's delta weight for every module.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from loragate.engine.adapters.safe_files import (
    MAX_JSON_DEPTH,
    FileStamp,
    UnsafeFileError,
    check_unchanged,
    parse_safetensors_header,
    read_file,
)
from loragate.engine.errors import AdapterLoadError
from loragate.engine.json_limits import nesting_depth
from loragate.engine.model.lora import MODULE_TO_GROUP

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
SUPPORTED_MODULES = tuple(MODULE_TO_GROUP)
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
MAX_CONFIG_BYTES = 1 << 20  # real configs are about 1 KB
MAX_LORA_ALPHA = 65536.0  # far above any trained adapter's (alpha is usually r or 2r)

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
    dtype: torch.dtype
    # modules the device slots hold, when they were sized for fewer than all (adapters/slots.py)
    slot_modules: tuple[str, ...] | None = None


@dataclass
class LoadedAdapter:
    """The CPU tier's unit: validated tensors in the base dtype, ready for `LoraWeights.write_slot`."""

    name: str
    path: str
    rank: int  # max rank over modules
    scale: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    # (layer, module) -> (A [r, in], B [out, r]); per-module scale ratios already folded into B
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    targets: tuple[str, ...]
    nbytes: int
    # content identity (hex): equal only for adapters that compute the same thing. The prefix cache
    # keys KV blocks by it, never by the name; whoever builds a LoadedAdapter otherwise (merges in
    # memory) must set it from the adapter's full specification.
    digest: str = ""


def _fail(name: str, msg: str) -> AdapterLoadError:
    """The error for a refused adapter: names it and the cause, never its path, and stays short
    however long the offending tensor name or value in a hostile file is."""
    if len(msg) > 600:
        msg = msg[:600] + "..."
    return AdapterLoadError(f"adapter {name!r}: {msg}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rank(value: object, name: str, what: str, max_rank: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(name, f"{CONFIG_NAME} has invalid {what}={str(value)[:40]} (a positive integer is required)")
    if value > max_rank:
        raise _fail(name, f"{CONFIG_NAME} has {what}={str(value)[:40]}, which exceeds max_lora_rank {max_rank}")


def _check_alpha(value: object, name: str, what: str) -> None:
    if not _number(value) or not math.isfinite(value) or value <= 0:
        raise _fail(name, f"{CONFIG_NAME} has invalid {what}={str(value)[:40]} (a positive finite number is "
                          "required)")
    if value > MAX_LORA_ALPHA:
        raise _fail(name, f"{CONFIG_NAME} has {what}={str(value)[:40]}, above the {MAX_LORA_ALPHA:g} accepted")


def _read_config(root: Path, name: str, max_rank: int, stamps: list[FileStamp], boundary: Path | None) -> dict:
    if not root.is_dir():
        raise _fail(name, "the adapter directory does not exist")
    if not (root / CONFIG_NAME).exists() and not (root / CONFIG_NAME).is_symlink():
        raise _fail(name, f"{CONFIG_NAME} is missing")
    try:
        raw, stamp = read_file(root, CONFIG_NAME, MAX_CONFIG_BYTES, boundary)
    except UnsafeFileError as exc:
        raise _fail(name, str(exc)) from None
    stamps.append(stamp)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fail(name, f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if nesting_depth(text) > MAX_JSON_DEPTH:
        raise _fail(name, f"{CONFIG_NAME} is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(name, f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise _fail(name, f"{CONFIG_NAME} must hold a JSON object")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg or cfg[key] is None:
            raise _fail(name, f"{CONFIG_NAME} is missing {key!r}")
    _check_rank(cfg["r"], name, "r", max_rank)
    _check_alpha(cfg["lora_alpha"], name, "lora_alpha")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise _fail(name, f"{CONFIG_NAME} has invalid {key}")
    for pattern, value in (cfg.get("rank_pattern") or {}).items():
        _check_rank(value, name, f"rank_pattern[{pattern[:40]!r}]", max_rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        _check_alpha(value, name, f"alpha_pattern[{pattern[:40]!r}]")
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


def _weights_file(root: Path, name: str) -> str:
    path = root / WEIGHTS_NAME
    if path.exists() or path.is_symlink():
        return WEIGHTS_NAME
    pickled = [p for p in PICKLED_NAMES if (root / p).exists()]
    if pickled:
        raise _fail(name, f"only pickled weights ({pickled[0]}) found: refusing to unpickle; "
                          f"convert the adapter to {WEIGHTS_NAME}")
    raise _fail(name, f"{WEIGHTS_NAME} is missing")


def max_weights_bytes(base: BaseModelInfo, max_rank: int) -> int:
    """The largest safetensors file a valid adapter for `base` can be: every LoRA-capable module of
    every layer at `max_rank` in float64, plus room for the header. Anything larger is refused
    before it is read, so an upload cannot make the loader allocate more than this."""
    per_layer = sum(max_rank * (i + o) for i, o in base.module_shapes.values())
    n_tensors = 2 * base.num_layers * len(base.module_shapes)
    return 8 * base.num_layers * per_layer + (1 << 20) + 512 * n_tensors


def _read_tensors(root: Path, fname: str, name: str, limit: int, stamps: list[FileStamp],
                  boundary: Path | None) -> dict[str, torch.Tensor]:
    """Read the whole file into memory (bounded), validate its header, then deserialise from the
    bytes: never memory-mapped, because a file truncated under a live mapping kills the process."""
    try:
        data, stamp = read_file(root, fname, limit, boundary)
    except UnsafeFileError as exc:
        raise _fail(name, str(exc)) from None
    stamps.append(stamp)
    try:
        parse_safetensors_header(data)
        tensors = load_safetensors(data)
    except UnsafeFileError as exc:
        raise _fail(name, f"{fname} could not be read: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise _fail(name, f"{fname} could not be read ({type(exc).__name__}: {str(exc)[:200]})") from None
    for tname, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise _fail(name, f"tensor {tname[:200]!r} contains NaN or infinite values")
    return tensors


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


def load_peft_adapter(path: str | Path, name: str, base: BaseModelInfo, max_rank: int,
                      boundary: str | Path | None = None) -> LoadedAdapter:
    """Validate and read the PEFT adapter at `path`. Raises AdapterLoadError naming the cause.
    Its files must lie inside `path`, or inside `boundary` when given (see safe_files._inside)."""
    root = Path(path)
    stamps: list[FileStamp] = []
    boundary = Path(boundary) if boundary is not None else None
    cfg = _read_config(root, name, max_rank, stamps, boundary)
    _check_features(cfg, name)
    tensors = _read_tensors(root, _weights_file(root, name), name, max_weights_bytes(base, max_rank), stamps,
                           boundary)
    try:
        check_unchanged(root, stamps, boundary)
    except UnsafeFileError as exc:
        raise _fail(name, str(exc)) from None
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
        if base.slot_modules is not None and module not in base.slot_modules:
            raise _fail(name, f"targets {module}, but this server's adapter slots hold only "
                              f"{', '.join(base.slot_modules)}: --max-loras auto sized them at start-up for the "
                              "modules the adapters registered then target; restart with --lora-target-modules all "
                              "(or list the modules)")
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
        ratio = scale_m / scale
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
        digest=content_digest(cfg, weights, rank, scale),
    )


def content_digest(cfg: dict, weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], rank: int,
                   scale: float) -> str:
    """sha256 (hex) of an adapter's config and of its weights exactly as they will sit in a slot
    (base dtype, per-module scales folded). Computed with the load, on the loader thread; hashlib
    releases the GIL on large buffers, so the step loop keeps running meanwhile."""
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(repr((rank, float(scale))).encode())
    for (layer, module), (a, b) in sorted(weights.items()):
        for part, t in (("A", a), ("B", b)):
            h.update(f"|{layer}.{module}.{part}:{t.dtype}:{tuple(t.shape)}|".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
