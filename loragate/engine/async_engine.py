"""`AsyncEngine`: the engine's step loop on one dedicated thread, outputs handed to asyncio.

The gateway's coroutines never run model code: `generate()` posts the request to the loop thread
and awaits an asyncio.Queue the thread feeds with `call_soon_threadsafe`. Commands (add, abort,
unregister) are applied by the loop thread between steps, so the engine itself stays
single-threaded. If a step raises, the loop marks the engine dead, fails every open request, and
`/health` turns 503.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loragate.engine.config import EngineConfig
from loragate.engine.engine import Engine
from loragate.engine.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    EngineDeadError,
    QueueFullError,
)
from loragate.engine.outputs import AdapterStats, EngineRequest, EngineStats, LoraState, RequestOutput
from loragate.engine.structured.spec import StructuredSpec

log = logging.getLogger("loragate.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Thread-backed asyncio facade over `Engine` (the interface the gateway programs against)."""

    def __init__(self, config: EngineConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine or Engine(config)
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.model_name = config.served_model_name or Path(config.model).name
        # device, compute dtype and why, CPU abilities and kernel path (shown by /health)
        self.host_info: dict[str, object] = dict(getattr(self.engine, "host_info", {}))
        self.block_size = self.engine.kv.block_size
        self._last_lora_state: LoraState | None = None
        self._cmds: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: str | None = None
        self._stats = self.engine.stats()
        self._pending_unregister: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def start_sync(self) -> None:
        if self._thread is not None:
            return
        if self.engine.adapters is not None:
            self.engine.adapters.on_change = self._wake.set
        self.engine.structured.compiler.on_ready = self._wake.set  # a waiting request's grammar is ready
        self.engine.start()
        self._thread = threading.Thread(target=self._run, name="loragate-engine", daemon=True)
        self._thread.start()

    async def start(self) -> None:
        self.start_sync()

    def shutdown_sync(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.engine.shutdown()  # joins the adapter loader thread
        loop_alive = self._thread is not None and self._thread.is_alive()
        log.info("engine stopped: step loop %s, adapter loader stopped", "still running" if loop_alive else "joined")

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.shutdown_sync)

    # ---- the loop thread -------------------------------------------------------------------
    def _post(self, fn: Callable[[], None]) -> None:
        self._cmds.put(fn)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop:
                self._wake.clear()  # before looking for work, so no wake-up in between is lost
                while True:
                    try:
                        self._cmds.get_nowait()()
                    except queue.Empty:
                        break
                stepped = False
                if self.engine.has_work():
                    outputs = self.engine.step()
                    self._deliver(outputs)
                    stepped = bool(outputs) or bool(self.engine.scheduler.running)
                self._finish_unregisters()
                self._stats = self.engine.stats()
                if not stepped:
                    # idle, or every waiting request needs an adapter still loading: sleep until a
                    # command arrives or the adapter cache reports progress (no busy loop that
                    # would starve the loader thread of the GIL)
                    self._wake.wait(timeout=1.0)
        except BaseException as exc:  # noqa: BLE001 - the loop must report every failure
            self._dead = f"{type(exc).__name__}: {exc}"
            log.error("engine loop died: %s\n%s", self._dead, traceback.format_exc())
            self._fail_all(self._dead)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one call into each event loop per step, not one
        per output. Each call wakes the loop (a write to its self-pipe) and takes a turn of it; at 32
        streams that was 32 wake-ups a step competing with the step's own threads for the cores."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            err = RequestOutput(rid, [], "", finished=True, finish_reason="error", error=message)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, err)
        for waiters in self._pending_unregister.values():
            for loop, fut in waiters:
                loop.call_soon_threadsafe(_set_exc, fut, EngineDeadError(message))

    # ---- requests --------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Submit and stream outputs. Closing the iterator early aborts the request."""
        if self._dead is not None or self._thread is None:
            raise EngineDeadError(self._dead or "engine not started")
        if self._stats.waiting + len(self._streams) >= self.config.max_queue_len:
            raise QueueFullError("too many requests in the queue; retry later")
        if request.adapter and request.adapter in self._pending_unregister:
            raise AdapterNotFoundError(f"adapter {request.adapter!r} is being removed")
        self.engine.check_request(request)  # raises before anything is queued
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            self._streams[request.request_id] = stream
        self._post(lambda: self._add(request))
        finished = False
        try:
            while True:
                out = await stream.queue.get()
                if out.finished:
                    finished = True
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    async def compile_grammar(self, spec: StructuredSpec) -> None:
        """Compile `spec` (or find it in the cache) on the engine's grammar threads; raises
        GrammarError when it is invalid. The gateway awaits this, under its own time limit, before
        submitting a constrained request: a bad grammar becomes a 400 before any engine work, and
        the engine then finds the grammar compiled when it admits the request. Cancelling the wait
        leaves the compile running (and cached) for whoever asks next."""
        await self.engine.structured.compiler.wait(spec)

    def _add(self, request: EngineRequest) -> None:
        try:
            self.engine.add_request(request)
        except Exception as exc:  # noqa: BLE001 - reported to the request, never kills the loop
            # e.g. its adapter was deleted between the caller's check and this command: a 404
            kind = "adapter_not_found" if isinstance(exc, AdapterNotFoundError) else None
            self._deliver([RequestOutput(request.request_id, [], "", finished=True, finish_reason="error",
                                         error=str(exc), error_kind=kind)])

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
        self._post(lambda: self.engine.abort(request_id))

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, alive=self.is_alive)

    async def lora_state(self, timeout: float = 5.0) -> LoraState:
        """The engine's `LoraState`, computed on the loop thread between two steps (the scheduler's
        queues are only consistent there). With no loop running nothing mutates them, so it is read
        directly; a loop that does not answer within `timeout` (a very long step) gets the last
        state it computed."""
        if not self.is_alive:
            return self.engine.lora_state()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def compute() -> None:
            try:
                state = self.engine.lora_state()
            except Exception as exc:  # noqa: BLE001 - reported to the caller, never kills the loop
                loop.call_soon_threadsafe(_set_exc, fut, exc)
            else:
                self._last_lora_state = state
                loop.call_soon_threadsafe(_set_result, fut, state)

        self._post(compute)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            slots = self.engine.lora.max_loras if self.engine.lora is not None else 0
            return self._last_lora_state or LoraState((), (), slots)

    # ---- adapters --------------------------------------------------------------------------
    def prefetch_adapter(self, name: str) -> None:
        """Start moving `name` towards a device slot now, ahead of its first request (the adapter
        cache's loader thread does the work; this only queues it)."""
        if self.engine.adapters is not None and self.has_adapter(name):
            self.engine.adapters.request(name)

    def has_adapter(self, name: str) -> bool:
        return self.engine.adapters is not None and name not in self._pending_unregister \
            and self.engine.registry.exists(name)

    @property
    def adapter_sources(self) -> tuple[str, ...]:
        """Where adapters may come from on this server (`--adapter-source`)."""
        return self.engine.sources.enabled if self.engine.adapters is not None else ()

    def remote_adapter(self, source: str, ref: str, token: str | None = None) -> str:
        """Register the hub/s3 adapter `ref` (no I/O here: the cache's loader fetches it when a
        request needs it) and return its engine name. ValueError for a malformed reference,
        PermissionError for a source that is not enabled."""
        from loragate.engine.adapters.virtual import remote_adapter

        if self.engine.adapters is None:
            raise AdapterLoadError("LoRA is disabled on this server")
        return self.engine.registry.add_virtual(remote_adapter(source, ref, self.engine.sources, token))

    def merged_adapter(self, names: list[str], weights: list[float], strategy: str | None = None,
                       density: float | None = None, majority_sign_method: str | None = None) -> str:
        """Register the merge of adapters `names` (engine names that exist) and return its name;
        it is built by the cache's loader when a request needs it. ValueError naming the field."""
        from loragate.engine.adapters.virtual import merged_adapter

        if self.engine.adapters is None:
            raise AdapterLoadError("LoRA is disabled on this server")
        for n in names:
            if not self.has_adapter(n):
                raise AdapterNotFoundError(f"adapter {n!r} not found")
        spec = merged_adapter(names, weights, strategy, density, majority_sign_method)
        return self.engine.registry.add_virtual(spec)

    def list_adapters(self) -> list[AdapterStats]:
        if self.engine.adapters is None:
            return []
        known = {s.name: s for s in self.engine.adapters.stats()}
        out = []
        for name in self.engine.registry.names():
            if name in known:
                out.append(known[name])
            else:
                path = self.engine.registry.resolve(name) or ""
                out.append(AdapterStats(name, path, "disk", _dir_size(path), None, 0, 0, None))
        return out

    def cached_adapters(self) -> list[AdapterStats]:
        """Only the adapters the cache holds an entry for (no directory listing: cheap to poll)."""
        return self.engine.adapters.stats() if self.engine.adapters is not None else []

    def register_adapter(self, name: str, path: str) -> AdapterStats:
        """Validate the adapter by loading it once, then register it under `name`."""
        from loragate.engine.adapters.peft_loader import load_peft_adapter

        if self.engine.adapters is None:
            raise AdapterLoadError("LoRA is disabled on this server")
        if self.engine.registry.resolve(name) is not None:
            raise ValueError(f"adapter {name!r} already exists")
        loaded = load_peft_adapter(path, name, self.engine.base_info, self.config.max_lora_rank)
        self.engine.registry.register(name, path)
        return AdapterStats(name, str(path), "disk", loaded.nbytes, loaded.rank, 0, 0, None)

    async def unregister_adapter(self, name: str) -> None:
        """Stop routing new requests to `name`, wait for its requests to finish, then free it."""
        if not self.has_adapter(name):
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending_unregister.setdefault(name, []).append((loop, fut))
        self._wake.set()
        await fut

    def _finish_unregisters(self) -> None:
        for name in list(self._pending_unregister):
            if self.engine.adapter_in_use(name):
                continue
            waiters = self._pending_unregister.pop(name)
            err: Exception | None = None
            try:
                if self.engine.adapters is not None:
                    self.engine.adapters.unregister(name)
                self.engine.registry.unregister(name)
            except Exception as exc:  # noqa: BLE001
                err = exc
            for loop, fut in waiters:
                if err is None:
                    loop.call_soon_threadsafe(_set_result, fut, None)
                else:
                    loop.call_soon_threadsafe(_set_exc, fut, err)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _dir_size(path: str) -> int:
    p = Path(path)
    if not p.is_dir():
        return 0
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
