"""Compiled engines kept on flash between runs: a TensorRT plan, an OpenVINO compiled blob.

Building an engine takes seconds to minutes on the board (TensorRT, OpenVINO on a GPU or NPU),
so it is built once and cached. A cached engine is trusted no more than the bundle it came from:
a half-written entry (a kill mid-store), a flash bit flip or a file from another build must never
reach a runtime, which would load it without complaint (OpenVINO imports a blob cut short by a
byte). So each entry is one file, written once through :mod:`onboard.runtime.durability` (the
old entry or the new one, never half), whose first line holds the SHA-256 and length of the
blob; :meth:`EngineCache.load` checks both before it hands the blob out, and reports damage
instead of raising: the caller builds again, and the next :meth:`EngineCache.store` replaces
the bad entry.

The key says everything the blob depends on (bundle hash, runtime version, device, precision,
batch); the caller makes it, since only the engine knows what its blob depends on.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from onboard.runtime.durability import atomic_path, remove_partials
from onboard.runtime.errors import StorageError
from onboard.runtime.telemetry import Telemetry

SUFFIX = ".engine"
_MAGIC = b"onboard-engine-cache 1"
_HEADER = re.compile(rb"onboard-engine-cache 1 sha256=([0-9a-f]{64}) bytes=([0-9]{1,12})\n")
# One header line is at most this long; a longer first line is not an entry of ours.
_HEADER_MAX = 128


def safe_key(key: str) -> str:
    """``key`` as a plain file name (device names carry spaces, brackets and slashes)."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", key).strip("-.")
    if not cleaned:
        raise StorageError(Path(key), "an engine cache key needs letters or digits")
    return cleaned


class EngineCache:
    """Verified engine blobs under ``folder``, one file per key.

    ``damaged`` lists the entries :meth:`load` found damaged and refused (also emitted as
    ``engine_cache_damaged`` in ``telemetry``).
    """

    def __init__(self, folder: str | Path, telemetry: Telemetry | None = None) -> None:
        self.folder = Path(folder).expanduser()
        self.telemetry = telemetry
        self.damaged: list[Path] = []
        # What a store killed mid-write left (open_engine does this too, for a cache_dir it is
        # given; a backend's default folder is cleaned here).
        remove_partials(self.folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{safe_key(key)}{SUFFIX}"

    def load(self, key: str) -> bytes | None:
        """The blob stored under ``key``, verified; None when there is none or it is damaged
        (short, changed, not an entry of this cache), which is reported, not raised."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            self._report(path, f"cannot read: {error.strerror or error}")
            return None
        end = data.find(b"\n", 0, _HEADER_MAX)
        match = _HEADER.fullmatch(data[: end + 1]) if end >= 0 else None
        if match is None:
            self._report(path, "no engine cache header")
            return None
        blob = data[end + 1:]
        if len(blob) != int(match.group(2)):
            self._report(path, f"{len(blob)} bytes, the header says {int(match.group(2))}")
            return None
        if hashlib.sha256(blob).hexdigest().encode() != match.group(1):
            self._report(path, "the SHA-256 does not match the header")
            return None
        return blob

    def store(self, key: str, blob: bytes) -> Path:
        """Keep ``blob`` under ``key``, atomically (a kill leaves the old entry or this one)."""
        path = self.path(key)
        header = (_MAGIC + f" sha256={hashlib.sha256(blob).hexdigest()} "
                  f"bytes={len(blob)}\n".encode())
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            handle.write(header)
            handle.write(blob)
        return path

    def keep(self, key: str, blob: bytes, **built: object) -> Path | None:
        """:meth:`store`, for an engine that runs whether or not it can be cached: the entry's
        path (``engine_built`` emitted with ``built``), or None when the flash is full or
        read-only (``engine_cache_unusable`` emitted; the engine runs uncached)."""
        try:
            path = self.store(key, blob)
        except StorageError as error:
            self.unusable(key, str(error))
            return None
        if self.telemetry is not None:
            self.telemetry.emit("engine_built", path=str(path), bytes=len(blob), **built)
        return path

    def unusable(self, key: str, message: str) -> None:
        """Say that the entry for ``key`` cannot serve (the engine goes on uncached)."""
        if self.telemetry is not None:
            self.telemetry.emit("engine_cache_unusable", path=str(self.path(key)),
                                message=message[:300])

    def _report(self, path: Path, problem: str) -> None:
        self.damaged.append(path)
        if self.telemetry is not None:
            self.telemetry.emit("engine_cache_damaged", path=str(path), problem=problem)
