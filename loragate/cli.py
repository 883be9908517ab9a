"""`loragate` command line: `loragate serve ...` builds EngineConfig + GatewaySettings from flags,
loads the engine and runs the gateway under uvicorn. `loragate --version` prints the version.

Flag parsing and config building are plain functions (`build_parser`, `build_configs`) so they can
be tested without loading a model.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from loragate import __version__

log = logging.getLogger("loragate")

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _adapter_pair(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _weight_pair(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not sep or not name or weight <= 0:
        raise argparse.ArgumentTypeError(f"expected CLIENT=WEIGHT with a positive weight, got {text!r}")
    return name, weight


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [n for n in names if n not in ("local", "hub", "s3")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of local, hub, s3; got {text!r}")
    return names


def _max_loras(text: str) -> int | str:
    if text.strip() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or auto, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loragate", description="Serve many LoRA adapters on one base model "
                                "behind an OpenAI-compatible API.")
    p.add_argument("--version", action="version", version=f"loragate {__version__}")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = s.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face checkpoint directory of the base model; without it the "
                   "built-in demo model and adapters are served")
    m.add_argument("--served-model-name", help="name clients use for the base model (default: the model "
                   "directory's name)")
    m.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run the model")
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weight and activation dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    m.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    a = s.add_argument_group("adapters")
    a.add_argument("--adapter", action="append", type=_adapter_pair, default=[], metavar="NAME=PATH",
                   help="serve the PEFT adapter at PATH under NAME (repeatable)")
    a.add_argument("--adapter-dir", help="directory whose sub-directories are adapters, found by name on "
                   "first use")
    a.add_argument("--max-loras", type=_max_loras, default="auto",
                   help="adapters resident on the device at once: a number, or auto (as many as "
                   "--adapter-memory-fraction of the memory left after the weights holds)")
    a.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    a.add_argument("--max-cpu-adapter-memory", type=parse_size, default=2 << 30, metavar="BYTES",
                   help="CPU cache budget for adapters (e.g. 2GiB)")
    a.add_argument("--adapter-memory-fraction", type=float, default=0.1, metavar="FRACTION",
                   help="with --max-loras auto: the share of the device memory left after the weights that "
                   "adapter slots may take (the KV cache gets the rest of its budget)")
    a.add_argument("--lora-target-modules", default="auto", metavar="auto|all|MODULES",
                   help="modules the adapter slots hold: auto (with --max-loras auto, those the adapters "
                   "registered at start-up target; else all), all, or a comma-separated list like q_proj,v_proj")
    a.add_argument("--lora-kernels", default="auto", choices=["auto", "torch"],
                   help="auto: the fast kernels (Triton on CUDA, native C++ on the CPU), self-checked at "
                   "start-up; torch: the torch path everywhere (when the self-check refuses to start)")
    a.add_argument("--pin-adapter", action="append", default=[], metavar="NAME",
                   help="keep this adapter on the device permanently (repeatable)")
    a.add_argument("--allowed-adapter-dir", action="append", default=[], metavar="DIR",
                   help="POST /v1/adapters may register adapters only from inside these directories "
                   "(repeatable; none = runtime registration disabled)")
    r = s.add_argument_group("remote adapters (LoRAX's adapter_source)")
    r.add_argument("--adapter-source", type=_sources, default=("local",), metavar="LIST",
                   help="where requests may load adapters from: local, hub (Hugging Face), s3; e.g. "
                   "local,hub,s3. Keys need a matching 'sources' allowance in --api-keys-file")
    r.add_argument("--adapter-cache-dir", metavar="DIR", help="where s3 adapters are downloaded (default "
                   "~/.cache/loragate/adapters; hub adapters use the Hugging Face cache, HF_HOME)")
    r.add_argument("--max-adapter-download-size", type=parse_size, default=1 << 30, metavar="BYTES",
                   help="largest remote adapter fetched (e.g. 512MiB)")
    r.add_argument("--adapter-download-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="time limit of one remote adapter fetch")
    r.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible store (MinIO, R2, ...); "
                   "AWS_ENDPOINT_URL_S3 and the other AWS_* variables work too")
    e = s.add_argument_group("scheduling and memory")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch at most")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    e.add_argument("--max-queue-len", type=int, default=4096, help="waiting requests before answering 429")
    e.add_argument("--kv-cache-memory", type=parse_size, metavar="BYTES",
                   help="KV cache budget (e.g. 1GiB); default: a fraction of free GPU memory, 1GiB on CPU")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    e.add_argument("--fairness", default="vtc", choices=["vtc", "fcfs"],
                   help="vtc: share throughput fairly across tenants/adapters; fcfs: arrival order")
    e.add_argument("--tenant-weight", action="append", type=_weight_pair, default=[], metavar="CLIENT=WEIGHT",
                   help="VTC weight of a tenant (or adapter, for keyless requests); weight 2 gets twice "
                   "the service of weight 1 when both are backlogged (repeatable; default 1)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of earlier requests with the same leading tokens and the same "
                   "adapter weights")
    h = s.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind")
    h.add_argument("--port", type=int, default=8000, help="port to bind")
    h.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="full-access API key (repeatable); with no keys at all the server is open")
    h.add_argument("--api-keys-file", metavar="FILE",
                   help='JSON {"keys": [{"key", "tenant", "adapters": [...] or "*", "base": true, '
                   '"admin": false}]}: per-customer keys limited to their adapters')
    h.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    h.add_argument("--tool-call-parser", default="hermes", choices=["hermes", "llama3_json"],
                   help='how tool_choice "auto" output is read as tool calls: hermes (<tool_call> blocks; '
                   'Hermes, Qwen) or llama3_json (Llama 3.1 JSON calls); "required" and named choices '
                   "are grammar-enforced and work on any model")
    h.add_argument("--no-playground", action="store_true",
                   help="do not serve the playground page at / and /playground")
    r = s.add_argument_group("scale-out on Ray Serve (pip install 'loragate[ray]')")
    r.add_argument("--ray-replicas", type=int, default=0, metavar="N",
                   help="run N engine replicas behind one OpenAI-compatible ingress on Ray Serve, adapter "
                   "requests routed to replicas that hold the adapter (0: one process, no Ray)")
    r.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    r.add_argument("--ray-max-ongoing-requests", type=int, metavar="N",
                   help="requests Ray hands one replica at once (default: 2 x --max-num-seqs)")
    r.add_argument("--ray-num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves")
    r.add_argument("--ray-num-gpus-per-replica", type=float,
                   help="Ray GPUs each replica reserves (default: 1 when the engine runs on CUDA, else 0)")
    r.add_argument("--ray-ingress-replicas", type=int, default=1, help="replicas of the HTTP ingress")
    r.add_argument("--ray-multiplex", action=argparse.BooleanOptionalAction, default=True,
                   help="route adapter requests by Ray Serve model multiplexing (adapter affinity)")
    h.add_argument("--max-request-bytes", type=parse_size, default=4 << 20, metavar="BYTES",
                   help="largest request body accepted (413 above it)")
    h.add_argument("--max-waiting", type=int, default=1024, help="requests waiting for their first token "
                   "before new ones are answered 503 with Retry-After (0 = no bound)")
    h.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long in-flight requests may take to finish before they are ended")
    h.add_argument("--metrics-auth", default="open", choices=["open", "admin"],
                   help="who may read /metrics: anyone (open, like vLLM) or admin keys only")
    return p


@dataclass
class ServeConfig:
    engine: object  # EngineConfig
    gateway: object  # GatewaySettings
    host: str
    port: int
    log_level: str


def build_configs(args: argparse.Namespace) -> ServeConfig:
    """Flags -> EngineConfig + GatewaySettings (no model is loaded here)."""
    from loragate.engine.adapters.slots import parse_target_modules
    from loragate.engine.config import EngineConfig
    from loragate.gateway.auth import KeyStore
    from loragate.gateway.settings import GatewaySettings

    adapters = list(args.adapter)
    model = args.model
    served_name = args.served_model_name
    if model is None:
        from loragate.demo import DEMO_MODEL_NAME, demo_paths

        model_dir, demo_adapters = demo_paths()
        model = str(model_dir)
        served_name = served_name or DEMO_MODEL_NAME
        named = {n for n, _ in adapters}
        adapters = [(n, str(p)) for n, p in demo_adapters.items() if n not in named] + adapters
    keys_file = None
    if args.api_keys_file:
        keys_file = json.loads(Path(args.api_keys_file).read_text())
        KeyStore.build((), keys_file)  # fail at start-up, not on the first request
    engine = EngineConfig(
        model=model, served_model_name=served_name, device=args.device, dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        max_queue_len=args.max_queue_len, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        max_cpu_adapter_memory=args.max_cpu_adapter_memory, adapters=tuple(adapters),
        adapter_dir=args.adapter_dir, pin_adapters=tuple(args.pin_adapter), fairness=args.fairness,
        allowed_adapter_dirs=tuple(args.allowed_adapter_dir), tenant_weights=tuple(args.tenant_weight),
        adapter_sources=tuple(args.adapter_source), adapter_cache_dir=args.adapter_cache_dir,
        max_adapter_download_bytes=args.max_adapter_download_size,
        adapter_download_timeout=args.adapter_download_timeout, s3_endpoint_url=args.s3_endpoint_url,
        adapter_memory_fraction=args.adapter_memory_fraction,
        lora_target_modules=parse_target_modules(args.lora_target_modules),
        lora_kernels=args.lora_kernels,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    gateway = GatewaySettings(api_keys=tuple(args.api_key), api_keys_file=keys_file,
                              allowed_adapter_dirs=tuple(args.allowed_adapter_dir),
                              tool_call_parser=args.tool_call_parser,
                              max_request_bytes=args.max_request_bytes, max_waiting=args.max_waiting or None,
                              shutdown_timeout=args.shutdown_timeout, metrics_auth=args.metrics_auth,
                              playground=not args.no_playground)
    return ServeConfig(engine, gateway, args.host, args.port, args.log_level)


def serve(cfg: ServeConfig) -> None:
    import asyncio

    from loragate import startup
    from loragate.engine import progress
    from loragate.engine.async_engine import AsyncEngine
    from loragate.gateway import create_app
    from loragate.gateway.shutdown import draining_server

    stop_progress = progress.add_listener(startup.ProgressDisplay())
    engine = AsyncEngine(cfg.engine)
    app = create_app(engine, cfg.gateway)
    stats = engine.stats()
    inner = getattr(engine, "engine", None)
    log.info("loragate %s: model=%s (%s) device=%s dtype=%s adapters=%d kv_blocks=%d max_model_len=%d "
             "auth=%s listening on http://%s:%d", __version__, engine.model_name, cfg.engine.model,
             getattr(inner, "device", cfg.engine.device), getattr(inner, "dtype", cfg.engine.dtype),
             len(engine.list_adapters()), stats.kv_blocks_total, engine.max_model_len,
             "keys" if (cfg.gateway.api_keys or cfg.gateway.api_keys_file) else "open", cfg.host, cfg.port)
    server = draining_server(app, cfg.host, cfg.port, cfg.log_level, cfg.gateway.shutdown_timeout)
    asyncio.run(startup.serve_and_announce(server, engine, cfg, on_ready=stop_progress))  # SIGTERM drains


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_configs(args)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    from loragate.engine.adapters.slots import SlotSizingError
    from loragate.engine.kernel_check import KernelCheckError

    try:
        if args.ray_replicas:
            from loragate.cluster.config import cluster_config
            from loragate.cluster.launch import serve_cluster

            serve_cluster(cfg, cluster_config(args))
            return 0
        serve(cfg)
    except (KernelCheckError, SlotSizingError) as exc:  # they name the cause and the fix: no traceback
        print(str(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
