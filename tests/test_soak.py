"""The soak (scripts/soak.py) as CI runs it: 60 seconds of 64 streams over many adapters on a real
`loragate serve`, with disconnects, adapter churn, a corrupt adapter folder and malformed requests;
the script's own checks (no unexpected status, greedy outputs equal their references, idle engine,
bounded memory, fds and threads back) decide, and its report is printed."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_60_seconds(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--duration", "60", "--json",
                          "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=REPO)
    start = out.stdout.find("{")
    assert start != -1, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout[start:])
    print(json.dumps(report, indent=2))
    assert out.returncode == 0 and report["failures"] == [], report
    classes = report["classes"]
    assert classes.get("disconnect", 0) > 0 and classes.get("400 adapter_load_error", 0) > 0
    assert classes.get("admin register 200", 0) > 0 and classes.get("admin delete 200", 0) > 0
    assert report["greedy_completed_and_checked"] > 100
