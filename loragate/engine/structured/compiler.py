"""`GrammarCompiler`: compiles specs on worker threads, never on the step loop, and caches them.

`submit(spec)` returns a `concurrent.futures.Future` at once: the cached one when the spec was
seen before (an LRU keyed by the spec, i.e. by the grammar text; failures are cached too, so a bad
schema sent again is refused without recompiling), else a new compile job. The backend itself
(llguidance's view of the vocabulary, ~1 s to build for a 128k vocabulary) is built by the first
job, on the worker thread as well. `on_ready` is called from the worker when a job finishes, so the
engine loop can wake up and admit the requests that waited for it.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from loragate.engine.structured.backend import Grammar, GrammarBackend, GrammarError
from loragate.engine.structured.spec import StructuredSpec


class GrammarCompiler:
    def __init__(self, make_backend: Callable[[], GrammarBackend], capacity: int = 512, workers: int = 2) -> None:
        self._make_backend = make_backend
        self._backend: GrammarBackend | None = None
        self._backend_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loragate-grammar")
        self._cache: OrderedDict[StructuredSpec, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.on_ready: Callable[[], None] | None = None
        self.hits = 0
        self.misses = 0
        self.last_compile_seconds: float | None = None

    @property
    def backend(self) -> GrammarBackend:
        """The backend, built on first use (by a compile job in practice: no sequence has a
        matcher before its grammar compiled, so the step loop never pays for this)."""
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None:
                    self._backend = self._make_backend()
        return self._backend

    def submit(self, spec: StructuredSpec) -> Future:
        """A future of the compiled `Grammar` (raises GrammarError when the spec is invalid)."""
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None and not fut.cancelled():
                self._cache.move_to_end(spec)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec] = fut
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)  # holders of an evicted future keep it alive
        fut.add_done_callback(self._notify)
        return fut

    async def wait(self, spec: StructuredSpec) -> None:
        """Await `spec`'s compile (submitted now, or found in the cache) from an event loop; raises
        GrammarError when it is invalid. Cancelling the wait (the caller's time limit) leaves the
        compile running and cached for whoever asks next."""
        inner = asyncio.wrap_future(self.submit(spec))
        inner.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, never logged
        await asyncio.shield(inner)

    def compile_now(self, spec: StructuredSpec) -> Grammar:
        """Compile on the calling thread, bypassing the cache (benchmarks and tests)."""
        return self._compile(spec)

    def _compile(self, spec: StructuredSpec) -> Grammar:
        t = time.perf_counter()
        try:
            spec.validate()
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        grammar = self.backend.compile(spec)
        self.last_compile_seconds = time.perf_counter() - t
        return grammar

    def _notify(self, _: Future) -> None:
        if self.on_ready is not None:
            self.on_ready()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
