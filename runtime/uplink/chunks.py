"""The uplink chunk: one numbered piece of a bundle or config, checkable on its own.

A pass carries only so many bytes, so a file is uplinked as chunks, each a self-describing file::

    ONBOARD-UPLINK-CHUNK 1\\n
    {"chunk_sha256": ..., "file_bytes": ..., "file_sha256": ..., "index": ..., "kind": ...,
     "name": ..., "total": ..., "upload": ...}\\n
    <payload bytes>

The header is one line of JSON (UTF-8). ``index`` counts from 0 to ``total - 1``; ``upload`` names
the upload (letters, digits, ``.``, ``_``, ``-``), ``name`` the file it assembles into (a plain
file name), ``kind`` is ``bundle`` or ``config``; ``file_bytes`` and ``file_sha256`` describe the
whole file. ``chunk_sha256`` is the SHA-256 of the header line *without* its ``chunk_sha256``
field (canonical JSON: sorted keys, ``,`` and ``:`` separators, no newline), then ``\\n``, then
the payload. It so binds the payload to its upload, place and file: a bit flipped in the index or
the upload id fails the chunk just as one flipped in the payload does, and the chunk is asked
for again instead of landing in the wrong slot.

:func:`split_file` is the ground side (``onboard uplink split``); :func:`parse_chunk` the board's.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboard.runtime.durability import write_bytes
from onboard.runtime.errors import ConfigError

MAGIC = b"ONBOARD-UPLINK-CHUNK 1\n"
KINDS = ("bundle", "config")
CHUNK_SUFFIX = ".chunk"
MAX_HEADER = 4096  # a header is a few hundred bytes; more is damage, not a header
_UPLOAD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_FIELDS = ("chunk_sha256", "file_bytes", "file_sha256", "index", "kind", "name", "total",
           "upload")


@dataclass(frozen=True)
class Refusal:
    """Why a chunk cannot be used; ``upload`` and ``index`` when its header could be read, so
    the ground knows which chunk to send again."""

    reason: str
    upload: str | None = None
    index: int | None = None


@dataclass(frozen=True)
class Chunk:
    upload: str
    name: str
    kind: str
    index: int
    total: int
    file_bytes: int
    file_sha256: str
    chunk_sha256: str
    payload: bytes

    def describe(self) -> dict[str, Any]:
        """What must agree between the chunks of one upload."""
        return {"upload": self.upload, "name": self.name, "kind": self.kind,
                "total": self.total, "file_bytes": self.file_bytes,
                "file_sha256": self.file_sha256}


def kind_of(name: str) -> str:
    """``bundle`` for ``*.onboard``, ``config`` for ``*.toml``."""
    if name.endswith(".onboard"):
        return "bundle"
    if name.endswith(".toml"):
        return "config"
    raise ConfigError(f"{name}: only bundles (.onboard) and configs (.toml) are uplinked")


def check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") \
            or len(name) > 200:
        raise ConfigError(f"{name!r}: an uplinked file needs a plain file name")
    return name


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def chunk_digest(header: dict[str, Any], payload: bytes) -> str:
    """``chunk_sha256`` of a chunk: see the module docstring."""
    body = {k: v for k, v in header.items() if k != "chunk_sha256"}
    return hashlib.sha256(_canonical(body) + b"\n" + payload).hexdigest()


def encode_chunk(header: dict[str, Any], payload: bytes) -> bytes:
    full = {**header, "chunk_sha256": chunk_digest(header, payload)}
    return MAGIC + _canonical(full) + b"\n" + payload


def parse_chunk(data: bytes) -> Chunk | Refusal:
    """A chunk's header and payload, checked, or the :class:`Refusal` saying why not."""
    if not data.startswith(MAGIC):
        return Refusal("not an uplink chunk (no ONBOARD-UPLINK-CHUNK header): damaged in "
                       "its first bytes or not a chunk; its index cannot be read")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    if end < 0:
        return Refusal("the chunk header has no end: damaged; its index cannot be read")
    try:
        header = json.loads(data[len(MAGIC):end])
    except (UnicodeDecodeError, ValueError):
        return Refusal("the chunk header is not valid JSON: damaged; its index cannot be "
                       "read")
    if not isinstance(header, dict) or set(header) != set(_FIELDS):
        return Refusal(f"the chunk header must have exactly the fields {list(_FIELDS)}")
    upload, index = header.get("upload"), header.get("index")
    where_upload = upload if isinstance(upload, str) else None
    where_index = index if isinstance(index, int) and not isinstance(index, bool) else None

    def refuse(reason: str) -> Refusal:
        return Refusal(reason, where_upload, where_index)

    payload = data[end + 1:]
    # The digest first: a field that fails its type check below may just be a flipped bit.
    if not isinstance(header["chunk_sha256"], str) \
            or chunk_digest(header, payload) != header["chunk_sha256"]:
        return refuse("checksum mismatch: the chunk was damaged on its way; send it again")
    total, size = header["total"], header["file_bytes"]
    for key in ("index", "total", "file_bytes"):
        value = header[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return refuse(f"header field {key!r} must be a non-negative integer")
    if not isinstance(upload, str) or not _UPLOAD_ID.fullmatch(upload):
        return refuse(f"upload id {upload!r} must be 1-100 letters, digits, '.', '_' or '-'")
    if total < 1 or not index < total:
        return refuse(f"index {index} is not within 0..{total - 1}")
    digest = header["file_sha256"]
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return refuse("file_sha256 must be 64 lowercase hex digits")
    if header["kind"] not in KINDS:
        return refuse(f"kind must be one of {KINDS}, got {header['kind']!r}")
    name = header["name"]
    try:
        check_name(name if isinstance(name, str) else "")
    except ConfigError as error:
        return refuse(str(error))
    if total > 1 and size < total - 1:
        return refuse(f"{total} chunks cannot hold a file of {size} bytes")
    return Chunk(upload, name, header["kind"], index, total, size, digest,
                 header["chunk_sha256"], payload)


def default_upload_id(name: str, file_sha256: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80].lstrip("._-") or "file"
    return f"{stem}-{file_sha256[:12]}"


def split_file(path: str | Path, chunk_bytes: int, out: str | Path, *,
               upload: str | None = None, name: str | None = None) -> list[Path]:
    """Cut ``path`` into chunk files of at most ``chunk_bytes`` payload bytes under ``out``
    (the ground side of ``onboard uplink split``); returns them in index order."""
    path, out = Path(path), Path(out)
    if chunk_bytes < 1:
        raise ConfigError(f"--chunk-bytes must be at least 1, got {chunk_bytes}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from error
    name = check_name(name or path.name)
    kind = kind_of(name)
    digest = hashlib.sha256(data).hexdigest()
    upload = upload or default_upload_id(name, digest)
    if not _UPLOAD_ID.fullmatch(upload):
        raise ConfigError(f"upload id {upload!r} must be 1-100 letters, digits, '.', '_' or '-'")
    total = max(1, -(-len(data) // chunk_bytes))
    written = []
    for index in range(total):
        payload = data[index * chunk_bytes:(index + 1) * chunk_bytes]
        header = {"upload": upload, "name": name, "kind": kind, "index": index, "total": total,
                  "file_bytes": len(data), "file_sha256": digest}
        target = out / chunk_file_name(upload, index, total)
        written.append(write_bytes(target, encode_chunk(header, payload)))
    return written


def chunk_file_name(upload: str, index: int, total: int) -> str:
    width = max(4, len(str(total - 1)))
    return f"{upload}.{index:0{width}d}-of-{total:0{width}d}{CHUNK_SUFFIX}"
