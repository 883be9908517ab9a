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
from loragate.gateway.errors import APIError, bad_request, from_engine_error, internal_error
from loragate.gateway.routing import ModelTarget
from loragate.gateway.streaming import DONE, sse

log = logging.getLogger("loragate.gateway")


SLOW_READER_SECONDS = 2.0
_END = object()  # a choice's outputs are complete
_FAILED = object()  # `fail()` was called: the consumer raises the stored error


class Generation:
    """n engine requests run together: `start()` submits them and waits for each first output
    (the engine raises its errors at or before the first yield, so they become proper HTTP
    statuses before any response byte is sent); `events()` yields (choice index, output);
    `fail(err)` ends it early with an error (client gone, shutdown deadline, slow reader);
    `aclose()` aborts whatever is unfinished.

    One pump task per engine request moves its outputs into a shared queue as they arrive, so
    the engine side never waits on the client. A client that stops reading (more than
    `max_stream_buffer` outputs per choice wait, and the consumer, stuck in a send, asks for none of
    them within SLOW_READER_SECONDS) makes the response fail and its engine requests abort, instead of letting outputs pile
    up in server memory. A consumer that keeps reading but formats slower than a tiny model
    generates is not a slow reader: its backlog is bounded by max_tokens. Admission checks run
    first, in order: shutting down (503), too many choices (400), the gateway's in-flight bound
    (429), the waiting bound (503), the key's own limits (429)."""

    def __init__(self, ctx: GatewayContext, target: ModelTarget, requests: list[EngineRequest],
                 record: RequestRecord) -> None:
        self.ctx = ctx
        self.target = target
        self.requests = requests
        self.record = record
        self._agens: list[Any] = []
        self._early: list[tuple[int, Any]] = []  # items start() consumed, replayed by events()
        self._tasks: list[asyncio.Task] = []
        self._watch: asyncio.Task | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._failure: APIError | None = None
        self._last: list[float | None] = [None] * len(requests)
        self._finished = [False] * len(requests)
        self._completion = [0] * len(requests)
        self._acquired = False
        self._waiting = 0
        self._quota = False
        self._taken = asyncio.Event()  # set whenever the consumer asks for an output

    def _admit(self) -> None:
        ctx, settings, n = self.ctx, self.ctx.settings, len(self.requests)
        if ctx.draining:
            raise shutting_down(settings.retry_after_seconds)
        if n > settings.max_choices:
            raise bad_request(f"this request asks for {n} generations (prompts x n); at most "
                              f"{settings.max_choices} are allowed", "n", "too_many_choices")
        limit = settings.max_concurrent_requests
        if limit is not None and ctx.inflight + n > limit:
            raise _queue_full_error(settings.retry_after_seconds)
        if settings.max_waiting is not None and ctx.waiting + n > settings.max_waiting:
            raise APIError(503, "the server is overloaded: too many requests are waiting; retry later",
                           "server_error", None, "server_overloaded",
                           {"Retry-After": str(settings.retry_after_seconds)})
        prompt_tokens = sum(len(r.prompt_token_ids) for r in self.requests)
        self._quota = ctx.quotas.admit(self.record.principal, prompt_tokens, settings.retry_after_seconds)
        ctx.inflight += n
        self._acquired = True
        ctx.generations.add(self)

    async def start(self) -> None:
        self._admit()
        n = len(self.requests)
        self.ctx.waiting += n
        self._waiting = n
        try:
            for req in self.requests:
                self._agens.append(self.ctx.engine.generate(req))
            self._tasks = [asyncio.create_task(self._pump(i)) for i in range(n)]
            if self.record.receive is not None:
                self._watch = asyncio.create_task(self._watch_disconnect(self.record.receive))
            pending = set(range(n))
            while pending:
                self._taken.set()
                i, item = await self._queue.get()
                if item is _FAILED:
                    raise self._failure
                if isinstance(item, BaseException):
                    raise item
                if item is _END and i in pending:
                    raise APIError(500, "engine ended the request without output", "server_error")
                if isinstance(item, RequestOutput) and item.finished and item.finish_reason == "error":
                    raise output_error(item)  # e.g. its adapter failed to load: a 400, not a stream
                pending.discard(i)
                self._early.append((i, item))
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, Exception):
                mapped = from_engine_error(exc, self.ctx.settings.retry_after_seconds)
                if mapped is not None:
                    raise mapped from None
            raise
        finally:
            self._done_waiting()

    def _done_waiting(self) -> None:
        self.ctx.waiting -= self._waiting
        self._waiting = 0

    async def _pump(self, i: int) -> None:
        """Engine outputs of choice i -> the queue; past the buffer bound the response fails."""
        limit = self.ctx.settings.max_stream_buffer * len(self.requests)
        try:
            async for out in self._agens[i]:
                self._queue.put_nowait((i, out))
                if self._queue.qsize() > limit and not await self._consumer_takes_within(SLOW_READER_SECONDS):
                    self.fail(APIError(408, "the client is not reading the response fast enough; the request "
                                       "was aborted", "invalid_request_error", None, "client_too_slow"))
                    await self._agens[i].aclose()  # aborts this choice's engine request now
                    return
            self._queue.put_nowait((i, _END))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            self._queue.put_nowait((i, exc))

    async def _consumer_takes_within(self, seconds: float) -> bool:
        """Past the buffer bound, wait (this choice's pump pauses) until the consumer asks for its
        next output. The clock starts here, with the event loop running, not at the consumer's last
        ask: a loop that stalled (a loaded host, a long GC) delivers a step's backlog at once, and
        that must not read as a client that stopped reading."""
        self._taken.clear()
        try:
            await asyncio.wait_for(self._taken.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def _watch_disconnect(self, receive) -> None:
        """Fail the generation as soon as the client disconnects (also while it is still waiting for
        its first token), so the engine frees its KV blocks and slot within one step."""
        with suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
            self.fail(client_gone())

    def fail(self, err: APIError) -> None:
        """End this generation with `err`: the consumer raises it at its next output, and the engine
        requests are aborted now (cancelling a pump closes its engine stream, which aborts it)."""
        if self._failure is not None or not self._acquired:
            return
        self._failure = err
        self._queue.put_nowait((-1, _FAILED))
        me = asyncio.current_task()
        for t in self._tasks:
            if t is not me:  # a pump that fails the generation closes its own stream
                t.cancel()

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        done = [False] * len(self.requests)
        early, self._early = self._early, []
        while not all(done):
            self._taken.set()
            i, item = early.pop(0) if early else await self._queue.get()
            if item is _FAILED:
                raise self._failure
            if item is _END:
                done[i] = True
            elif isinstance(item, BaseException):
                raise item
            elif not done[i]:
                done[i] = item.finished
                yield i, self._observe(i, item)

    def watch_client(self, receive) -> None:
        """Start watching for the client's disconnect, if `start()` could not (no receive channel
        on the record)."""
        if self._watch is None and self._acquired:
            self._watch = asyncio.create_task(self._watch_disconnect(receive))

    def _observe(self, i: int, out: RequestOutput) -> RequestOutput:
        m, label, now = self.ctx.metrics, self.target.label, time.monotonic()
        if out.new_token_ids:
            if self._last[i] is None:
                m.ttft.labels(label).observe(now - self.record.start)
            else:
                m.itl.labels(label).observe(now - self._last[i])
            self._last[i] = now
        self._completion[i] = max(self._completion[i], out.completion_tokens)
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
            tasks = [*self._tasks, *([self._watch] if self._watch is not None else [])]
            self._tasks, self._watch = [], None
            for t in tasks:
                t.cancel()
            for t in tasks:
                with suppress(BaseException):
                    await t
            for agen in self._agens:
                with suppress(Exception):
                    await agen.aclose()
            self._agens = []
        self._done_waiting()
        if self._acquired:
            self._acquired = False
            self.ctx.inflight -= len(self.requests)
            self.ctx.generations.discard(self)
            if self._quota:
                self._quota = False
                self.ctx.quotas.release(self.record.principal, sum(self._completion))


def shutting_down(retry_after: int) -> APIError:
    return APIError(503, "the server is shutting down; retry on another instance", "server_error", None,
                    "server_shutting_down", {"Retry-After": str(retry_after)})


def client_gone() -> APIError:
    return APIError(499, "client closed the request", "invalid_request_error", None, "client_disconnected")


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
    if out.error_kind == "adapter_load":
        return bad_request(f"adapter could not be loaded: {out.error}", "model", "adapter_load_error")
    if out.error_kind == "adapter_not_found":  # deleted while the request was being submitted
        return APIError(404, out.error or "adapter not found", "invalid_request_error", "model", "model_not_found")
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

    The client may give up while we generate: the generation watches the connection (the ASGI
    receive channel yields `http.disconnect` once the body is read), and on disconnect the engine
    requests are aborted at once, so their KV blocks and adapter slot are freed within a step
    instead of generating to the end for nobody.
    """
    gen.watch_client(request.receive)
    try:
        async for _ in checked_outputs(gen, states):
            pass
    except APIError:
        raise
    except Exception as exc:
        raise classify(exc) from exc
    finally:
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
        if isinstance(exc, APIError) and exc.code == "client_disconnected":
            rec.outcome = "aborted"
            return
        rec.outcome = "error"
        yield sse(classify(exc).body())
        yield DONE
    finally:
        await gen.aclose()
