"""loragate on Ray Serve, on one machine: Ray started here with two CPUs and no dashboard, two engine
replicas (tiny CPU engines) behind the ingress, driven over HTTP through Ray's proxy.

Skipped where Ray Serve is not installed; CI installs the `ray` extra and runs it. The tests share
one cluster and run in file order: adapter affinity is measured first, on replicas that hold no
adapters yet, and the replica is killed last.
"""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

from prometheus_client.parser import text_string_to_metric_families

from loragate.cluster.app import INGRESS_DEPLOYMENT, STATE_DEPLOYMENT, build_app
from loragate.cluster.config import ClusterConfig
from loragate.cluster.launch import local_runtime_env
from loragate.cluster.replica import HELD_TIERS
from loragate.engine.async_engine import AsyncEngine
from loragate.engine.config import EngineConfig
from loragate.gateway import GatewaySettings, create_app
from loragate.testing import build_adapter, free_port
from tests.test_gateway import running_server, wait_for

APP = "loragate"
ADMIN, KEY_A = "sk-admin", "sk-acme"
ADAPTERS = [f"a{i}" for i in range(5)]
HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def cluster(checkpoints, tmp_path_factory):
    base = checkpoints("llama3")
    root = tmp_path_factory.mktemp("ray-adapters")
    targets = [("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "down_proj")]
    for i, name in enumerate(ADAPTERS):
        build_adapter(base, root / name, rank=4, alpha=8, targets=targets[i % 3], seed=500 + i)
    engine = EngineConfig(model=str(base), served_model_name="tiny", device="cpu", dtype="float32",
                          adapter_dir=str(root), max_loras=3, max_lora_rank=8, max_num_seqs=2,
                          kv_cache_memory=8 << 20, block_size=8, max_model_len=256)
    settings = GatewaySettings(api_keys=(ADMIN,), api_keys_file={"keys": [
        {"key": KEY_A, "tenant": "acme", "adapters": ["a0"]}]})
    cfg = ClusterConfig(replicas=2, replica_num_cpus=1, report_interval=0.2, stale_after=2.0, log_level="warning")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, log_to_driver=False,
             runtime_env=local_runtime_env())
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(engine, settings, cfg), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        state = serve.get_deployment_handle(STATE_DEPLOYMENT, APP)
        wait_for(lambda: len(state.snapshot.remote().result(timeout_s=10)) == 2, timeout=60,
                 what="two replicas reporting")
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, timeout=30, what="ingress healthy")
        yield {"url": url, "engine": engine, "settings": settings, "state": state,
               "ingress": serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP)}
    finally:
        serve.shutdown()
        ray.shutdown()


def reports(cluster) -> dict:
    return {r.replica_id: r for r in cluster["state"].snapshot.remote().result(timeout_s=10)}


def locate(cluster, adapter: str) -> str:
    return cluster["ingress"].locate.remote(adapter).result(timeout_s=10)


def routed(url: str) -> dict[tuple[str, str], float]:
    """(replica, adapter) -> requests the ingress sent there, from the ingress's /metrics."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if fam.name == "loragate_cluster_routed_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(s.labels["replica"], s.labels["adapter"])] = s.value
    return out


def complete(url: str, model: str, prompt: str = "moon river", max_tokens: int = 3, **extra) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=60)


def warm(cluster, adapter: str) -> str:
    """One request for `adapter`, then wait until Ray's router sends the adapter to the replica
    that loaded it (five probes in a row), so the next new adapter sees that replica as fuller."""
    url = cluster["url"]
    before = routed(url)
    assert complete(url, adapter).status_code == 200
    after = routed(url)
    (home,) = [rep for (rep, a), n in after.items() if a == adapter and n > before.get((rep, a), 0)]
    wait_for(lambda: adapter in reports(cluster)[home].ray_view, timeout=20, what=f"{adapter} in Ray's view")

    def settled() -> bool:
        return all(locate(cluster, adapter) == home for _ in range(5))

    wait_for(settled, timeout=30, what=f"the router sending {adapter} to {home}")
    return home


def test_two_hot_adapters_go_to_different_replicas_and_stay_there(cluster):
    url = cluster["url"]
    assert all(r.ray_view == () and r.resident == () for r in reports(cluster).values()), \
        "this test needs replicas that hold no adapter yet (it runs first)"
    home1 = warm(cluster, "a1")
    home2 = warm(cluster, "a2")
    assert home1 != home2  # a new adapter goes to the replica holding fewer

    before = routed(url)
    errors: list = []

    def client(adapter: str) -> None:
        for _ in range(10):
            r = complete(url, adapter, max_tokens=2)
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=client, args=(a,)) for a in ("a1", "a2", "a1", "a2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    after = routed(url)
    for adapter, home in (("a1", home1), ("a2", home2)):
        landed = {rep: after.get((rep, adapter), 0) - before.get((rep, adapter), 0)
                  for rep, a in after if a == adapter}
        assert sum(landed.values()) == 20
        assert landed[home] / 20 >= 0.95, landed
    # Ray's view of each replica is what its engine's adapter cache holds (slots, loading, CPU tier)
    for r in reports(cluster).values():
        held = {a.name for a in r.adapters if a.tier in HELD_TIERS}
        assert set(r.ray_view) == held
    assert "a1" in reports(cluster)[home1].resident and "a2" in reports(cluster)[home2].resident


def test_greedy_outputs_and_streams_equal_a_single_server(cluster):
    url = cluster["url"]
    cases = [(m, p) for m in ("tiny", "a0", "a3", "tiny:a4") for p in ("the quick brown fox", "hello world")]
    ray_client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)

    def run(client) -> list:
        out = []
        for model, prompt in cases:
            text = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
            chunks = [(c.choices[0].delta.content, c.choices[0].finish_reason) if c.choices else ("usage", None)
                      for c in client.chat.completions.create(
                          model=model, messages=[{"role": "user", "content": prompt}], max_tokens=10, temperature=0,
                          stream=True, stream_options={"include_usage": True})]
            out.append((text, chunks))
        return out

    got = run(ray_client)
    with running_server(create_app(AsyncEngine(cluster["engine"]), cluster["settings"])) as single:
        expected = run(openai.OpenAI(base_url=single + "/v1", api_key=ADMIN, max_retries=0, timeout=60))
    assert got == expected
    assert len({text for text, _ in got}) > 4  # base and adapters really differ


def test_models_auth_and_key_scoping_as_one_server(cluster):
    url = cluster["url"]
    admin = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    assert {m.id for m in admin.models.list().data} == {"tiny", *ADAPTERS}
    acme = openai.OpenAI(base_url=url + "/v1", api_key=KEY_A, max_retries=0, timeout=60)
    assert {m.id for m in acme.models.list().data} == {"tiny", "a0"}
    with pytest.raises(openai.NotFoundError):
        acme.completions.create(model="a1", prompt="x", max_tokens=2)
    assert acme.completions.create(model="a0", prompt="x", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as e:
        admin.completions.create(model="a0", prompt="x " * 300, max_tokens=10)
    assert e.value.body["code"] == "context_length_exceeded"
    # runtime registration is a single-server feature: a clear 400, never a 5xx
    r = httpx.post(url + "/v1/adapters", json={"name": "new", "path": "/nowhere"}, headers=HEADERS)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"]
    # /v1/adapters folds the replicas' reports (read every report_interval): resident anywhere =
    # device, requests summed
    def folded() -> bool:
        cards = {c["id"]: c for c in httpx.get(url + "/v1/adapters", headers=HEADERS).json()["data"]}
        live = reports(cluster)
        resident = set().union(*(r.resident for r in live.values()))
        served = {n: sum(a.requests_served for r in live.values() for a in r.adapters if a.name == n)
                  for n in ADAPTERS}
        return ({n for n, c in cards.items() if c["tier"] == "device"} == resident
                and {n: cards[n]["requests_served"] for n in ADAPTERS} == served and served["a0"] >= 1)

    wait_for(folded, timeout=10, what="/v1/adapters equal to the replicas' reports")


def test_metrics_aggregate_and_per_replica(cluster):
    url = cluster["url"]
    wait_for(lambda: all(r.stats.running == 0 and r.stats.waiting == 0 for r in reports(cluster).values()),
             what="replicas idle")
    live = reports(cluster)
    wait_for(lambda: "a1" in httpx.get(url + "/metrics").text, what="the ingress reading fresh reports")
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    (info,) = fams["vllm:lora_requests_info"].samples
    resident = sorted(set().union(*(r.resident for r in live.values())))
    assert info.labels["running_lora_adapters"] == ",".join(resident)
    assert info.labels["max_lora"] == str(sum(r.lora.max_loras for r in live.values())) == "6"
    (cache,) = fams["vllm:cache_config_info"].samples
    assert cache.labels["num_gpu_blocks"] == str(sum(r.stats.kv_blocks_total for r in live.values()))
    assert fams["vllm:num_requests_running"].samples[0].value == 0
    per_replica = {s.labels["replica"] for s in fams["loragate_replica_num_requests_running"].samples}
    assert per_replica == set(live)
    resident_series = {(s.labels["replica"], s.labels["adapter"]) for s in fams["loragate_replica_adapter_resident"].samples}
    assert resident_series == {(rid, a) for rid, r in live.items() for a in r.resident}


def test_structured_outputs_through_the_cluster(cluster):
    """A constraint is checked at the ingress (a bad one is a 400, never a replica failure) and
    enforced on the replica: the answer validates against the schema."""
    import jsonschema

    url = cluster["url"]
    schema = {"type": "object", "required": ["tag", "n"], "additionalProperties": False, "properties": {
        "tag": {"enum": ["x", "y"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    client = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN, max_retries=0, timeout=60)
    for model in ("tiny", "a1"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=60,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "t", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    bad = httpx.post(url + "/v1/completions", headers=HEADERS, timeout=60,
                     json={"model": "a1", "prompt": "x", "max_tokens": 4, "guided_regex": "(unclosed"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"


def test_client_disconnect_aborts_on_the_replica(cluster):
    url = cluster["url"]
    home = locate(cluster, "a2")
    steps_before = reports(cluster)[home].stats.steps
    body = {"model": "a2", "prompt": "a long answer", "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body, headers=HEADERS) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
    wait_for(lambda: (s := reports(cluster)[home].stats).running == 0 and s.waiting == 0 and s.kv_blocks_used == 0,
             timeout=30, what="the replica's request aborted and its blocks freed")
    # finishing would have taken 240 decode steps; the replica stopped well before
    assert reports(cluster)[home].stats.steps - steps_before < 200


def stream_events(url: str, model: str, max_tokens: int, log: dict) -> None:
    """One streamed completion; `log` gets its HTTP status, every SSE event, the number of content
    chunks and the finish reason."""
    body = {"model": model, "prompt": f"story {max_tokens}", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    log.update(chunks=0, events=[], finish=None)
    with httpx.Client(timeout=60) as h, h.stream("POST", url + "/v1/completions", json=body, headers=HEADERS) as r:
        log["status"] = r.status_code
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            log["events"].append(line[6:])
            if line[6:] == "[DONE]" or "error" in (event := json.loads(line[6:])):
                continue
            log["chunks"] += 1
            log["finish"] = event["choices"][0]["finish_reason"] or log["finish"]


def test_killed_replica_loses_no_request_that_had_not_started(cluster):
    url = cluster["url"]
    home = locate(cluster, "a1")
    victim = reports(cluster)[home]
    # two long streams run on the replica (max_num_seqs=2), more wait in its queue; kill it while so
    logs = [{} for _ in range(6)]
    threads = [threading.Thread(target=stream_events, args=(url, "a1", 230 if i < 2 else 8, logs[i]))
               for i in range(6)]
    for t in threads[:2]:
        t.start()
    wait_for(lambda: all(log.get("chunks", 0) >= 1 for log in logs[:2]), timeout=30, what="two streams started")
    for t in threads[2:]:
        t.start()
    wait_for(lambda: reports(cluster)[home].stats.waiting >= 1, timeout=30, what="requests queued on the replica")
    ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica died"
    for log in logs:
        assert log["status"] == 200 and log["events"][-1] == "[DONE]"
        errors = [json.loads(e)["error"] for e in log["events"][:-1] if e != "[DONE]" and "error" in json.loads(e)]
        if errors:  # only a request that had already streamed output may fail, and it fails cleanly
            assert log["chunks"] >= 1
            assert set(errors[0]) == {"message", "type", "param", "code"} and errors[0]["type"] == "server_error"
        else:
            assert log["finish"] == "length"  # complete: all its tokens, then the finish chunk
    assert sum(1 for log in logs if any("error" in e for e in log["events"][:-1])) >= 1
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert fams["loragate_cluster_retries"].samples[0].value >= 1  # queued ones were resent
    # new requests go to the survivor at once; Ray replaces the dead replica
    assert complete(url, "a1").status_code == 200
    wait_for(lambda: len(r := reports(cluster)) == 2 and home not in r, timeout=90, what="a replacement replica")
    assert complete(url, "a1").status_code == 200
