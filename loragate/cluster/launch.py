"""`loragate serve --ray-replicas N`: start (or join) Ray, run the application, serve until stopped.

Ray Serve's HTTP proxy listens on `--host`/`--port`, like the single-process server. On a local Ray
started here, worker processes import the same `loragate` as this process (its directory is put on
their PYTHONPATH), so a source checkout serves its own code.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from loragate.cluster.config import ClusterConfig

log = logging.getLogger("loragate.cluster")


def local_runtime_env() -> dict:
    """Environment for the workers of a Ray started here: this `loragate` first on the path."""
    import loragate

    here = str(Path(loragate.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return {"env_vars": {"PYTHONPATH": path}}


def serve_cluster(cfg, cluster: ClusterConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut Serve (and a Ray started here) down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("--ray-replicas needs Ray Serve: pip install 'loragate[ray]'") from None
    from loragate.cluster.app import build_app

    if cluster.ray_address:
        ray.init(address=cluster.ray_address)
    else:
        ray.init(include_dashboard=False, runtime_env=local_runtime_env())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg.engine, cfg.gateway, cluster), name=cluster.app_name, route_prefix="/")
        log.info("loragate on Ray Serve: %d engine replica(s) of %s behind http://%s:%d (multiplexing %s)",
                 cluster.replicas, cfg.engine.model, cfg.host, cfg.port, "on" if cluster.multiplex else "off")
        stop.wait()
    finally:
        serve.shutdown()
        if not cluster.ray_address:
            ray.shutdown()
