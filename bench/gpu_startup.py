"""Start-up on a device: the kernel self-check and Triton warm-up (with an empty Triton cache, then
with the cache the first start left), the adapter slots `--max-loras auto` sizes from memory, and
the first adapter requests after start-up.

Each start runs in a fresh process (`--child`), the way a server starts: SmolLM-135M-shaped random
base (bf16), an adapter dir of 8 random rank-8 q/v adapters, every other flag at its default
(`--max-loras auto`, `--adapter-memory-fraction 0.1`, `--max-lora-rank 64`). Then, without
allocating anything, the slot counts the same rule gives a Llama-3-8B on this device's memory.
Imports only the engine and kernels (no gateway), so it runs on a bare GPU image.

    python -m bench.gpu_startup [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from bench.common import CACHE, machine, smollm_checkpoint, write_random_adapters

N_ADAPTERS = 8
PROMPT, NEW = 70, 10
LLAMA8B_WEIGHTS = 16_060_522_496  # Llama-3-8B in bf16: 8.03e9 parameters x 2 bytes


def child(args: argparse.Namespace) -> None:
    """One server-like start; prints one JSON line."""
    from bench.adapters import prompt, run_one
    from loragate.engine.config import EngineConfig
    from loragate.engine.engine import Engine
    from loragate.engine.outputs import EngineRequest
    from loragate.engine.sampling_params import SamplingParams

    t = time.perf_counter()
    engine = Engine(EngineConfig(model=args.base, dtype="bfloat16", device=args.device, adapter_dir=args.adapter_dir))
    init = time.perf_counter() - t
    engine.start()
    k, p = engine.kernels, engine.slot_plan
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)

    def ms(adapter: str, seed: int) -> float:
        return 1e3 * run_one(engine, EngineRequest(uuid.uuid4().hex, prompt(vocab, seed), params, adapter=adapter))

    names = sorted(engine.registry.names())
    first, second, repeat = ms(names[0], 1), ms(names[1], 2), ms(names[0], 3)
    engine.shutdown()
    kv = engine.kv.allocator.num_blocks * engine.kv.spec.bytes_per_block()
    print(json.dumps({
        "machine": machine(), "init_s": init, "check_s": k.seconds if k else None, "warm_s": k.warm_seconds if k else None,
        "warm_launches": k.warm_launches if k else 0, "kernels": k.summary() if k else "",
        "slots": p.max_loras, "slot_mib": p.bytes_per_slot / 2**20, "limited_by": p.limited_by,
        "groups": list(p.groups), "budget_gib": (p.budget_bytes or 0) / 2**30, "free_gib": (p.free_bytes or 0) / 2**30,
        "plan": p.describe(), "kv_blocks": engine.kv.allocator.num_blocks, "kv_gib": kv / 2**30,
        "first_ms": first, "second_ms": second, "repeat_ms": repeat,
    }), flush=True)


def llama8b_plans(device: torch.device) -> list[dict]:
    """What `auto` gives an 8B Llama on this device (pure arithmetic; nothing allocated)."""
    from loragate.engine.adapters.slots import plan_slots
    from loragate.engine.memory import available_bytes
    from loragate.engine.model.lora import GROUPS, group_specs

    free = available_bytes(device) - LLAMA8B_WEIGHTS
    if free <= 0:
        return [{"case": "any", "error": f"{available_bytes(device) / 2**30:.1f} GiB free: less than the weights"}]
    specs = group_specs(4096, 4096, 1024, 14336)
    out = []
    for label, groups, rank in (("q/v adapters, --max-lora-rank 16", ("qkv",), 16),
                                ("q/v adapters, --max-lora-rank 64", ("qkv",), 64),
                                ("all-module adapters, --max-lora-rank 64", GROUPS, 64)):
        try:
            p = plan_slots(specs, 32, torch.bfloat16, rank, groups, "auto", 0.1, free, 0, True)
            out.append({"case": label, "slots": p.max_loras, "slot_mib": p.bytes_per_slot / 2**20,
                        "limited_by": p.limited_by, "free_gib": free / 2**30})
        except ValueError as exc:
            out.append({"case": label, "error": str(exc)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per start at most")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    base = smollm_checkpoint("bfloat16")
    adapter_dir = CACHE / "startup-adapters-r8-qv"
    write_random_adapters(base, adapter_dir, N_ADAPTERS, rank=8, targets=("q_proj", "v_proj"))
    # the machine line comes from the first start: asking torch here would open a CUDA context in
    # this process, and the starts would see that much less memory free
    print(f"# bench/gpu_startup.py  {time.strftime('%Y-%m-%d')}  device={args.device}")
    results: dict = {"device": args.device, "machine": None, "starts": {}}

    def save() -> None:  # after every step: a timeout later keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    # empty, so the first start compiles: $TRITON_CACHE_DIR when that is empty (scripts/gpu_check.sh
    # sets one, so the parts after this one find the kernels compiled), else a new directory
    named = os.environ.get("TRITON_CACHE_DIR")
    if named and (not Path(named).exists() or not any(Path(named).iterdir())):
        triton_cache = named
    else:
        triton_cache = tempfile.mkdtemp(prefix="loragate-triton-cache-")
    env = {**os.environ, "TRITON_CACHE_DIR": triton_cache, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    for phase in ("cold", "cached"):
        cmd = [sys.executable, "-m", "bench.gpu_startup", "--child", "--device", args.device, "--base", str(base),
               "--adapter-dir", str(adapter_dir)]
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{phase}: timed out after {args.timeout:.0f} s")
            results["starts"][phase] = {"error": "timeout"}
            save()
            continue
        lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
        if res.returncode != 0 or not lines:
            print(f"{phase}: failed (rc {res.returncode})\n{res.stderr[-3000:]}")
            results["starts"][phase] = {"error": res.stderr[-3000:]}
            save()
            continue
        r = results["starts"][phase] = json.loads(lines[-1])
        if results["machine"] is None:
            results["machine"] = r["machine"]
            print(f"# {r['machine']}")
        print(f"\n{phase} start ({'empty Triton cache' if phase == 'cold' else 'Triton cache of the first start'}): "
              f"engine init {r['init_s']:.2f} s")
        print(f"  {r['kernels']}")
        print(f"  LoRA: {r['plan']}")
        print(f"  KV cache: {r['kv_blocks']} blocks, {r['kv_gib']:.2f} GiB")
        print(f"  first adapter request {r['first_ms']:.0f} ms, second adapter {r['second_ms']:.0f} ms, "
              f"first adapter again {r['repeat_ms']:.0f} ms  ({PROMPT}-token prompt + {NEW} new tokens)")
        save()
    # after the starts, so that this process's own CUDA context did not shrink what they saw free
    try:
        results["llama8b"] = llama8b_plans(torch.device(args.device))
    except Exception as exc:  # noqa: BLE001 - the starts above are the main result
        results["llama8b"] = [{"case": "any", "error": f"{type(exc).__name__}: {exc}"}]
    save()
    print("\n--max-loras auto for a Llama-3-8B on this device (memory left after 16.1 GB of bf16 weights, "
          "--adapter-memory-fraction 0.1, nothing allocated):")
    for p in results["llama8b"]:
        if "error" in p:
            print(f"  {p['case']}: {p['error']}")
        else:
            print(f"  {p['case']}: {p['slots']} slots x {p['slot_mib']:.1f} MiB ({p['limited_by']}; "
                  f"{p['free_gib']:.1f} GiB free after the weights)")


if __name__ == "__main__":
    main()
