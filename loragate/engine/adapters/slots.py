"""How many adapter slots to allocate, and for which projection groups (`--max-loras auto`).

A slot holds one adapter's A and B for every layer, at `--max-lora-rank`, for each projection group
(q|k|v, o, gate|up, down) that some adapter may target. Its size is therefore set by the model's
shapes, the rank limit and the targets, and the slot count by how much memory adapters may take:
`--adapter-memory-fraction` of the memory left on the device after the weights (LoRAX has the same
knob). With an 8B Llama in bf16, a slot for rank-16 q/v adapters is ~19 MB (the whole q|k|v group),
so a large GPU holds hundreds to a thousand adapters beside a large KV cache, where a fixed 16
would leave that memory unused. The KV cache gets what is left of its own budget.

Everything here is a pure function of shapes and numbers, so the sizing is tested without a device;
`scan_adapters` is the one reader (each start-up adapter's adapter_config.json, for its targets and
rank).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from loragate.engine.model.lora import GROUPS, MODULE_TO_GROUP, LoraGroupSpec

# Slot-count cap when more adapters may arrive after start-up (an adapter dir, the admin API): past
# a thousand resident adapters the CPU tier and the loader serve the rest, and the per-step
# bookkeeping is linear in the slot count.
AUTO_MAX_LORAS = 1024
ALL_MODULES = tuple(MODULE_TO_GROUP)


class SlotSizingError(ValueError):
    """The flags leave no room for even one adapter slot; the message says which to change."""


@dataclass(frozen=True)
class StartupAdapters:
    """What the adapters registered at start-up need from the slots."""

    count: int
    modules: frozenset[str] | None  # PEFT module names they target; None when some could not be read
    ranks: tuple[int, ...]


def _config_targets(cfg: dict) -> tuple[frozenset[str] | None, int | None]:
    targets = cfg.get("target_modules")
    modules: frozenset[str] | None = None
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        leaves = frozenset(t.split(".")[-1] for t in targets)
        modules = leaves & frozenset(ALL_MODULES) if leaves else None
    elif targets == "all-linear":
        modules = frozenset(ALL_MODULES)
    # a regex string (or anything else) could match any module: unknown
    rank = cfg.get("r")
    ranks = [rank] + list((cfg.get("rank_pattern") or {}).values()) if isinstance(cfg.get("rank_pattern") or {}, dict) \
        else [rank]
    ints = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool) and r > 0]
    return modules, (max(ints) if ints else None)


def scan_adapters(paths: Iterable[str]) -> StartupAdapters:
    """Targets and ranks of the adapters at `paths` (their adapter_config.json only). An adapter
    whose config cannot be read makes the targets unknown; its own load reports why later."""
    count, modules, ranks = 0, set(), []
    known = True
    for path in paths:
        count += 1
        try:
            with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            known = False
            continue
        if not isinstance(cfg, dict):
            known = False
            continue
        mods, rank = _config_targets(cfg)
        if mods is None:
            known = False
        else:
            modules |= mods
        if rank is not None:
            ranks.append(rank)
    return StartupAdapters(count, frozenset(modules) if known else None, tuple(ranks))


def groups_for(modules: Iterable[str]) -> tuple[str, ...]:
    """The projection groups (in model order) that hold these PEFT modules."""
    wanted = {MODULE_TO_GROUP[m][0] for m in modules}
    return tuple(g for g in GROUPS if g in wanted)


def parse_target_modules(text: str) -> str | tuple[str, ...]:
    """`--lora-target-modules`: "auto", "all", or a comma-separated list of PEFT module names."""
    value = text.strip()
    if value in ("auto", "all"):
        return value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if n not in MODULE_TO_GROUP]
    if not names or bad:
        raise ValueError(f"--lora-target-modules takes auto, all, or names among {', '.join(ALL_MODULES)}; "
                         f"got {text!r}")
    return names


def slot_groups(target_modules: str | tuple[str, ...], auto_count: bool, startup: StartupAdapters) -> tuple[str, ...]:
    """Which groups the slots hold. Explicit modules win; `auto` narrows to the start-up adapters'
    targets only when the count is sized by memory (`--max-loras auto`) and those targets are known."""
    if isinstance(target_modules, tuple):
        return groups_for(target_modules)
    if target_modules == "auto" and auto_count and startup.count and startup.modules:
        return groups_for(startup.modules)
    return GROUPS


def slot_bytes(specs: Mapping[str, LoraGroupSpec], groups: Iterable[str], num_layers: int, max_rank: int,
               dtype: torch.dtype) -> int:
    """Bytes of one slot: per layer and group, A [slices, rank, in] and B [out, rank]."""
    elem = torch.finfo(dtype).bits // 8
    per_layer = sum((len(specs[g].slice_out) * specs[g].in_dim + specs[g].out_dim) * max_rank for g in groups)
    return per_layer * num_layers * elem


@dataclass(frozen=True)
class SlotPlan:
    """The decision and the numbers behind it (logged at start-up, shown by /v1/adapters)."""

    max_loras: int
    bytes_per_slot: int
    groups: tuple[str, ...]
    auto: bool
    limited_by: str  # memory | adapters | cap | fixed
    free_bytes: int | None = None  # device memory left after the weights
    budget_bytes: int | None = None  # the adapters' share of it

    @property
    def total_bytes(self) -> int:
        return self.max_loras * self.bytes_per_slot

    def describe(self) -> str:
        slots = f"{self.max_loras} adapter slots x {self.bytes_per_slot / 2**20:.2f} MiB = {self.total_bytes / 2**20:.1f} MiB"
        groups = f"groups {'|'.join(self.groups)}"
        if not self.auto:
            return f"{slots} ({groups}; --max-loras {self.max_loras})"
        why = {"memory": "limited by memory", "adapters": "one per adapter registered at start-up",
               "cap": f"capped at {AUTO_MAX_LORAS}"}[self.limited_by]
        return (f"{slots} ({groups}; --max-loras auto: {why}; adapter budget {self.budget_bytes / 2**20:.1f} MiB "
                f"of {self.free_bytes / 2**20:.1f} MiB free after the weights)")


def plan_slots(specs: Mapping[str, LoraGroupSpec], num_layers: int, dtype: torch.dtype, max_rank: int,
               groups: Iterable[str], requested: int | str, fraction: float, free_bytes: int,
               startup_count: int, open_registration: bool, cap: int = AUTO_MAX_LORAS) -> SlotPlan:
    """The slot count: `requested` when it is a number, else as many slots as `fraction` of
    `free_bytes` holds, at most one per start-up adapter when no more can arrive (no adapter dir,
    no admin registration) and at most `cap`; at least one."""
    groups = tuple(groups)
    per = slot_bytes(specs, groups, num_layers, max_rank, dtype)
    if requested != "auto":
        n = int(requested)
        if n < 1:
            raise ValueError(f"--max-loras must be at least 1 or auto, got {requested!r}")
        return SlotPlan(n, per, groups, False, "fixed")
    if not 0 < fraction < 1:
        raise ValueError(f"--adapter-memory-fraction must be in (0, 1), got {fraction}")
    budget = int(max(0, free_bytes) * fraction)
    by_memory = budget // per if per else cap
    limits = {"memory": by_memory, "cap": cap}
    if not open_registration:
        limits["adapters"] = max(1, startup_count)
    n = max(1, min(limits.values()))
    limited_by = next(k for k in ("adapters", "memory", "cap") if limits.get(k) == n) if n > 1 or by_memory >= 1 \
        else "memory"
    if by_memory < 1:
        raise SlotSizingError(
            f"--adapter-memory-fraction {fraction} of the {free_bytes / 2**20:.0f} MiB left after the weights is "
            f"{budget / 2**20:.1f} MiB, less than one adapter slot ({per / 2**20:.1f} MiB at --max-lora-rank "
            f"{max_rank}, groups {'|'.join(groups)}): raise the fraction, lower --max-lora-rank, or pass "
            "--max-loras N")
    return SlotPlan(n, per, groups, True, limited_by, free_bytes, budget)


def plan_for_engine(config, specs: Mapping[str, LoraGroupSpec], num_layers: int, dtype: torch.dtype, registry,
                    free_bytes: int) -> tuple[SlotPlan, StartupAdapters]:
    """The engine's slot plan from its config (EngineConfig) and the adapters registered at start-up
    (the registry's names then: --adapter flags and what --adapter-dir holds)."""
    paths = [p for p in (registry.resolve(n) for n in registry.names()) if p]
    startup = scan_adapters(paths)
    auto = config.max_loras == "auto"
    targets = config.lora_target_modules
    if isinstance(targets, str) and targets not in ("auto", "all"):
        targets = parse_target_modules(targets)
    groups = slot_groups(tuple(targets) if isinstance(targets, (list, tuple)) else targets, auto, startup)
    open_registration = config.adapter_dir is not None or bool(config.allowed_adapter_dirs)
    plan = plan_slots(specs, num_layers, dtype, config.max_lora_rank, groups, config.max_loras,
                      config.adapter_memory_fraction, free_bytes, startup.count, open_registration)
    return plan, startup


def slot_modules(plan: SlotPlan) -> tuple[str, ...] | None:
    """The PEFT modules the slots hold, or None when they hold every group."""
    if set(plan.groups) == set(GROUPS):
        return None
    return tuple(m for m in ALL_MODULES if MODULE_TO_GROUP[m][0] in plan.groups)
