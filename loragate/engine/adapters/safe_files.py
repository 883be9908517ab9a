"""Reading an adapter folder's files as if a hostile customer wrote them.

Adapter folders are uploaded by customers, so every byte is untrusted: a file may be a symlink out
of the folder (or to /dev/zero), a safetensors header may claim to be larger than the file or than
memory, a file may be truncated, and the folder may change while we read it. Everything here is
bounded before any allocation that depends on the file's contents:

* `read_file` reads one regular file that lies (after symlinks) inside the adapter's folder, at most
  `limit` bytes, and remembers what it read (`FileStamp`) so `check_unchanged` can tell whether the
  folder changed underneath the load.
* `parse_safetensors_header` validates the header of an in-memory safetensors file (length, JSON,
  dtypes, shapes, offsets) so that a malformed file fails with a message naming the cause instead
  of safetensors' terse error or an allocation of whatever size the header claims.

The tensors are then deserialised from the bytes already read (never memory-mapped: a file
truncated under a live mmap raises SIGBUS and would take the whole server down).

Error messages name the file by its name inside the adapter folder, never by its path: they reach
API clients, and a folder's location on the server is not theirs to know.
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from loragate.engine.json_limits import nesting_depth

# safetensors dtype -> bytes per element, for the float types LoRA weights may have
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
MAX_HEADER_BYTES = 16 << 20  # safetensors itself allows 100 MB; an adapter's header is a few KB
MAX_JSON_DEPTH = 64


class UnsafeFileError(Exception):
    """A file of the adapter folder is unreadable or malformed; the message names the cause."""


@dataclass(frozen=True)
class FileStamp:
    """What one read saw: enough to notice that the file was replaced, rewritten or resized."""

    name: str
    device: int
    inode: int
    size: int
    mtime_ns: int


def _stamp(name: str, st: os.stat_result) -> FileStamp:
    return FileStamp(name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _inside(root: Path, name: str, boundary: Path | None = None) -> Path:
    """The real path of root/name, refusing one that leaves the folder (symlink or '..'), or
    `boundary` when one is given: a Hugging Face cache snapshot's files are links into its repo's
    blobs/, so a hub adapter's boundary is the repo's cache folder."""
    real_root = Path(os.path.realpath(root))
    allowed = Path(os.path.realpath(boundary)) if boundary is not None else real_root
    real = Path(os.path.realpath(real_root / name))
    if real == allowed or not real.is_relative_to(allowed):
        raise UnsafeFileError(f"{name} points outside the adapter folder (symlink or '..'); refused")
    return real


def read_file(root: Path, name: str, limit: int, boundary: Path | None = None) -> tuple[bytes, FileStamp]:
    """The whole content of root/name: a regular file inside root (or `boundary`), at most `limit`
    bytes."""
    path = _inside(root, name, boundary)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UnsafeFileError(f"{name} could not be opened ({exc.strerror or type(exc).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{name} is not a regular file")
        if st.st_size > limit:
            raise UnsafeFileError(f"{name} is {st.st_size} bytes, more than the {limit} bytes accepted")
        chunks, total = [], 0
        while True:  # read to EOF, never past the limit, whatever the size said
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise UnsafeFileError(f"{name} grew past the {limit} bytes accepted while it was read")
        data = b"".join(chunks)
        after = os.fstat(fd)
    except OSError as exc:
        raise UnsafeFileError(f"{name} could not be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)
    if len(data) != st.st_size or after.st_size != st.st_size or after.st_mtime_ns != st.st_mtime_ns:
        raise UnsafeFileError(f"{name} changed while it was being read")
    return data, _stamp(name, after)


def check_unchanged(root: Path, stamps: list[FileStamp], boundary: Path | None = None) -> None:
    """Raise if any file read earlier has since been replaced, rewritten or resized."""
    for s in stamps:
        try:
            st = os.stat(_inside(root, s.name, boundary))
        except OSError:
            st = None
        if st is None or _stamp(s.name, st) != s:
            raise UnsafeFileError(f"the adapter folder changed while it was being loaded ({s.name} was "
                                  "replaced or modified); it will be read again on the next request")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def parse_safetensors_header(data: bytes) -> list[TensorInfo]:
    """Validate a safetensors file held in memory; returns its tensors' names, dtypes and shapes.
    Messages say what is wrong; the caller names the file and the adapter.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}, then the data buffer."""
    if len(data) < 8:
        raise UnsafeFileError(f"truncated ({len(data)} bytes; not even a header length)")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES:
        raise UnsafeFileError(f"it claims a {n}-byte header; at most {MAX_HEADER_BYTES} bytes are accepted")
    if n > len(data) - 8:
        raise UnsafeFileError(f"it claims a {n}-byte header but only {len(data) - 8} bytes follow the length "
                              "(truncated or corrupt)")
    try:
        text = data[8:8 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafeFileError("its header is not UTF-8 text") from None
    if nesting_depth(text) > MAX_JSON_DEPTH:
        raise UnsafeFileError(f"its header is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UnsafeFileError(f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise UnsafeFileError("its header is not a JSON object")
    buffer = len(data) - 8 - n
    out: list[TensorInfo] = []
    spans: list[tuple[int, int]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        where = f"tensor {key[:200]!r}"
        if not isinstance(entry, dict):
            raise UnsafeFileError(f"{where} has a malformed header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES:
            raise UnsafeFileError(f"{where} has dtype {str(dtype)[:20]!r}; LoRA weights must be one of "
                                  f"{', '.join(FLOAT_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise UnsafeFileError(f"{where} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise UnsafeFileError(f"{where} has invalid data_offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * FLOAT_DTYPES[dtype]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise UnsafeFileError(f"{where}: data_offsets {offsets} do not match its shape {shape} and dtype {dtype}")
        if end > buffer:
            raise UnsafeFileError(f"{where} ends at byte {end} of the data but the file holds only {buffer} "
                                  "(truncated)")
        spans.append((begin, end))
        out.append(TensorInfo(key, dtype, tuple(shape), nbytes))
    spans.sort()
    for (b0, e0), (b1, _) in zip(spans, spans[1:]):
        if b1 < e0:
            raise UnsafeFileError("two tensors overlap in the data buffer")
    return out
