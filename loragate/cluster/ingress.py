"""The ingress deployment: the unchanged gateway app over a `RemoteEngine`, plus per-replica series.

`/metrics` on the ingress carries the gateway's own series (requests, latencies measured at the
ingress, so they include Ray's routing) and the engine gauges aggregated over live replicas
(`loragate_*` and `vllm:*`, summed as `report.py` says), and per replica:

  loragate_replica_num_requests_running{replica}   loragate_replica_num_requests_waiting{replica}
  loragate_replica_kv_cache_usage_ratio{replica}   loragate_replica_adapter_loads{replica}
  loragate_replica_adapter_resident{replica,adapter}  (1 per adapter in a device slot)
  loragate_cluster_routed_requests_total{replica,adapter}  (requests the ingress sent there)
  loragate_cluster_retries_total  (requests resent because their replica died before any output)
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve

from loragate.cluster.config import ClusterConfig
from loragate.cluster.logs import setup_logging
from loragate.cluster.remote_engine import RemoteEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app


class ReplicaCollector:
    """A prometheus_client custom collector reading the RemoteEngine's latest replica reports."""

    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def collect(self):
        reports = self.engine.reports
        running = GaugeMetricFamily("loragate_replica_num_requests_running", "Requests in a replica's running batch",
                                    labels=["replica"])
        waiting = GaugeMetricFamily("loragate_replica_num_requests_waiting", "Requests queued on a replica",
                                    labels=["replica"])
        kv = GaugeMetricFamily("loragate_replica_kv_cache_usage_ratio", "Fraction of a replica's KV blocks in use",
                               labels=["replica"])
        loads = GaugeMetricFamily("loragate_replica_adapter_loads", "Adapter loads into device slots on a replica "
                                  "(adapters still in its cache)", labels=["replica"])
        resident = GaugeMetricFamily("loragate_replica_adapter_resident", "1 for each adapter in a replica's device "
                                     "slots", labels=["replica", "adapter"])
        for r in reports:
            s = r.stats
            running.add_metric([r.replica_id], s.running)
            waiting.add_metric([r.replica_id], s.waiting)
            kv.add_metric([r.replica_id], s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
            loads.add_metric([r.replica_id], sum(a.load_count for a in r.adapters))
            for name in r.resident:
                resident.add_metric([r.replica_id, name], 1)
        routed = CounterMetricFamily("loragate_cluster_routed_requests", "Requests the ingress sent to each "
                                     "replica, by adapter (empty = base model)", labels=["replica", "adapter"])
        for (replica, adapter), n in sorted(self.engine.routed.items()):
            routed.add_metric([replica, adapter], n)
        retries = CounterMetricFamily("loragate_cluster_retries", "Requests resent because their replica died "
                                      "before producing output")
        retries.add_metric([], self.engine.retries)
        yield from (running, waiting, kv, loads, resident, routed, retries)


@serve.ingress()
class Ingress:
    """Ray Serve builds the ASGI app after the constructor (`__serve_build_asgi_app__`), so the app
    can close over the handles bound into this deployment."""

    def __init__(self, replicas, state, engine_config: EngineConfig, settings: GatewaySettings,
                 cluster: ClusterConfig) -> None:
        setup_logging(cluster.log_level)
        self.engine = RemoteEngine(engine_config, replicas, state, cluster)
        self.settings = settings

    async def locate(self, adapter: str) -> str:
        """Which replica adapter requests go to now (a handle call, for diagnostics and tests)."""
        return await self.engine.locate(adapter)

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine, self.settings)
        app.state.ctx.metrics.registry.register(ReplicaCollector(self.engine))
        return app
