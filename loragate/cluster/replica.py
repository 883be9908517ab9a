"""`EngineReplica`: one `AsyncEngine` in a Ray Serve replica.

Adapter requests arrive with Ray Serve's multiplexed model id set to the adapter's name and go
through the `@serve.multiplexed` loader, which is how Ray's router learns that this replica holds
the adapter. What the replica reports is the engine's own adapter cache, not Ray's guess: the
loader keeps no LRU of its own (`max_num_models_per_replica=-1`) and, every `report_interval`
seconds, the replica rewrites Ray's per-replica model set to the adapters its engine can serve
without reading disk (in a device slot, loading into one, or in the CPU tier), so an adapter the
engine dropped stops attracting requests and one it holds keeps attracting them. Counting the CPU
tier keeps an adapter on the replica that first took it while slots churn (measured in
bench/scaleout.py: with device slots alone, an evicted adapter's next request goes to a random
replica and most adapters end up loaded on both). Ray Serve has no public call for "this replica
now holds exactly these models"; the rewrite uses its multiplexing wrapper's model table and push
flag, in one function below (`sync_ray_view`).

The same report goes to the `ClusterState` board, where the ingress reads per-replica state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import ray
from ray import serve

from loragate.cluster.logs import setup_logging
from loragate.cluster.report import ReplicaReport
from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.engine.errors import AdapterNotFoundError
from loragate.engine.outputs import EngineRequest, RequestOutput

log = logging.getLogger("loragate.cluster")

# where `@serve.multiplexed` keeps its per-instance state (set on first use)
_MULTIPLEX_WRAPPER_ATTR = "__serve_multiplex_wrapper"
HELD_TIERS = ("device", "loading", "cpu")  # what a replica tells Ray's router it holds


class AdapterRef:
    """What Ray's multiplexing keeps per model id: only the name. The weights live in the engine's
    adapter cache, which decides what stays resident."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def sync_ray_view(owner: object, held: set[str]) -> tuple[str, ...] | None:
    """Make Ray's multiplexed-model table of this replica equal `held` and ask Ray to push it to
    the routers if it changed. Returns the table's keys, or None when no adapter request has
    created the table yet. Raises AttributeError if Ray's internals no longer look as expected."""
    wrapper = getattr(owner, _MULTIPLEX_WRAPPER_ATTR, None)
    if wrapper is None:
        return None
    models = wrapper.models
    if set(models) != held:
        for name in [n for n in models if n not in held]:
            del models[name]
        for name in sorted(held.difference(models)):
            models[name] = AdapterRef(name)
        wrapper._push_multiplexed_replica_info = True
    return tuple(sorted(models))


class EngineReplica:
    """Serves `generate` for the ingress and reports its state (see the module docstring)."""

    async def __init__(self, engine_config: EngineConfig, state, report_interval: float = 0.25,
                       log_level: str = "info") -> None:
        setup_logging(log_level)
        self.engine = AsyncEngine(engine_config)
        self.engine.start_sync()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self._state = state
        self._interval = report_interval
        self._sync_broken = False
        self._ray_view: tuple[str, ...] = ()
        self._task = asyncio.get_running_loop().create_task(self._report_loop())

    @serve.multiplexed(max_num_models_per_replica=-1)
    async def _adapter(self, name: str) -> AdapterRef:
        """Ray's loader for a multiplexed model id: checks the adapter exists and queues it for a
        device slot (the engine's loader thread does the work; nothing waits here)."""
        if not self.engine.has_adapter(name):
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        self.engine.prefetch_adapter(name)
        return AdapterRef(name)

    async def generate(self, request: EngineRequest) -> AsyncIterator[str | RequestOutput]:
        """Stream one request: this replica's id first (the ingress counts where requests ran),
        then the engine's outputs. Engine errors raise before anything is yielded; cancelling the
        call (the client went away) aborts the request in the engine."""
        if request.adapter and serve.get_multiplexed_model_id() == request.adapter:
            await self._adapter(request.adapter)
        # arrival times are monotonic clocks: the ingress's is not comparable with this process's
        request = dataclasses.replace(request, arrival_time=time.monotonic())
        outputs = self.engine.generate(request)
        try:
            first = await outputs.__anext__()
            yield self.replica_id
            yield first
            if not first.finished:
                async for out in outputs:
                    yield out
        finally:
            await outputs.aclose()

    def whoami(self) -> str:
        """This replica's id. Called with a multiplexed model id it tells where Ray's router sends
        that adapter now, without loading anything (`RemoteEngine.locate`)."""
        return self.replica_id

    def check_health(self) -> None:
        """Ray's periodic health check: a replica whose engine loop died is replaced."""
        if not self.engine.is_alive:
            raise RuntimeError("the engine's step loop is not running")

    async def report(self) -> ReplicaReport:
        """This replica's state now; aligns Ray's view of its adapters with the engine's on the way."""
        adapters = tuple(self.engine.cached_adapters())
        held = {a.name for a in adapters if a.tier in HELD_TIERS}
        if not self._sync_broken:
            try:
                view = sync_ray_view(self, held)
                self._ray_view = view if view is not None else ()
            except AttributeError as exc:  # a Ray version whose multiplexing internals moved
                self._sync_broken = True
                log.warning("cannot align Ray's multiplexed model view with the adapter cache (%s); "
                            "Ray's own view is used", exc)
        return ReplicaReport(self.replica_id, self.actor_name, self.engine.stats(), adapters,
                             await self.engine.lora_state(), self._ray_view)

    async def _report_loop(self) -> None:
        warned = False
        while True:
            try:
                await self._state.report.remote(await self.report())
                warned = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the board may be restarting; keep serving
                if not warned:
                    log.warning("replica %s could not report its state: %s", self.replica_id, exc)
                    warned = True
            await asyncio.sleep(self._interval)

    def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown_sync()
