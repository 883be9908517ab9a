"""What can be checked about the container without Docker: the Dockerfile installs a C compiler
(Triton builds a C launcher per kernel; the runtime base image has none), runs as a non-root user,
has a HEALTHCHECK on /health, passes no stray arguments to the entrypoint, and every file it copies
exists and is not excluded by .dockerignore. scripts/docker_smoke.sh builds and runs the real thing
where Docker and a GPU are present (not in CI); here it is only syntax-checked."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def test_installs_a_c_compiler_before_anything_runs_triton():
    runs = [args for inst, args in instructions() if inst == "RUN"]
    installs = [r for r in runs if re.search(r"\b(apt-get|apt|apk|dnf|yum|microdnf) (-\S+ )*install\b", r)]
    assert installs, "no package install in the Dockerfile"
    packages = set(shlex.split(" ".join(installs)))
    assert packages & {"gcc", "build-essential", "clang"}, "no C compiler for Triton's launchers"
    assert packages & {"g++", "build-essential", "clang"}, "no C++ compiler for the native CPU kernels"
    assert any("rm -rf /var/lib/apt/lists" in r for r in installs), "apt lists left in the image"


def test_runs_as_a_non_root_user():
    users = [args for inst, args in instructions() if inst == "USER"]
    assert users, "no USER: the server would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    insts = instructions()
    last_user = max(i for i, (inst, _) in enumerate(insts) if inst == "USER")
    last_install = max(i for i, (inst, args) in enumerate(insts) if inst == "RUN" and "install" in args)
    assert last_user > last_install, "USER must come after the installs (which need root)"


def test_healthcheck_probes_health_on_the_served_port():
    checks = [args for inst, args in instructions() if inst == "HEALTHCHECK"]
    assert len(checks) == 1 and "CMD" in checks[0]
    assert "/health" in checks[0]
    exposed = {a for inst, args in instructions() if inst == "EXPOSE" for a in args.split()}
    port = re.search(r"127\.0\.0\.1:(\d+)/health", checks[0]).group(1)
    assert port in exposed
    entry = json.loads(next(args for inst, args in instructions() if inst == "ENTRYPOINT"))
    assert entry[entry.index("--port") + 1] == port


def test_entrypoint_and_cmd_are_exec_form():
    """A trailing comment after CMD's JSON turns it into shell form, which the exec-form ENTRYPOINT
    then receives as arguments ("/bin/sh -c ..."): the demo would not start."""
    for inst in ("ENTRYPOINT", "CMD"):
        args = next(a for i, a in instructions() if i == inst)
        assert isinstance(json.loads(args), list), f"{inst} is not exec (JSON) form: {args!r}"


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel, p.removeprefix("**/")) for p in patterns)


def test_every_copied_file_exists_and_is_not_dockerignored():
    ignore = ROOT / ".dockerignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")] \
        if ignore.exists() else []
    copies = [args for inst, args in instructions() if inst in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert not any(p.startswith("--from") for p in shlex.split(args)), "multi-stage copies not expected"
        for src in parts[:-1]:
            path = ROOT / src
            assert path.exists(), f"COPY source {src!r} does not exist"
            assert not _ignored(src.rstrip("/"), patterns), f"COPY source {src!r} is excluded by .dockerignore"
    # what `pip install .` needs is among the copied files
    copied = {p for args in copies for p in shlex.split(args)[:-1]}
    assert {"pyproject.toml", "README.md"} <= copied and any(c.rstrip("/") == "loragate" for c in copied)


def test_demo_weights_are_checked_at_build():
    runs = " ".join(args for inst, args in instructions() if inst == "RUN")
    assert "pip install ." in runs and "demo_paths()" in runs


def test_smoke_script_is_valid_bash():
    script = ROOT / "scripts" / "docker_smoke.sh"
    assert script.is_file()
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    res = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
