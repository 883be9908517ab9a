"""The adapter tiers: disk (the source) -> a CPU LRU bounded in bytes -> a fixed set of device slots.

The step loop only ever asks cheap questions (`slot_of`, `error_of`) and flips counters (`acquire`,
`release`); it never waits on disk or on a slot write. One background loader thread does all the
slow work: it reads and validates adapters from disk, keeps recent ones in the CPU tier, and copies
them into device slots. A slot is only written while nobody uses it: the loader picks a slot with
refcount 0 that is neither pinned, nor being written, nor freshly loaded and not yet used, marks it
loading (so `slot_of` answers None for
both the evicted and the incoming adapter) and only then releases the lock and writes. When every
slot is busy the adapter waits in the CPU tier until `release()` frees one.

A freshly written adapter is protected from eviction until its first `acquire()` or until
`fresh_grace` seconds pass. Without it, two adapters competing for the last slot would evict each
other the moment each finished loading, before the step loop could ever admit either; the time
limit only guards against an adapter whose waiting requests were all aborted holding a slot forever.

One lock (inside a Condition) guards all state; it is never held during disk I/O or `write_slot`.
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from loragate.engine.adapters.peft_loader import BaseModelInfo, LoadedAdapter, load_peft_adapter
from loragate.engine.adapters.registry import AdapterRegistry
from loragate.engine.adapters.virtual import RemoteAdapter
from loragate.engine.adapters.virtual import build as build_virtual
from loragate.engine.errors import AdapterLoadError
from loragate.engine.model.lora import LoraWeights
from loragate.engine.outputs import AdapterStats

# entry states; `pending` holds entries in QUEUED/READING/STAGED or with a recheck to do
DISK, QUEUED, READING, STAGED, WRITING, DEVICE, FAILED = (
    "disk", "queued", "reading", "staged", "writing", "device", "failed")


@dataclass
class _Entry:
    """One adapter's place in the tiers, its use counters and load history."""

    name: str
    path: str = ""
    state: str = DISK
    slot: int | None = None  # set only while state == DEVICE
    staged: LoadedAdapter | None = None  # held from the disk read until written into a slot
    refcount: int = 0
    pinned: bool = False
    requests_served: int = 0
    load_count: int = 0
    last_load_seconds: float | None = None
    read_seconds: float = 0.0
    last_used: int = 0
    fresh_until: float | None = None  # protected from eviction until first acquire or this time
    size_bytes: int = 0
    rank: int | None = None
    error: str | None = None
    source_sig: tuple | None = None  # what the failed load read; a change allows a retry
    recheck: bool = False
    digest: str | None = None  # content digest of what sits in the slot (set with it)


def _source_signature(path: str | None) -> tuple | None:
    """Identity of the adapter's files (path, names, sizes, mtimes): changes when someone fixes it."""
    if path is None:
        return None
    try:
        files = []
        for fname in sorted(os.listdir(path)):
            st = os.stat(os.path.join(path, fname))
            files.append((fname, st.st_size, st.st_mtime_ns))
        return (path, tuple(files))
    except OSError:
        return (path, None)


class AdapterCache:
    """Moves adapters up the tiers ahead of need and hands the step loop ready device slots."""

    def __init__(self, registry: AdapterRegistry, weights: LoraWeights, base: BaseModelInfo, max_cpu_bytes: int,
                 max_rank: int, pinned: Iterable[str] = (), fresh_grace: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.weights = weights
        self.base = base
        self.max_cpu_bytes = int(max_cpu_bytes)
        self.max_rank = int(max_rank)
        self.fresh_grace = float(fresh_grace)
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._entries: dict[str, _Entry] = {}
        self._pending: OrderedDict[str, None] = OrderedDict()  # FIFO of adapters with loader work
        self._cpu: OrderedDict[str, LoadedAdapter] = OrderedDict()  # LRU, most recent last
        self._cpu_bytes = 0
        self._slot_owner: list[str | None] = [None] * weights.max_loras
        self._slot_loading: list[bool] = [False] * weights.max_loras
        self._tick = 0
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # called (from the loader thread) after every load step, so an idle step loop waiting for
        # an adapter wakes at once instead of polling
        self.on_change: Callable[[], None] | None = None
        for name in pinned:
            self._entry(name).pinned = True

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loader, name="loragate-adapter-loader", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    # ---- the step loop's side (never blocks on I/O) -------------------------------------------
    def request(self, name: str) -> None:
        """A request for `name` is queued: schedule disk -> cpu -> slot once, however many wait."""
        with self._cond:
            e = self._entry(name)
            if e.state == FAILED:
                if not e.recheck:  # the loader checks whether the source changed since it failed
                    e.recheck = True
                    self._pending[name] = None
            elif e.state == DEVICE:
                e.last_used = self._next_tick()  # demand keeps it from being the LRU victim
                return
            elif e.state == DISK:
                e.state = QUEUED
                self._pending[name] = None
            else:
                return  # already on its way
            self._cond.notify_all()

    def slot_of(self, name: str) -> int | None:
        with self._cond:
            e = self._entries.get(name)
            return e.slot if e is not None and e.state == DEVICE else None

    def acquire(self, name: str) -> int:
        """A request starts running on the adapter's slot; the slot cannot be evicted until release."""
        with self._cond:
            e = self._entries.get(name)
            if e is None or e.state != DEVICE or e.slot is None:
                raise RuntimeError(f"adapter {name!r} is not resident in a device slot")
            e.refcount += 1
            e.fresh_until = None
            e.requests_served += 1
            e.last_used = self._next_tick()
            return e.slot

    def release(self, name: str) -> None:
        with self._cond:
            e = self._entries.get(name)
            if e is None or e.refcount <= 0:
                raise RuntimeError(f"release of adapter {name!r} without a matching acquire")
            e.refcount -= 1
            e.last_used = self._next_tick()
            if e.refcount == 0:
                self._cond.notify_all()  # a load waiting for a slot may proceed

    def digest_of(self, name: str) -> str | None:
        """Content digest of the adapter in `name`'s device slot (None unless resident): the prefix
        cache's identity for it. Stable while a request holds the slot (acquire)."""
        with self._cond:
            e = self._entries.get(name)
            return e.digest if e is not None and e.state == DEVICE else None

    def error_of(self, name: str) -> str | None:
        with self._cond:
            e = self._entries.get(name)
            return e.error if e is not None else None

    # ---- admin ------------------------------------------------------------------------------
    def pin(self, name: str) -> None:
        """Keep `name`'s device slot once loaded: it is never chosen as an eviction victim."""
        with self._cond:
            self._entry(name).pinned = True

    def unregister(self, name: str) -> None:
        """Drop `name` from every tier. Call only when no running request uses it."""
        with self._cond:
            e = self._entries.get(name)
            if e is None:
                return
            if e.refcount > 0:
                raise RuntimeError(f"adapter {name!r} is still used by {e.refcount} running request(s)")
            del self._entries[name]
            self._pending.pop(name, None)
            self._cpu_drop(name)
            if e.state == DEVICE and e.slot is not None:
                self._slot_owner[e.slot] = None
                self.weights.clear_slot(e.slot)
            # a READING/WRITING entry is finished off by the loader, which sees it is gone
            self._cond.notify_all()

    def stats(self) -> list[AdapterStats]:
        with self._cond:
            return [self._stat(e) for e in self._entries.values()]

    def wait_idle(self, timeout: float = 30) -> bool:
        """Test helper: True once the loader has nothing it could do now (work blocked on a busy slot
        does not count, or a test holding slots would wait forever)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._stopping or (not self._busy and self._find_job() is None),
                                       timeout)

    @property
    def cpu_bytes(self) -> int:
        with self._cond:
            return self._cpu_bytes

    def cpu_names(self) -> list[str]:
        """CPU-tier adapters, least recently used first."""
        with self._cond:
            return list(self._cpu)

    # ---- internals (lock held) ---------------------------------------------------------------
    def _entry(self, name: str) -> _Entry:
        e = self._entries.get(name)
        if e is None:
            e = self._entries[name] = _Entry(name)
        return e

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _stat(self, e: _Entry) -> AdapterStats:
        if e.state == FAILED:
            tier = "failed"
        elif e.state == DEVICE:
            tier = "device"
        elif e.state in (QUEUED, READING, STAGED, WRITING):
            tier = "loading"
        elif e.name in self._cpu:
            tier = "cpu"
        else:
            tier = "disk"
        return AdapterStats(e.name, e.path, tier, e.size_bytes, e.rank, e.requests_served, e.load_count,
                            e.last_load_seconds, e.pinned, e.error)

    def _cpu_drop(self, name: str) -> None:
        old = self._cpu.pop(name, None)
        if old is not None:
            self._cpu_bytes -= old.nbytes

    def _cpu_put(self, loaded: LoadedAdapter) -> None:
        """Keep `loaded` in the CPU tier, evicting least recently used ones to stay within budget.
        An adapter bigger than the whole budget passes through without being kept."""
        self._cpu_drop(loaded.name)
        if loaded.nbytes > self.max_cpu_bytes:
            return
        while self._cpu and self._cpu_bytes + loaded.nbytes > self.max_cpu_bytes:
            _, old = self._cpu.popitem(last=False)
            self._cpu_bytes -= old.nbytes
        self._cpu[loaded.name] = loaded
        self._cpu_bytes += loaded.nbytes

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used resident slot nobody uses and nobody pinned."""
        best: tuple[int, int] | None = None
        now = self._clock()
        for slot, owner in enumerate(self._slot_owner):
            if self._slot_loading[slot]:
                continue
            if owner is None:
                return slot
            e = self._entries.get(owner)
            if e is None or e.state != DEVICE or e.refcount > 0 or e.pinned:
                continue
            if e.fresh_until is not None and now < e.fresh_until:
                continue
            if best is None or e.last_used < best[0]:
                best = (e.last_used, slot)
        return None if best is None else best[1]

    def _find_job(self) -> tuple | None:
        """The first pending adapter the loader can make progress on now (pure: no state changes)."""
        for name in self._pending:
            e = self._entries[name]
            if e.recheck:
                return ("recheck", e)
            if e.state == QUEUED:
                return ("stage", e) if name in self._cpu else ("read", e)
            if e.state == STAGED:
                slot = self._free_slot()
                if slot is not None:
                    return ("write", e, slot)
        return None

    # ---- the loader thread --------------------------------------------------------------------
    def _loader(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._stopping and (job := self._find_job()) is None:
                    self._cond.wait(self._until_fresh_expires())
                if self._stopping:
                    return
                self._busy = True
                kind, e = job[0], job[1]
                if kind == "stage":  # CPU tier hit: no I/O needed
                    self._cpu.move_to_end(e.name)
                    e.staged, e.read_seconds, e.state = self._cpu[e.name], 0.0, STAGED
                elif kind == "read":
                    e.state = READING
                elif kind == "write":
                    self._begin_write(e, job[2])
                else:
                    e.recheck = False
            try:
                if kind == "read":
                    self._read(e)
                elif kind == "write":
                    self._write(e, job[2])
                elif kind == "recheck":
                    self._recheck(e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                if self.on_change is not None:
                    self.on_change()

    def _signature(self, name: str, depth: int = 0) -> tuple | None:
        """What a load of `name` reads: files for a local adapter, a retry window for a remote one,
        the parts' signatures for a merge. A failed load is retried once this changes."""
        spec = self.registry.virtual(name)
        if spec is None:
            return _source_signature(self.registry.resolve(name))
        if isinstance(spec, RemoteAdapter):
            return spec.signature(self._clock())
        if depth > 8:
            return None
        return ("merge", tuple(self._signature(c, depth + 1) for c in spec.components))

    def _component(self, name: str) -> LoadedAdapter:
        """A part of a merge (loader thread): from the CPU tier, else loaded and kept there."""
        with self._cond:
            hit = self._cpu.get(name)
            if hit is not None:
                self._cpu.move_to_end(name)
                return hit
        spec = self.registry.virtual(name)
        if spec is not None:
            loaded = build_virtual(spec, name, self.base, self.max_rank, self._component)
        else:
            path = self.registry.resolve(name)
            if path is None:
                raise AdapterLoadError(f"adapter {name!r} not found")
            loaded = load_peft_adapter(path, name, self.base, self.max_rank)
        with self._cond:
            self._cpu_put(loaded)
        return loaded

    def _current(self, e: _Entry) -> bool:
        return self._entries.get(e.name) is e

    def _fail(self, e: _Entry, msg: str, sig: tuple | None) -> None:
        e.state, e.error, e.source_sig, e.staged = FAILED, msg, sig, None
        self._pending.pop(e.name, None)

    def _read(self, e: _Entry) -> None:
        """Disk (or a remote source, or a merge) -> CPU, outside the lock."""
        t0 = time.perf_counter()
        spec = self.registry.virtual(e.name)
        path = self.registry.resolve(e.name) if spec is None else ""
        sig = self._signature(e.name)
        loaded: LoadedAdapter | None = None
        err: str | None = None
        if path is None:
            err = f"adapter {e.name!r} not found"
        else:
            try:
                if spec is not None:
                    loaded = build_virtual(spec, e.name, self.base, self.max_rank, self._component)
                else:
                    loaded = load_peft_adapter(path, e.name, self.base, self.max_rank)
            except Exception as exc:  # noqa: BLE001 - any failure is reported to the waiting requests
                err = str(exc) or type(exc).__name__
        seconds = time.perf_counter() - t0
        with self._cond:
            if not self._current(e):
                return  # unregistered while reading
            e.path = path or e.path
            if loaded is None:
                self._fail(e, err or "load failed", sig)
                return
            e.staged, e.read_seconds, e.state = loaded, seconds, STAGED
            e.size_bytes, e.rank = loaded.nbytes, loaded.rank
            self._cpu_put(loaded)

    def _begin_write(self, e: _Entry, slot: int) -> None:
        """Claim `slot` for `e` (lock held): the victim stops being resident before any byte moves."""
        victim = self._slot_owner[slot]
        if victim is not None:
            ve = self._entries.get(victim)
            if ve is not None and ve.slot == slot:
                ve.slot, ve.state = None, DISK
        self._slot_owner[slot] = e.name
        self._slot_loading[slot] = True
        self._pending.pop(e.name, None)
        e.state = WRITING

    def _write(self, e: _Entry, slot: int) -> None:
        """CPU -> device slot, outside the lock (the slot is marked loading, so nobody reads it)."""
        loaded = e.staged
        assert loaded is not None
        t0 = time.perf_counter()
        err: str | None = None
        try:
            self.weights.write_slot(slot, loaded.weights, loaded.rank, loaded.scale)
        except Exception as exc:  # noqa: BLE001
            err = f"adapter {e.name!r}: writing the device slot failed ({exc})"
        seconds = time.perf_counter() - t0
        with self._cond:
            self._slot_loading[slot] = False
            if err is not None or not self._current(e):
                self._slot_owner[slot] = None
                self.weights.clear_slot(slot)
                if err is not None and self._current(e):
                    self._fail(e, err, None)
                return
            e.slot, e.state, e.staged, e.digest = slot, DEVICE, None, loaded.digest or None
            e.load_count += 1
            e.last_load_seconds = e.read_seconds + seconds
            e.last_used = self._next_tick()
            e.fresh_until = self._clock() + self.fresh_grace

    def _until_fresh_expires(self) -> float | None:
        """Seconds until the next fresh protection lapses (a waiting load may then take its slot)."""
        now = self._clock()
        ends = [e.fresh_until for e in self._entries.values()
                if e.state == DEVICE and e.fresh_until is not None and e.fresh_until > now]
        if not ends or not any(self._entries[n].state == STAGED for n in self._pending):
            return None  # lapsed protections need no timer: only release()/request() can help now
        return min(ends) - now + 1e-3

    def _recheck(self, e: _Entry) -> None:
        """A failed adapter was requested again: retry only if its source changed (registry or files)."""
        sig = self._signature(e.name)
        with self._cond:
            if not self._current(e) or e.state != FAILED:
                return
            if sig != e.source_sig:
                e.state, e.error, e.source_sig = QUEUED, None, None
                self._pending[e.name] = None
            else:
                self._pending.pop(e.name, None)
