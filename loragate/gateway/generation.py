"""`Generation` runs a response's n engine requests and streams their outputs while observing
metrics; `collect` and `sse_events` turn them into a whole response or an OpenAI SSE stream, with
errors mapped to API errors and client disconnects aborting the engine work."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, suppress
from typing import Any

import anyio
from fastapi import Request

from loragate.engine.outputs import EngineRequest, RequestOutput
from loragate.gateway.context import GatewayContext, RequestRecord
from loragate.gateway.errors import APIError, from_engine_error, internal_error
from loragate.gateway.routing import ModelTarget
from loragate.gateway.streaming import DONE, sse

log = logging.getLogger("loragate.gateway")


class Generation:
    """n engine requests run together: `start()` submits them and waits for each first output
    (the engine raises its errors at or before the first yield, so they become proper HTTP
    statuses before any response byte is sent); `events()` yields (choice index, output);
    `aclose()` aborts whatever is unfinished."""

    def __init__(self, ctx: GatewayContext, target: ModelTarget, requests: list[EngineRequest],
                 record: RequestRecord) -> None:
        self.ctx = ctx
        self.target = target
        self.requests = requests
        self.record = record
        self._agens: list[Any] = []
        self._first: list[RequestOutput] = []
        self._tasks: list[asyncio.Task] = []
        self._last: list[float | None] = [None] * len(requests)
        self._finished = [False] * len(requests)
        self._acquired = False

    async def start(self) -> None:
        limit = self.ctx.settings.max_concurrent_requests
        if limit is not None and self.ctx.inflight + len(self.requests) > limit:
            raise _queue_full_error(self.ctx.settings.retry_after_seconds)
        self.ctx.inflight += len(self.requests)
        self._acquired = True
        try:
            for req in self.requests:
                agen = self.ctx.engine.generate(req)
                self._agens.append(agen)
                self._first.append(await agen.__anext__())
                if self._first[-1].finished and self._first[-1].finish_reason not in ("stop", "length"):
                    raise output_error(self._first[-1])  # e.g. its adapter failed to load: a status
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, StopAsyncIteration):
                raise APIError(500, "engine ended the request without output", "server_error") from None
            if isinstance(exc, Exception):
                mapped = from_engine_error(exc, self.ctx.settings.retry_after_seconds)
                if mapped is not None:
                    raise mapped from None
            raise

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        if len(self._agens) == 1:
            yield 0, self._observe(0, self._first[0])
            if not self._first[0].finished:
                async for out in self._agens[0]:
                    yield 0, self._observe(0, out)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                await queue.put((i, self._first[i]))
                if not self._first[i].finished:
                    async for out in self._agens[i]:
                        await queue.put((i, out))
                await queue.put((i, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, exc))

        self._tasks = [asyncio.create_task(pump(i)) for i in range(len(self._agens))]
        remaining = len(self._agens)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, self._observe(i, item)

    def _observe(self, i: int, out: RequestOutput) -> RequestOutput:
        m, label, now = self.ctx.metrics, self.target.label, time.monotonic()
        if out.new_token_ids:
            if self._last[i] is None:
                m.ttft.labels(label).observe(now - self.record.start)
            else:
                m.itl.labels(label).observe(now - self._last[i])
            self._last[i] = now
        if out.finished and not self._finished[i]:
            self._finished[i] = True
            m.e2e.labels(label).observe(now - self.record.start)
            if out.queue_time is not None:
                m.queue_time.labels(label).observe(max(out.queue_time, 0.0))
            adapter = self.target.adapter or ""
            m.prompt_tokens.labels(adapter).inc(out.prompt_tokens)
            m.generation_tokens.labels(adapter).inc(out.completion_tokens)
            m.adapter_requests.labels(adapter).inc()
        return out

    async def aclose(self) -> None:
        """Idempotent; shielded so that a cancelled response still aborts its engine requests."""
        with anyio.CancelScope(shield=True):
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with suppress(BaseException):
                    await t
            self._tasks = []
            for agen in self._agens:
                with suppress(Exception):
                    await agen.aclose()
            self._agens = []
        if self._acquired:
            self._acquired = False
            self.ctx.inflight -= len(self.requests)


def _queue_full_error(retry_after: int) -> APIError:
    return APIError(429, "too many requests in flight; retry later", "rate_limit_error", None,
                    "rate_limit_exceeded", {"Retry-After": str(retry_after)})


def classify(exc: Exception, retry_after: int = 1) -> APIError:
    """The APIError for an exception caught after the response was committed to a path; anything
    unexpected is logged with its traceback and reported as a bare 500 (internals stay private)."""
    mapped = from_engine_error(exc, retry_after)
    if mapped is None:
        log.error("unexpected error during generation", exc_info=exc)
        return internal_error()
    return mapped


def output_error(out: RequestOutput) -> APIError:
    """A request that ended in error/abort rather than stop/length."""
    if getattr(out, "error_code", None) == "adapter_load_failed":
        return APIError(400, f"adapter could not be loaded: {out.error}", "invalid_request_error", "model",
                        "adapter_load_error")
    if out.finish_reason == "abort":
        return APIError(500, out.error or "request was aborted by the server", "server_error", None, "aborted")
    return APIError(500, out.error or "generation failed", "server_error", None, "generation_error")


async def checked_outputs(gen: Generation, states: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Each engine output as (choice index, output), already added to its choice's state; an
    output that ended in error or abort raises the matching APIError instead."""
    async with aclosing(gen.events()) as events:
        async for i, out in events:
            if out.finished and out.finish_reason not in ("stop", "length"):
                raise output_error(out)
            states[i].add(out)
            yield i, out


async def collect(gen: Generation, states: list, request: Request) -> None:
    """Gather every output of a non-streaming response into `states` (one per choice).

    The client may give up while we generate: a task watches the connection (the ASGI receive
    channel yields `http.disconnect` once the body is read), and on disconnect the engine
    requests are aborted at once, so their KV blocks and adapter slot are freed within a step
    instead of generating to the end for nobody.
    """

    async def consume() -> None:
        async for _ in checked_outputs(gen, states):
            pass

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.create_task(consume())
    watch = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise APIError(499, "client closed the request", "invalid_request_error", None, "client_disconnected")
        work.result()
    except APIError:
        raise
    except Exception as exc:
        raise classify(exc) from exc
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)
        await gen.aclose()


async def sse_events(gen: Generation, states: list, rec: RequestRecord, opening: list[bytes],
                     render: Callable[[int, RequestOutput], list[bytes]],
                     final_usage: Callable[[], bytes] | None) -> AsyncIterator[bytes]:
    """The OpenAI stream shared by chat and completions: the opening chunks, `render`'s chunks
    for each engine output, a usage chunk when asked for, then `[DONE]`. An error mid-stream is
    sent as an error event followed by `[DONE]`; a client that goes away (the generator is
    cancelled or closed) aborts the engine requests."""
    try:
        for c in opening:
            yield c
        async for i, out in checked_outputs(gen, states):
            for c in render(i, out):
                yield c
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        if final_usage is not None:
            yield final_usage()
        yield DONE
    except BaseException as exc:
        rec.completion_tokens = sum(s.completion_tokens for s in states)
        if not isinstance(exc, Exception):  # cancelled / closed: the client went away
            rec.outcome = "aborted"
            raise
        rec.outcome = "error"
        yield sse(classify(exc).body())
        yield DONE
    finally:
        await gen.aclose()
