"""Where a remote adapter's files come from: the Hugging Face Hub or S3 (LoRAX's `adapter_source`).

Each fetch returns a local PEFT directory (adapter_config.json + adapter_model.safetensors) that
the usual loader then validates; nothing here parses weights. Fetches are blocking and run on the
adapter cache's loader thread, never on the step loop; the cache keys entries by name, so
concurrent requests for one adapter wait on one download.

Every fetch has a size limit (checked against the listing before any byte is written, and again
while the bytes arrive) and a timeout, and never leaves a partial directory behind:
- hub: `huggingface_hub` into its normal cache (HF_HOME / HF_HUB_CACHE, or `hf_cache_dir`); with
  HF_HUB_OFFLINE=1 a cached snapshot is found without network. huggingface_hub itself downloads to
  `.incomplete` blobs and only links finished ones into a snapshot. Token: the request's
  `api_token`, else HF_TOKEN. Timeout: huggingface_hub's per-request timeouts (`etag_timeout` =
  ours, downloads HF_HUB_DOWNLOAD_TIMEOUT).
- s3: `s3://bucket/prefix` with boto3 (credentials, region and AWS_ENDPOINT_URL[_S3] from the
  usual AWS_* variables; `s3_endpoint_url` for S3-compatible stores). Files are streamed into a
  temporary sibling directory under an overall deadline and renamed into place when complete; the
  objects' ETags are kept beside them, so an unchanged adapter is not downloaded twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loragate.engine.errors import AdapterLoadError

SOURCES = ("local", "hub", "s3")
REMOTE_SOURCES = ("hub", "s3")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_ETAGS = ".etags.json"
_CHUNK = 1 << 20
_S3_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


@dataclass(frozen=True)
class SourceSettings:
    """Which sources are on and the limits every remote fetch runs under."""

    enabled: tuple[str, ...] = ("local",)
    cache_dir: str | None = None  # s3 downloads; default ~/.cache/loragate/adapters
    hf_cache_dir: str | None = None  # None = huggingface_hub's own (HF_HOME / HF_HUB_CACHE)
    max_bytes: int = 1 << 30
    timeout: float = 300.0
    s3_endpoint_url: str | None = None
    retry_seconds: float = 30.0  # a failed remote adapter is fetched again at most this often

    def root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path.home() / ".cache" / "loragate" / "adapters"


def source_settings(config) -> SourceSettings:
    """The engine config's source fields, as the fetchers take them."""
    unknown = [s for s in config.adapter_sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown adapter source(s) {unknown}: choose from {', '.join(SOURCES)}")
    return SourceSettings(tuple(config.adapter_sources), config.adapter_cache_dir, config.hf_cache_dir,
                          config.max_adapter_download_bytes, config.adapter_download_timeout,
                          config.s3_endpoint_url)


def check_hub_id(repo_id: str) -> str:
    """`org/name` (the form LoRAX takes); raises ValueError for anything else."""
    if not isinstance(repo_id, str) or not _HUB_ID_RE.fullmatch(repo_id) or ".." in repo_id:
        raise ValueError(f"{repo_id!r} is not a Hugging Face repo id (expected 'org/name')")
    return repo_id


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without surrounding slashes); raises ValueError."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[5:].partition("/")
    prefix = prefix.strip("/")
    if not _S3_BUCKET_RE.fullmatch(bucket):
        raise ValueError(f"{url!r} does not name a valid S3 bucket")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r} has an empty, '.' or '..' path segment")
    return bucket, prefix


def _too_large(what: str, size: int, limit: int) -> AdapterLoadError:
    return AdapterLoadError(f"{what} is {size} bytes, above the adapter download limit of {limit} bytes")


def check_local_size(path: Path, what: str, limit: int) -> None:
    """The adapter files already on disk must fit the limit too (a cached or offline copy)."""
    size = sum((path / f).stat().st_size for f in ADAPTER_FILES if (path / f).is_file())
    if size > limit:
        raise _too_large(what, size, limit)


# ---- Hugging Face Hub -----------------------------------------------------------------------------

def fetch_hub(repo_id: str, token: str | None, settings: SourceSettings) -> Path:
    """The adapter's snapshot directory in the Hugging Face cache, downloaded if needed."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    what = f"hub adapter {repo_id!r}"
    revision = None
    try:
        if not constants.HF_HUB_OFFLINE:
            info = HfApi().model_info(repo_id, files_metadata=True, token=token or None, timeout=settings.timeout)
            sizes = {s.rfilename: (s.size or 0) for s in info.siblings or []}
            total = sum(sizes.get(f, 0) for f in ADAPTER_FILES)
            if total > settings.max_bytes:
                raise _too_large(what, total, settings.max_bytes)
            revision = info.sha
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ADAPTER_FILES),
                                      token=token or None, cache_dir=settings.hf_cache_dir,
                                      etag_timeout=settings.timeout))
    except AdapterLoadError:
        raise
    except LocalEntryNotFoundError:
        raise AdapterLoadError(f"{what} is not in the local Hugging Face cache and the hub is offline") from None
    except HfHubHTTPError as exc:
        raise AdapterLoadError(f"{what} could not be fetched: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - network and validation errors of every kind
        raise AdapterLoadError(f"{what} could not be fetched: {type(exc).__name__}: {_short(exc)}") from None
    check_local_size(path, what, settings.max_bytes)
    return path


def _short(exc: BaseException) -> str:
    """First line of an exception message (huggingface_hub appends request ids and hints)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# ---- S3 ---------------------------------------------------------------------------------------------

def s3_cache_path(url: str, settings: SourceSettings) -> Path:
    key = hashlib.sha256(f"{settings.s3_endpoint_url or ''}|{url}".encode()).hexdigest()[:32]
    return settings.root() / "s3" / key


def fetch_s3(url: str, settings: SourceSettings) -> Path:
    """Download `s3://bucket/prefix`'s adapter files (or reuse an unchanged earlier download)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3_url(url)
    what = f"s3 adapter {url!r}"
    deadline = time.monotonic() + settings.timeout
    dest = s3_cache_path(url, settings)
    keys = {f: f"{prefix}/{f}" if prefix else f for f in ADAPTER_FILES}
    try:
        client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=Config(
            connect_timeout=min(settings.timeout, 60), read_timeout=min(settings.timeout, 60),
            retries={"max_attempts": 2}))
        listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1000)
        objects = {o["Key"]: o for o in listing.get("Contents", [])}
        missing = [f for f, k in keys.items() if k not in objects]
        if missing:
            raise AdapterLoadError(f"{what} has no {', '.join(missing)}")
        total = sum(int(objects[k]["Size"]) for k in keys.values())
        if total > settings.max_bytes:
            raise _too_large(what, total, settings.max_bytes)
        etags = {f: objects[k].get("ETag", "") for f, k in keys.items()}
        if _cached(dest, etags):
            return dest
        _download(client, bucket, keys, etags, dest, what, settings.max_bytes, deadline)
    except AdapterLoadError:
        raise
    except (BotoCoreError, ClientError) as exc:
        raise AdapterLoadError(f"{what} could not be fetched: {_short(exc)}") from None
    return dest


def _cached(dest: Path, etags: dict[str, str]) -> bool:
    try:
        return json.loads((dest / _ETAGS).read_text()) == etags and all((dest / f).is_file() for f in ADAPTER_FILES)
    except (OSError, ValueError):
        return False


def _download(client, bucket: str, keys: dict[str, str], etags: dict[str, str], dest: Path, what: str,
              limit: int, deadline: float) -> None:
    """Stream every file into a temporary sibling of `dest`, then swap it in; on any failure the
    temporary directory is removed, so a reader only ever sees a complete adapter."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".part-", dir=dest.parent))
    try:
        written = 0
        for fname, key in keys.items():
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                with open(tmp / fname, "wb") as f:
                    for chunk in body.iter_chunks(_CHUNK):
                        written += len(chunk)
                        if written > limit:
                            raise _too_large(what, written, limit)
                        if time.monotonic() > deadline:
                            raise AdapterLoadError(f"{what}: download timed out")
                        f.write(chunk)
            finally:
                body.close()
        (tmp / _ETAGS).write_text(json.dumps(etags))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
