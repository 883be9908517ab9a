"""What `loragate serve` shows while it starts: load progress, then a banner once it is ready.

Progress comes from `loragate.engine.progress` reports (checkpoint bytes read) and from the adapter
tiers (pinned adapters reaching the device). On a terminal it is one redrawn bar per task; anywhere
else (a log file, CI) it is a plain log line at every quarter, so logs stay readable.

The banner is printed only after the HTTP server accepts connections: the playground URL, the base
model and adapter names, and a curl command for one adapter that works when pasted (with an
`$LORAGATE_API_KEY` placeholder when the server needs a key; keys are never printed).
"""
from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from loragate import __version__

log = logging.getLogger("loragate")

EXAMPLE_MESSAGE = "Hello, how are you?"
MAX_LISTED_ADAPTERS = 8


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class ProgressDisplay:
    """A `progress.add_listener` callback: a redrawn bar on a terminal, quarter-step log lines
    otherwise. Redraws are throttled so a report per tensor costs nothing visible."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, width: int = 28,
                 min_interval: float = 0.1, min_logged_bytes: int = 100 * 10**6) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.min_interval = min_interval
        self.min_logged_bytes = min_logged_bytes  # a small checkpoint loads too fast to be worth log lines
        self._last_draw: dict[str, float] = {}
        self._last_quarter: dict[str, int] = {}

    def __call__(self, task: str, done: int, total: int) -> None:
        unit = "bytes" if task == "loading weights" else "items"
        fraction = 1.0 if total <= 0 else min(1.0, done / total)
        if self.tty:
            self._draw(task, done, total, fraction, unit)
        elif unit != "bytes" or total >= self.min_logged_bytes:
            quarter = int(fraction * 4)
            if quarter > self._last_quarter.get(task, -1):
                self._last_quarter[task] = quarter
                log.info("%s: %d%% (%s)", task, round(fraction * 100), self._amount(done, total, unit))

    @staticmethod
    def _amount(done: int, total: int, unit: str) -> str:
        if unit == "bytes":
            return f"{_human_bytes(done)} of {_human_bytes(total)}"
        return f"{done} of {total}"

    def _draw(self, task: str, done: int, total: int, fraction: float, unit: str) -> None:
        now = time.monotonic()
        finished = fraction >= 1.0
        if not finished and now - self._last_draw.get(task, 0.0) < self.min_interval:
            return
        if self._last_draw.get(task) == -1.0:  # already drew the finished bar
            return
        self._last_draw[task] = -1.0 if finished else now
        filled = round(fraction * self.width)
        bar = "█" * filled + "░" * (self.width - filled)
        line = f"\r  {task:<18} {bar} {fraction:4.0%}  {self._amount(done, total, unit)}"
        self.stream.write(line + ("\n" if finished else ""))
        self.stream.flush()


@dataclass(frozen=True)
class BannerInfo:
    """What the banner says; built by the CLI from its configs and the started engine."""

    version: str
    url: str  # e.g. http://127.0.0.1:8000
    base: str
    adapters: tuple[str, ...]
    device: str
    dtype: str
    needs_key: bool
    playground: bool


def display_url(host: str, port: int) -> str:
    """A URL a browser on this machine can open: wildcard binds are shown as the loopback."""
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def curl_command(info: BannerInfo, message: str = EXAMPLE_MESSAGE) -> str:
    """A chat completion request for the first adapter (else the base), ready to paste into a shell."""
    model = info.adapters[0] if info.adapters else info.base
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": message}]})
    parts = [f"curl {info.url}/v1/chat/completions", "-H 'Content-Type: application/json'"]
    if info.needs_key:
        parts.append('-H "Authorization: Bearer $LORAGATE_API_KEY"')
    parts.append(f"-d {shlex.quote(body)}")
    return " \\\n      ".join(parts)


def banner(info: BannerInfo) -> str:
    """The ready banner, as printed."""
    names = list(info.adapters[:MAX_LISTED_ADAPTERS])
    more = len(info.adapters) - len(names)
    adapters = ", ".join(names) + (f" and {more} more" if more > 0 else "") if names else "(none yet)"
    lines = [
        "",
        f"  loragate {info.version} is ready",
        "",
    ]
    if info.playground:
        lines.append(f"  playground   {info.url}/")
    lines += [
        f"  API          {info.url}/v1  (OpenAI-compatible{'; needs an API key' if info.needs_key else ''})",
        f"  base model   {info.base}  ({info.device}, {info.dtype})",
        f"  adapters     {adapters}",
        "",
        "  try it:",
        "    " + curl_command(info),
        "",
    ]
    return "\n".join(lines)


def pinned_progress(engine, names: tuple[str, ...], timeout: float = 600.0, poll: float = 0.2):
    """Coroutine: report pinned adapters reaching the device tier until all have (or failed), so
    the banner comes after them. Bounded by `timeout`; the loads themselves run on the adapter
    cache's own thread, this only looks."""

    async def run() -> None:
        if not names:
            return
        wanted = set(names)
        deadline = time.monotonic() + timeout
        from loragate.engine import progress

        while time.monotonic() < deadline:
            stats = {a.name: a for a in engine.list_adapters() if a.name in wanted}
            settled = sum(1 for a in stats.values() if a.tier == "device" or a.error)
            progress.report("pinning adapters", settled, len(wanted))
            if settled >= len(wanted):
                return
            await asyncio.sleep(poll)
        log.warning("pinned adapters still loading after %.0f s; serving anyway", timeout)

    return run()


def banner_info(engine, cfg, port: int) -> BannerInfo:
    """The banner's facts from the started AsyncEngine and the CLI's ServeConfig."""
    inner = getattr(engine, "engine", None)
    return BannerInfo(
        version=__version__,
        url=display_url(cfg.host, port),
        base=engine.model_name,
        adapters=tuple(a.name for a in engine.list_adapters()),
        device=str(getattr(inner, "device", cfg.engine.device)),
        dtype=str(getattr(inner, "dtype", cfg.engine.dtype)).replace("torch.", ""),
        needs_key=bool(cfg.gateway.api_keys or cfg.gateway.api_keys_file),
        playground=bool(getattr(cfg.gateway, "playground", True)),
    )


def _bound_port(server, default: int) -> int:
    """The port the server really listens on (differs from the configured one for port 0)."""
    for s in getattr(server, "servers", None) or []:
        for sock in getattr(s, "sockets", None) or []:
            return sock.getsockname()[1]
    return default


async def serve_and_announce(server, engine, cfg, on_ready=None, out: TextIO | None = None) -> None:
    """Run a `uvicorn.Server`; once it accepts connections (and pinned adapters are on the device),
    call `on_ready()` and print the banner. Returns when the server stops."""
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        await pinned_progress(engine, tuple(getattr(cfg.engine, "pin_adapters", ())))
        if on_ready is not None:
            on_ready()
        text = banner(banner_info(engine, cfg, _bound_port(server, cfg.port)))
        print(text, file=out or sys.stdout, flush=True)
    await task
