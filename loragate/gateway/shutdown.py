"""Graceful shutdown: SIGTERM drains the server instead of cutting requests off.

On the first SIGTERM (or SIGINT):
1. `/health` answers 503 at once (load balancers stop routing here) and every new inference
   request is refused with 503 + Retry-After (`Generation.start` checks `ctx.draining`); the
   listening socket stays open meanwhile so those answers can be given.
2. In-flight requests and streams run to their end, for up to `shutdown_timeout` seconds.
3. Whatever is still running then ends with a 503 error: a stream gets an error event and
   `data: [DONE]`, a non-streaming request the error response.
4. uvicorn stops listening, closes idle connections and runs the app's lifespan shutdown, which
   stops the engine's step loop and the adapter loader thread; the process exits 0.

A second signal during the drain stops at once (uvicorn's own behaviour).
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

from loragate.gateway.context import GatewayContext
from loragate.gateway.generation import shutting_down

log = logging.getLogger("loragate.gateway")

_POLL = 0.05  # seconds between looks at the in-flight set while draining


async def drain(ctx: GatewayContext, timeout: float) -> None:
    """Refuse new work, let in-flight generations finish for up to `timeout` s, then end the rest."""
    ctx.draining = True
    log.info("draining: %d request(s) in flight, up to %.1fs to finish", len(ctx.generations), timeout)
    deadline = time.monotonic() + timeout
    while ctx.generations and time.monotonic() < deadline:
        await asyncio.sleep(_POLL)
    if ctx.generations:
        log.warning("shutdown timeout: ending %d request(s) still in flight", len(ctx.generations))
        for gen in list(ctx.generations):
            gen.fail(shutting_down(ctx.settings.retry_after_seconds))
        end = time.monotonic() + 5.0  # the responses write their error and close
        while ctx.generations and time.monotonic() < end:
            await asyncio.sleep(_POLL)
    log.info("drained")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the app (see module docstring)."""

    def __init__(self, config: uvicorn.Config, ctx: GatewayContext, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._loop is None or self._signalled:
            super().handle_exit(sig, frame)  # not serving yet, or a second signal: stop now
            self.force_exit = self._signalled
            return
        self._signalled = True
        # not recorded in _captured_signals: uvicorn would re-raise it after a clean stop and the
        # process would die of the signal instead of exiting 0
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.ctx, self.shutdown_timeout)
        finally:
            self.should_exit = True


def draining_server(app, host: str, port: int, log_level: str, shutdown_timeout: float) -> DrainingServer:
    """The server `loragate serve` runs: `app` until SIGTERM/SIGINT, then drained. Its `serve()`
    coroutine runs it in a caller's event loop (the CLI's start-up banner watches it from there)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=10)
    return DrainingServer(config, app.state.ctx, shutdown_timeout)
