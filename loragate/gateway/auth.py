"""API keys and what each key may see.

Keys come from two places:

* `--api-key KEY` (repeatable): a full-access key. It sees the base model and every adapter and
  may manage adapters.
* `--api-keys-file FILE`: JSON of the form::

      {"keys": [
          {"key": "sk-acme-123", "tenant": "acme", "adapters": ["acme-support", "acme-sql"]},
          {"key": "sk-ops",      "tenant": "ops",  "adapters": "*", "admin": true},
          {"key": "sk-lora-only","tenant": "beta", "adapters": ["beta-chat"], "base": false}
      ]}

  `adapters` is a list of adapter names or "*" for all (default: none); `base` (default true)
  says whether the key may use the base model; `admin` (default false) allows
  `POST/DELETE /v1/adapters`; `tenant` (default: the entry's position, "key-N") is what the
  engine's fair scheduler counts. `sources` (default none) lists the remote adapter sources the
  key may load adapters from (`"hub"`, `"s3"`, or "*" for every source the server enables with
  `--adapter-source`); `adapters` scopes local adapter names only.
  `max_concurrent` (requests in flight) and `tokens_per_minute`
  (prompt + completion tokens) limit one key; past them it gets 429 with Retry-After
  (`quotas.py`).

With no keys configured at all the server is open: every caller has full access.

A key is never logged. Lookup hashes the presented key and compares it against every stored
key's hash with `hmac.compare_digest`, without stopping at the first match, so timing reveals
neither which key matched nor how much of a prefix was right.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loragate.gateway.errors import APIError


class KeyFileEntry(BaseModel):
    """One entry of the keys file."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(min_length=1)
    tenant: str | None = None
    adapters: list[str] | Literal["*"] = Field(default_factory=list)
    base: bool = True
    admin: bool = False
    sources: list[Literal["hub", "s3"]] | Literal["*"] = Field(default_factory=list)
    max_concurrent: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyFileEntry]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant the engine schedules by and what the key may touch."""

    tenant: str | None
    adapters: frozenset[str] | None  # None = every adapter
    base: bool = True
    admin: bool = False
    remote_sources: frozenset[str] | None = frozenset()  # None = every enabled source
    key_id: str = ""  # which key (its entry's position, never the key itself): per-key limits
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    def can_use_adapter(self, name: str) -> bool:
        return self.adapters is None or name in self.adapters

    def can_use_source(self, source: str) -> bool:
        """Local adapters are scoped by `adapters`; a remote source needs its own allowance."""
        return source == "local" or self.remote_sources is None or source in self.remote_sources


OPEN = Principal(tenant=None, adapters=None, base=True, admin=True, remote_sources=None)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    """The configured keys; `authenticate` turns an Authorization header into a Principal."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        self._entries = [(_digest(k), p) for k, p in entries]

    @property
    def open(self) -> bool:
        return not self._entries

    @classmethod
    def build(cls, api_keys: tuple[str, ...] | list[str] = (), keys_file: dict[str, Any] | None = None,
              admin_keys: tuple[str, ...] | list[str] = ()) -> "KeyStore":
        """Raises ValueError on a malformed keys file, naming the entry and field but never quoting
        the file's values (they are keys)."""
        entries: list[tuple[str, Principal]] = []
        for i, key in enumerate([*api_keys, *admin_keys]):
            entries.append((key, Principal(tenant=f"admin-{i}", adapters=None, base=True, admin=True,
                                           remote_sources=None, key_id=f"admin-{i}")))
        if keys_file is not None:
            try:
                parsed = KeyFile.model_validate(keys_file)
            except ValidationError as exc:
                where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"invalid keys file: {where}") from None
            for i, e in enumerate(parsed.keys):
                adapters = None if e.adapters == "*" else frozenset(e.adapters)
                sources = None if e.sources == "*" else frozenset(e.sources)
                entries.append((e.key, Principal(e.tenant or f"key-{i}", adapters, e.base, e.admin, sources,
                                                 f"key-{i}", e.max_concurrent, e.tokens_per_minute)))
        return cls(entries)

    def lookup(self, key: str) -> Principal | None:
        presented = _digest(key)
        found: Principal | None = None
        for digest, principal in self._entries:  # no early exit: constant work per lookup
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return OPEN
        if not authorization:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           "invalid_request_error", None, "invalid_api_key")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        principal = self.lookup(token) if scheme.lower() == "bearer" and token else None
        if principal is None:
            raise APIError(401, "Incorrect API key provided.", "invalid_request_error", None,
                           "invalid_api_key")
        return principal
