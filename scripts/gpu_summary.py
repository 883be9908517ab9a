"""Print the markdown block scripts/gpu_check.sh ends with (to paste into bench/RESULTS.md) from the
files its parts left in OUTDIR. Tolerates missing or failed parts: each says what happened.

    python scripts/gpu_summary.py OUTDIR
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path


def read(out: Path, name: str) -> str:
    p = out / name
    return p.read_text(errors="replace") if p.exists() else ""


def parts(out: Path) -> dict[str, tuple[int, int]]:
    """part -> (exit status, seconds) from parts.txt ("name rc seconds" lines)."""
    found = {}
    for line in read(out, "parts.txt").splitlines():
        bits = line.split()
        if len(bits) == 3:
            found[bits[0]] = (int(bits[1]), int(bits[2]))
    return found


def status(p: dict, name: str) -> str:
    if name not in p:
        return "not run"
    rc, secs = p[name]
    what = "ok" if rc == 0 else "TIMED OUT" if rc in (124, 137) else f"FAILED (rc {rc})"
    return f"{what}, {secs} s"


def table(text: str, header: str) -> list[str]:
    """The lines of a bench table: the header line starting with `header` and the rows after it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(header):
            rows = [line]
            for nxt in lines[i + 1:]:
                if not nxt.strip() or not re.match(r"\s*\S+\s+[-\d.]", nxt):
                    break
                rows.append(nxt)
            return rows
    return []


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")
    p = parts(out)
    env = read(out, "env.txt").strip().splitlines() if p.get("env", (1, 0))[0] == 0 else []
    print("\n===== summary: paste into bench/RESULTS.md =====\n")
    print(f"### GPU check {time.strftime('%Y-%m-%d')}: {env[0] if env else '(the env part failed: see env.txt)'}")
    for line in env[1:]:
        print(f"    {line}")
    tests = read(out, "tests.txt").strip().splitlines()
    last = tests[-1] if tests else "(no output)"
    print(f"- tests/test_cuda.py + tests/test_kernels.py in ONE pytest process (compiled kernels for CUDA tensors, "
          f"the interpreter for CPU ones, whatever the order): {last.strip('= ')} [{status(p, 'tests')}]")
    failed = [t for t in tests if t.startswith("FAILED") or t.startswith("ERROR")]
    for t in failed[:8]:
        print(f"    {t[:160]}")
    try:
        s = json.loads(read(out, "startup.json"))
    except ValueError:
        s = None
    print(f"- start-up (bench/gpu_startup.py, SmolLM-135M shape bf16, 8 rank-8 q/v adapters in an adapter dir, "
          f"default flags) [{status(p, 'startup')}]")
    if s:
        for phase, label in (("cold", "empty Triton cache"), ("cached", "Triton cache kept")):
            r = s["starts"].get(phase, {})
            if "error" in r:
                print(f"    {phase}: failed: {r['error'].strip().splitlines()[-1][:200] if r['error'].strip() else '?'}")
                continue
            if not r:
                continue
            print(f"    {phase} ({label}): engine init {r['init_s']:.1f} s; self-check {r['check_s'] or 0:.2f} s; "
                  f"warm-up {r['warm_launches']} launches {r['warm_s'] or 0:.2f} s; first adapter request "
                  f"{r['first_ms']:.0f} ms, second adapter {r['second_ms']:.0f} ms, again {r['repeat_ms']:.0f} ms")
        r = s["starts"].get("cached") or s["starts"].get("cold") or {}
        if "plan" in r:
            print(f"    --max-loras auto: {r['plan']}; KV cache {r['kv_blocks']} blocks ({r['kv_gib']:.1f} GiB)")
        for q in s.get("llama8b", []):
            what = q.get("error") or f"{q['slots']} slots x {q['slot_mib']:.1f} MiB ({q['limited_by']})"
            print(f"    Llama-3-8B bf16 on this GPU, {q['case']}: {what}")
    for name, title, header in (("bench_engine", "bench/engine.py (decode step, no LoRA)", "batch"),
                                ("bench_adapters", "bench/adapters.py", None)):
        text = read(out, f"{name}.txt")
        print(f"- {title} [{status(p, name)}]")
        if header:
            for line in table(text, header):
                print(f"    {line}")
        else:
            for line in text.splitlines():
                if line.startswith("#") or not line.strip():
                    continue
                print(f"    {line}")
    print("\n===== end of summary =====")


if __name__ == "__main__":
    main()
