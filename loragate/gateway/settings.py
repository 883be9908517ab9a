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
    retry_after_seconds: value of the Retry-After header on 429.
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
    playground: bool = True  # serve the playground page at / and /playground
