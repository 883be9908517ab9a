"""`ClusterConfig`: how many replicas and how they are placed and routed (the engine and gateway
keep their own configs; every replica gets the same `EngineConfig`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterConfig:
    """Knobs of the Ray Serve application.

    replicas: engine replicas (each one engine, one model copy, its own KV cache and adapter slots).
    multiplex: route adapter requests through Ray Serve's model multiplexing (adapter affinity);
        False sends every request to the least-loaded replica (the benchmark's baseline).
    max_ongoing_requests: requests Ray hands one replica at once; None = twice the engine's
        `max_num_seqs` (a running batch plus a queued one). When the replica holding an adapter is
        that busy, Ray sends the adapter's next requests to another replica: hot adapters spread.
    replica_num_cpus / replica_num_gpus: Ray resources each replica reserves (None = 1 GPU when the
        engine runs on CUDA, else 0).
    ingress_replicas: replicas of the HTTP ingress (tokenization, auth and SSE happen there).
    ray_address: an existing Ray cluster to join (None = start a local one).
    app_name: the Ray Serve application's name.
    report_interval: seconds between two replica reports (held adapters, counters).
    stale_after: a replica silent for this long is left out of /metrics and /v1/models (it died).
    retries: how often a request that had produced nothing yet is resent when its replica dies.
    log_level: level of the `loragate` loggers in the ingress and replica processes.
    """

    replicas: int = 2
    multiplex: bool = True
    max_ongoing_requests: int | None = None
    replica_num_cpus: float = 1.0
    replica_num_gpus: float | None = None
    ingress_replicas: int = 1
    ray_address: str | None = None
    app_name: str = "loragate"
    report_interval: float = 0.25
    stale_after: float = 3.0
    retries: int = 2
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.ingress_replicas < 1:
            raise ValueError("ingress_replicas must be at least 1")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be at least 1")


def cluster_config(args) -> ClusterConfig:
    """The `--ray-*` flags of `loragate serve` (an argparse namespace) as a ClusterConfig."""
    return ClusterConfig(
        replicas=max(args.ray_replicas, 1), multiplex=args.ray_multiplex,
        max_ongoing_requests=args.ray_max_ongoing_requests, replica_num_cpus=args.ray_num_cpus_per_replica,
        replica_num_gpus=args.ray_num_gpus_per_replica, ingress_replicas=args.ray_ingress_replicas,
        ray_address=args.ray_address, log_level=args.log_level,
    )
