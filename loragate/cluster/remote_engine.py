"""`RemoteEngine`: the gateway's engine interface, served by the cluster's engine replicas.

The ingress runs the ordinary gateway app (`create_app`) over this object, so routing of `model`
names, auth and key scoping, chat templates, SSE framing and error mapping are exactly those of a
single `loragate serve`. What differs is behind `generate`: a Ray Serve streaming call to one
replica, multiplexed by adapter name for adapter requests (Ray's router then prefers a replica that
holds the adapter and sends new adapters to the replica holding the fewest); base-model requests
are not multiplexed. The tokenizer and the adapter registry are the ingress's own copies, read from
the same checkpoint and flags as the replicas'.

Failures: an engine error on the replica (queue full, prompt too long...) is re-raised here as the
same exception, so the gateway answers the same status. If the replica dies before the request
produced any output, the request is sent again (Ray routes it to a live replica; nothing reached
the client yet); after output has streamed, the request ends with an error output, which the
gateway turns into an SSE error event (or a 500) instead of a hang.

The engine view (`stats`, `list_adapters`, `lora_state`, `is_alive`) folds the replicas' reports,
polled from the `ClusterState` board every `report_interval` seconds (see `report.py`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from loragate.cluster.config import ClusterConfig
from loragate.cluster.report import ReplicaReport, aggregate_adapters, aggregate_lora, aggregate_stats
from loragate.engine.adapters.registry import AdapterRegistry
from loragate.engine.config import EngineConfig
from loragate.engine.errors import EngineError
from loragate.engine.model.config import ModelConfig
from loragate.engine.outputs import AdapterStats, EngineRequest, EngineStats, LoraState, RequestOutput
from loragate.engine.structured import StructuredSpec
from loragate.engine.structured.backend import llguidance_backend
from loragate.engine.structured.compiler import GrammarCompiler
from loragate.engine.tokenizer import Tokenizer

log = logging.getLogger("loragate.cluster")

REPLICA_GONE = (RayActorError, ActorUnavailableError)
NOT_IN_CLUSTER = ("with --ray-replicas the adapters are the configured ones (--adapter, --adapter-dir; folders "
                  "added to --adapter-dir are found on first use, on every replica): no runtime registration, "
                  "remote sources or merges")


class RemoteEngine:
    """Duck-types `AsyncEngine` for the gateway (see the module docstring)."""

    def __init__(self, config: EngineConfig, replicas, state, cluster: ClusterConfig) -> None:
        self.config = config
        self.cluster = cluster
        self.model_name = config.served_model_name or Path(config.model).name
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        mc = ModelConfig.from_dir(Path(config.model))
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.block_size = config.block_size
        self.registry = AdapterRegistry(config.adapters, config.adapter_dir, config.allowed_adapter_dirs)
        self._replicas = replicas
        self._state = state
        self._poller: asyncio.Task | None = None
        self.reports: list[ReplicaReport] = []
        self.routed: Counter[tuple[str, str]] = Counter()  # (replica, adapter or "") -> requests
        self.retries = 0
        # structured outputs: the ingress compiles constraints itself (same tokenizer and EOS as the
        # replicas), so a bad grammar is a 400 here before any replica sees it, as on one server
        eos = sorted(set(self.tokenizer.eos_token_ids) | set(mc.eos_token_ids))
        self._grammars = GrammarCompiler(lambda: llguidance_backend(self.tokenizer, mc.vocab_size, eos))

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return any(r.stats.alive for r in self.reports)

    async def start(self) -> None:
        await self.refresh()
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        self._grammars.shutdown()

    async def refresh(self) -> None:
        """Read the replicas' latest reports from the board now."""
        self.reports = await self._state.snapshot.remote()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.report_interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the board restarts; stale reports age out
                log.warning("could not read the replicas' reports: %s", exc)

    # ---- requests --------------------------------------------------------------------------
    async def compile_grammar(self, spec: StructuredSpec) -> None:
        """As `AsyncEngine.compile_grammar`, on the ingress's own compiler threads (raises
        GrammarError); the replica that runs the request compiles it again, from its own cache."""
        await self._grammars.wait(spec)

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request from a replica; closing the iterator cancels the call, which aborts
        the request on its replica."""
        attempt = 0
        while True:
            sent = request if attempt == 0 else dataclasses.replace(
                request, request_id=f"{request.request_id}-retry{attempt}")
            options: dict = {"stream": True}
            if request.adapter and self.cluster.multiplex:
                options["multiplexed_model_id"] = request.adapter
            stream = self._replicas.options(**options).generate.remote(sent)
            delivered = finished = False
            try:
                async for item in stream:
                    if isinstance(item, str):  # the replica's id, before its first output
                        self.routed[(item, request.adapter or "")] += 1
                        continue
                    delivered, finished = True, item.finished
                    if attempt:
                        item = dataclasses.replace(item, request_id=request.request_id)
                    yield item
                    if finished:
                        return
                finished = True
                yield _error_output(request, "the replica ended the request without a final output")
                return
            except RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, (EngineError, ValueError)):
                    raise cause from None  # the engine's own error: same status as one server
                raise
            except REPLICA_GONE as exc:
                if not delivered and attempt < self.cluster.retries:
                    attempt += 1
                    self.retries += 1
                    log.warning("replica lost before request %s produced output (%s); sending it again",
                                request.request_id, type(exc).__name__)
                    continue
                finished = True
                yield _error_output(request, "the replica serving this request stopped; retry the request")
                return
            finally:
                if not finished:
                    stream.cancel()

    async def locate(self, adapter: str) -> str:
        """The replica Ray's router picks for `adapter` right now (diagnostics; nothing is loaded)."""
        return await self._replicas.options(multiplexed_model_id=adapter).whoami.remote()

    def stats(self) -> EngineStats:
        s = aggregate_stats(self.reports)
        return dataclasses.replace(s, alive=self.is_alive)

    async def lora_state(self) -> LoraState:
        return aggregate_lora(self.reports)

    # ---- adapters --------------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return self.registry.resolve(name) is not None

    def list_adapters(self) -> list[AdapterStats]:
        return aggregate_adapters(self.registry.names(), self.registry.resolve, self.reports)

    # Adapters made at runtime (admin registration, hub/s3 sources, merges) would have to exist on
    # every replica, present and future; the cluster serves the configured ones only, and says so
    # with a 400 instead of failing.
    adapter_sources: tuple[str, ...] = ("local",)

    def register_adapter(self, name: str, path: str) -> AdapterStats:
        raise ValueError(NOT_IN_CLUSTER)

    def remote_adapter(self, source: str, ref: str, token: str | None = None) -> str:
        raise ValueError(NOT_IN_CLUSTER)

    def merged_adapter(self, names: list[str], weights: list[float], strategy: str | None = None,
                       density: float | None = None, majority_sign_method: str | None = None) -> str:
        raise ValueError(NOT_IN_CLUSTER)

    async def unregister_adapter(self, name: str) -> None:
        raise ValueError(NOT_IN_CLUSTER)


def _error_output(request: EngineRequest, message: str) -> RequestOutput:
    return RequestOutput(request.request_id, [], "", finished=True, finish_reason="error", error=message)
