"""Test services for the LoRAX/vLLM drop-in tests: a Hugging Face cache laid out the way
huggingface_hub lays it out, and a local S3-compatible server (moto in server mode on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

# lorax-client's metadata pins an old huggingface-hub it never imports, so it is installed without
# its dependencies (.ci/run, README). In CI a missing client is an error, not a skip.
if os.environ.get("CI"):
    import lorax  # noqa: F401


def lay_out_hf_cache(cache_dir: Path, repo_id: str, files_from: Path, commit: str = "0" * 40) -> Path:
    """`models--org--name/{blobs,refs/main,snapshots/<commit>/<file> -> ../../blobs/<hash>}`, exactly
    what huggingface_hub writes after a download; offline, snapshot_download finds it by refs/main."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (files_from / f).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    return snap


@contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 (free port) and a boto3 client for it; AWS_* credentials are
    dummies set for the duration (boto3 in the server under test reads the same variables)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        yield url, boto3.client("s3", endpoint_url=url)
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload_adapter(s3, bucket: str, prefix: str, src: Path, pad_to: int | None = None) -> None:
    """Put an adapter's two files under s3://bucket/prefix (safetensors padded to `pad_to` bytes to
    make a too-large object)."""
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = (src / f).read_bytes()
        if pad_to and f.endswith("safetensors"):
            data += b"\0" * max(pad_to - len(data), 0)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{f}", Body=data)


def leftovers(root: Path) -> list[str]:
    """Partial downloads under a cache root (there must never be any)."""
    return [str(p) for p in Path(root).rglob("*") if ".part-" in p.name or p.name.endswith(".incomplete")]


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
