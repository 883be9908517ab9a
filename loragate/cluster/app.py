"""The Ray Serve application: ingress -> engine replicas, with the state board beside them.

`build_app` is what `loragate serve --ray-replicas N` runs; `app_builder` is the same for Ray's own
CLI, taking the `loragate serve` flags as one string:

    serve run loragate.cluster.app:app_builder args="--ray-replicas 2 --adapter-dir /adapters"
"""
from __future__ import annotations

import shlex

from ray import serve
from ray.serve import Application

from loragate.cluster.config import ClusterConfig
from loragate.cluster.ingress import Ingress
from loragate.cluster.replica import EngineReplica
from loragate.cluster.state import ClusterState
from loragate.engine.config import EngineConfig
from loragate.gateway.settings import GatewaySettings

ENGINE_DEPLOYMENT = "LoragateEngine"
INGRESS_DEPLOYMENT = "LoragateIngress"
STATE_DEPLOYMENT = "LoragateState"
# Ray Serve logs every call by default: the board's 4 reports a second per replica would flood the
# log, and the gateway already writes one line per request
QUIET = {"enable_access_log": False}


def replica_gpus(engine: EngineConfig, cluster: ClusterConfig) -> float:
    if cluster.replica_num_gpus is not None:
        return cluster.replica_num_gpus
    if engine.device == "cuda":
        return 1.0
    if engine.device == "auto":
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    return 0.0


def build_app(engine: EngineConfig, gateway: GatewaySettings, cluster: ClusterConfig) -> Application:
    """Bind the three deployments. Nothing starts until `serve.run` (no model is loaded here)."""
    ongoing = cluster.max_ongoing_requests or 2 * engine.max_num_seqs
    state = serve.deployment(name=STATE_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0},
                             logging_config=QUIET)(ClusterState).bind(cluster.stale_after)
    replicas = serve.deployment(
        name=ENGINE_DEPLOYMENT, num_replicas=cluster.replicas, max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": cluster.replica_num_cpus, "num_gpus": replica_gpus(engine, cluster)},
        logging_config=QUIET,
    )(EngineReplica).bind(engine, state, cluster.report_interval, cluster.log_level)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT, num_replicas=cluster.ingress_replicas,
        max_ongoing_requests=max(1000, 4 * ongoing * cluster.replicas), ray_actor_options={"num_cpus": 0},
        logging_config=QUIET,
    )(Ingress)
    return ingress.bind(replicas, state, engine, gateway, cluster)


def app_builder(args: dict) -> Application:
    """Entry point for `serve run loragate.cluster.app:app_builder args="<loragate serve flags>"`."""
    from loragate.cli import build_configs, build_parser
    from loragate.cluster.config import cluster_config

    parsed = build_parser().parse_args(["serve", *shlex.split(str(args.get("args", "")))])
    cfg = build_configs(parsed)
    return build_app(cfg.engine, cfg.gateway, cluster_config(parsed))
