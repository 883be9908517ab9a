"""What `loragate serve` prints while starting: load progress and the ready banner (the banner of a
real server, and its curl command run for real, are checked in tests/test_playground.py)."""
from __future__ import annotations

import io
import json
import logging
import shlex

import torch

from loragate.engine import progress
from loragate.startup import BannerInfo, ProgressDisplay, banner, curl_command, display_url

INFO = BannerInfo(version="9.9", url="http://127.0.0.1:8000", base="loragate-demo",
                  adapters=("shout", "reverse"), device="cpu", dtype="float32", needs_key=False, playground=True)


def _curl_args(cmd: str) -> list[str]:
    return shlex.split(cmd.replace("\\\n", " "))


def test_banner_lists_playground_models_and_a_curl():
    text = banner(INFO)
    assert "playground   http://127.0.0.1:8000/" in text
    assert "http://127.0.0.1:8000/v1" in text
    assert "loragate-demo" in text and "shout, reverse" in text
    assert curl_command(INFO) in text
    off = banner(BannerInfo(**{**INFO.__dict__, "playground": False}))
    assert "playground" not in off


def test_curl_is_valid_shell_with_a_json_body_for_the_first_adapter():
    args = _curl_args(curl_command(INFO, message="it's a \"quoted\" message"))
    assert args[:2] == ["curl", "http://127.0.0.1:8000/v1/chat/completions"]
    body = json.loads(args[args.index("-d") + 1])
    assert body == {"model": "shout", "messages": [{"role": "user", "content": "it's a \"quoted\" message"}]}
    assert not any("Authorization" in a for a in args)
    # with keys: a placeholder the shell expands, never a key
    keyed = curl_command(BannerInfo(**{**INFO.__dict__, "needs_key": True}))
    assert '-H "Authorization: Bearer $LORAGATE_API_KEY"' in keyed
    # no adapters: the base model
    bare = _curl_args(curl_command(BannerInfo(**{**INFO.__dict__, "adapters": ()})))
    assert json.loads(bare[bare.index("-d") + 1])["model"] == "loragate-demo"


def test_many_adapters_are_summarised():
    many = BannerInfo(**{**INFO.__dict__, "adapters": tuple(f"a{i}" for i in range(500))})
    text = banner(many)
    assert "a0, a1" in text and "and 492 more" in text and "a499" not in text


def test_display_url_turns_wildcards_into_loopback():
    assert display_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert display_url("::", 80) == "http://127.0.0.1:80"
    assert display_url("::1", 80) == "http://[::1]:80"
    assert display_url("localhost", 1) == "http://localhost:1"


def test_progress_bar_on_a_terminal_and_quarter_lines_elsewhere(caplog):
    out = io.StringIO()
    bar = ProgressDisplay(out, tty=True, min_interval=0.0)
    for done in range(0, 101, 10):
        bar("loading weights", done * 10**7, 10**9)
    text = out.getvalue()
    assert text.count("\r") == 11 and text.endswith("\n") and "100%" in text and "1.0 GB of 1.0 GB" in text

    caplog.set_level(logging.INFO, logger="loragate")
    plain = ProgressDisplay(io.StringIO(), tty=False)
    for done in range(101):
        plain("pinning adapters", done, 100)
    lines = [r.getMessage() for r in caplog.records if "pinning adapters" in r.getMessage()]
    assert lines == [f"pinning adapters: {p}% ({p} of 100)" for p in (0, 25, 50, 75, 100)]
    caplog.clear()
    plain("loading weights", 3 * 10**6, 3 * 10**6)  # a small checkpoint: not worth a log line
    plain("loading weights", 10**8, 2 * 10**9)
    assert [r.getMessage() for r in caplog.records] == ["loading weights: 5% (100.0 MB of 2.0 GB)"]


def test_progress_listeners_are_removable_and_cannot_break_loading(tmp_path):
    from safetensors.torch import save_file

    from loragate.engine.model.loader import read_tensors

    save_file({"a": torch.zeros(100, 10), "b": torch.ones(50)}, str(tmp_path / "model.safetensors"))
    seen: list[tuple[str, int, int]] = []

    def broken(task, done, total):
        raise RuntimeError("a display bug")

    remove = [progress.add_listener(lambda *a: seen.append(a)), progress.add_listener(broken)]
    try:
        tensors = read_tensors(tmp_path)
    finally:
        for r in remove:
            r()
    assert set(tensors) == {"a", "b"}
    assert seen[0][1] == 0 and seen[-1][1] == seen[-1][2] > 0
    assert all(task == "loading weights" for task, _, _ in seen)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    n = len(seen)
    progress.report("loading weights", 1, 1)
    assert len(seen) == n  # removed
