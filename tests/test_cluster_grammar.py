"""The Ray ingress's `RemoteEngine` checks structured-output constraints itself, so a bad grammar is a
400 at the ingress (as on one server) instead of a failure on a replica. Runs without Ray: only
`ray.exceptions` is needed to import the module, and a stand-in provides it when Ray is absent (the
full cluster path is in test_cluster_ray.py, run where Ray is installed)."""
from __future__ import annotations

import asyncio
import importlib
import sys
import types

import pytest

from loragate.cluster.config import ClusterConfig
from loragate.engine.config import EngineConfig
from loragate.engine.structured import GrammarError, StructuredSpec


@pytest.fixture
def remote_engine_module(monkeypatch):
    try:
        import ray.exceptions  # noqa: F401
    except ImportError:
        stub = types.ModuleType("ray.exceptions")
        for name in ("ActorUnavailableError", "RayActorError", "RayTaskError"):
            setattr(stub, name, type(name, (Exception,), {}))
        monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(exceptions=stub))
        monkeypatch.setitem(sys.modules, "ray.exceptions", stub)
        monkeypatch.delitem(sys.modules, "loragate.cluster.remote_engine", raising=False)
    module = importlib.import_module("loragate.cluster.remote_engine")
    yield module
    if "ray.exceptions" in sys.modules and isinstance(sys.modules["ray"], types.SimpleNamespace):
        sys.modules.pop("loragate.cluster.remote_engine", None)  # never leave the stand-in behind


def test_ingress_compiles_constraints(remote_engine_module, checkpoints):
    cfg = EngineConfig(model=str(checkpoints("llama3")), device="cpu", dtype="float32")
    engine = remote_engine_module.RemoteEngine(cfg, replicas=None, state=None, cluster=ClusterConfig(replicas=1))

    async def go():
        await engine.compile_grammar(StructuredSpec.json({"type": "object", "properties": {"a": {"enum": [1, 2]}}}))
        await engine.compile_grammar(StructuredSpec("regex", "[a-z]{1,4}"))
        for bad in (StructuredSpec("regex", "(unclosed"), StructuredSpec("grammar", "start: undefined_rule"),
                    StructuredSpec.json({"type": "nonsense"})):
            with pytest.raises(GrammarError):
                await engine.compile_grammar(bad)
        await engine.shutdown()

    asyncio.run(go())
