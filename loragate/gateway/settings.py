"""Gateway settings: one dataclass built by the CLI (or a test) and handed to `create_app`.

Everything HTTP-specific lives here rather than in `EngineConfig`, so the engine never learns
about keys, tenants or which directories an admin may register adapters from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GatewaySettings:
    """Knobs of the HTTP layer.

    api_keys: keys that see every model and may manage adapters (the CLI's `--api-key`).
    api_keys_file: the parsed JSON of `--api-keys-file` (format documented in `auth.py`).
    admin_keys: extra keys with admin rights (adapter management) and full visibility.
    allowed_adapter_dirs: `POST /v1/adapters` only accepts paths inside one of these.
    max_concurrent_requests: requests the gateway keeps in flight before answering 429
        (None = leave queueing limits to the engine).
    retry_after_seconds: value of the Retry-After header on 429 and 503.
    max_request_bytes: largest request body accepted (413 above it).
    max_json_depth / max_json_items: deepest nesting and longest array (or object) a JSON body
        may have; checked before the body is parsed into a model (400 above them). None for
        max_json_items = the longest array a valid request can need: max(4096, the context
        length, the vocabulary size), so a body cannot make validation walk a million items.
    max_choices: engine requests one HTTP request may start (prompts x n; 400 above it).
    max_waiting: requests submitted but not yet producing tokens, across all clients, before new
        ones are answered 503 with Retry-After (None = no bound besides the engine's queue).
    max_stream_buffer: outputs one choice may have waiting for a slow client before the request
        is aborted (its KV blocks and slot freed).
    shutdown_timeout: seconds in-flight requests get to finish after SIGTERM.
    metrics_auth: "open" (anyone may read /metrics, like vLLM) or "admin" (admin keys only).
    tool_call_parser: how `tool_choice: "auto"` output is read as calls (gateway/tools/parsers.py).
    grammar_compile_timeout: seconds a structured-output grammar may take to compile before the
        request is refused with a 400.
    playground: serve the static playground page (`routes/playground.py`) at / and /playground.
    """

    api_keys: tuple[str, ...] = ()
    api_keys_file: dict[str, Any] | None = None
    admin_keys: tuple[str, ...] = ()
    allowed_adapter_dirs: tuple[str, ...] = ()
    max_concurrent_requests: int | None = None
    retry_after_seconds: int = 1
    system_fingerprint: str = "fp_loragate"
    extra: dict[str, Any] = field(default_factory=dict)
    max_request_bytes: int = 4 << 20
    max_json_depth: int = 64
    max_json_items: int | None = None
    max_choices: int = 512
    max_waiting: int | None = 1024
    max_stream_buffer: int = 512
    shutdown_timeout: float = 30.0
    metrics_auth: str = "open"
    tool_call_parser: str = "hermes"
    grammar_compile_timeout: float = 2.0
    playground: bool = True  # serve the playground page at / and /playground
