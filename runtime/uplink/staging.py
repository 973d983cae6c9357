"""The staging area: chunks of uplinked files, assembled across restarts, each exactly once.

Layout under the uplink folder (``STATE/uplink``)::

    staging/<upload>/meta.json       what the upload assembles into (name, kind, total, SHA-256)
    staging/<upload>/<index>.part    each verified chunk payload, written atomically
    received/<name>                  assembled files, whole and checked against their SHA-256
    journal.jsonl                    refused chunks and assembled uploads (durability.Journal)

Every chunk file and the assembled file are written through :mod:`onboard.runtime.durability`
(temp, fsync, rename, fsync folder), so a SIGKILL at any point leaves either the old state or the
new one: a chunk is on disk whole or not at all, and the chunk files themselves are the record of
what arrived (no second bookkeeping that could disagree with them). Assembly is finished on the
next open when a kill came between the assembled file and its journal record, and the staged
chunks are removed only after the ``assembled`` record is durable: an upload is assembled once.

Disk budget: staged chunks may use ``staging_budget_bytes`` (settings). A chunk that would pass
it evicts the incomplete upload that has waited longest since its last chunk (never the one the
chunk belongs to); if that is not enough the chunk is refused, saying so, and asked for again.
Assembled files in ``received/`` are evicted oldest first past ``received_budget_bytes``: an
activated set holds its own copies (see :mod:`.active`), so nothing running depends on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboard.runtime.durability import (
    Journal,
    atomic_path,
    remove_partials,
    write_bytes,
    write_json,
)
from onboard.runtime.errors import StorageError
from onboard.runtime.uplink.chunks import Chunk, Refusal, parse_chunk

PART_SUFFIX = ".part"
_COPY = 1 << 20


@dataclass
class Outcome:
    """What one received chunk did: ``accepted``, ``duplicate``, ``assembled`` or ``refused``."""

    status: str
    source: str
    upload: str | None = None
    index: int | None = None
    reason: str = ""
    assembled: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "source": self.source, "upload": self.upload,
                "index": self.index, "reason": self.reason,
                "assembled": None if self.assembled is None else str(self.assembled)}


@dataclass
class UploadStatus:
    upload: str
    name: str
    kind: str
    total: int
    file_bytes: int
    file_sha256: str
    present: list[int] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # index -> last reason, if still due

    @property
    def missing(self) -> list[int]:
        have = set(self.present)
        return [i for i in range(self.total) if i not in have]

    def to_dict(self) -> dict[str, Any]:
        return {"upload": self.upload, "name": self.name, "kind": self.kind,
                "total": self.total, "received": len(self.present),
                "missing": self.missing, "missing_ranges": ranges(self.missing),
                "asked_again": {str(k): v for k, v in sorted(self.refused.items())},
                "file_bytes": self.file_bytes, "file_sha256": self.file_sha256}


def ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``: how the ground asks for chunks again."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


class Staging:
    """Chunks in, whole files out, under ``folder`` (``STATE/uplink``)."""

    def __init__(self, folder: str | Path, staging_budget_bytes: int = 256 * 2**20,
                 received_budget_bytes: int = 512 * 2**20) -> None:
        self.folder = Path(folder)
        self.staging = self.folder / "staging"
        self.received = self.folder / "received"
        self.staging_budget_bytes = staging_budget_bytes
        self.received_budget_bytes = received_budget_bytes
        for folder_ in (self.staging, self.received):
            try:
                folder_.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StorageError(folder_, f"cannot create: {error.strerror or error}") from error
        self.journal = Journal(self.folder / "journal.jsonl")
        remove_partials(self.received)
        self._recover()

    # -- after a restart -------------------------------------------------------------------------

    def _assembled_records(self) -> dict[str, dict[str, Any]]:
        return {r["upload"]: r for r in self.journal if r.get("event") == "assembled"}

    def _recover(self) -> None:
        """Finish what a kill interrupted: remove partial chunk writes, remove the chunks of
        uploads already assembled, assemble uploads whose chunks are all here."""
        assembled = self._assembled_records()
        for upload_dir in sorted(p for p in self.staging.iterdir() if p.is_dir()):
            remove_partials(upload_dir)
            record = assembled.get(upload_dir.name)
            meta = self._meta(upload_dir)
            if record is not None and (meta is None
                                       or meta.get("file_sha256") == record.get("sha256")):
                shutil.rmtree(upload_dir, ignore_errors=True)
                continue
            if meta is not None and not self._status(upload_dir, meta).missing:
                self._assemble(upload_dir, meta)

    # -- receiving -------------------------------------------------------------------------------

    def receive_file(self, path: str | Path) -> Outcome:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            return Outcome("refused", str(path), reason=f"cannot read: {error.strerror or error}")
        return self.receive(data, str(path))

    def receive(self, data: bytes, source: str = "chunk") -> Outcome:
        """Take one chunk: check it, stage it, assemble the file once every chunk is here."""
        chunk = parse_chunk(data)
        if isinstance(chunk, Refusal):
            return self._refuse(source, chunk)
        upload_dir = self.staging / chunk.upload
        if self._already_assembled(chunk):
            return Outcome("duplicate", source, chunk.upload, chunk.index,
                           reason="the upload is already assembled")
        meta = self._meta(upload_dir)
        if meta is not None and meta != {**chunk.describe(), "created": meta.get("created")}:
            differs = sorted(k for k, v in chunk.describe().items() if meta.get(k) != v)
            return self._refuse(source, Refusal(
                f"its header disagrees with the upload's earlier chunks on {differs}; "
                "send it again", chunk.upload, chunk.index))
        part = upload_dir / f"{chunk.index:06d}{PART_SUFFIX}"
        if part.exists():
            return Outcome("duplicate", source, chunk.upload, chunk.index,
                           reason="this chunk is already staged")
        room = self._make_room(len(chunk.payload) + (0 if meta else 512), chunk.upload)
        if room:
            return self._refuse(source, Refusal(room, chunk.upload, chunk.index))
        if meta is None:
            meta = {**chunk.describe(), "created": time.time()}
            write_json(upload_dir / "meta.json", meta)
        write_bytes(part, chunk.payload)
        status = self._status(upload_dir, meta)
        if status.missing:
            return Outcome("accepted", source, chunk.upload, chunk.index)
        return self._assemble(upload_dir, meta, source, chunk)

    def _refuse(self, source: str, refusal: Refusal) -> Outcome:
        self.journal.append({"event": "chunk_refused", "t": round(time.time(), 3),
                             "upload": refusal.upload, "index": refusal.index,
                             "source": source, "reason": refusal.reason})
        return Outcome("refused", source, refusal.upload, refusal.index, refusal.reason)

    def _current(self) -> dict[str, dict[str, Any]]:
        """name -> the assembled record whose file ``received/<name>`` holds now."""
        current: dict[str, dict[str, Any]] = {}
        for record in self.journal:
            if record.get("event") == "assembled":
                current[record["name"]] = record
            elif record.get("event") == "received_evicted":
                current.pop(record["name"], None)
        return {name: r for name, r in current.items()
                if (self.received / name).is_file()}

    def _already_assembled(self, chunk: Chunk) -> bool:
        # Re-uplinking the same upload is allowed once its file was evicted or replaced.
        record = self._current().get(chunk.name)
        return record is not None and record["upload"] == chunk.upload \
            and record["sha256"] == chunk.file_sha256

    def _assemble(self, upload_dir: Path, meta: dict[str, Any], source: str = "recovery",
                  chunk: Chunk | None = None) -> Outcome:
        upload, name = meta["upload"], meta["name"]
        target = self.received / name
        parts = [upload_dir / f"{i:06d}{PART_SUFFIX}" for i in range(meta["total"])]
        index = None if chunk is None else chunk.index
        digest = hashlib.sha256()
        size = 0
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            size += len(data)
        if digest.hexdigest() != meta["file_sha256"] or size != meta["file_bytes"]:
            # Every chunk verified on its own, so the ground's header was wrong: start over.
            reason = (f"the assembled {size} B have SHA-256 {digest.hexdigest()[:16]}…, not the "
                      f"{meta['file_bytes']} B with {meta['file_sha256'][:16]}… the chunks "
                      "announce: split the file again and send every chunk")
            self.journal.append({"event": "upload_failed", "t": round(time.time(), 3),
                                 "upload": upload, "name": name, "reason": reason})
            shutil.rmtree(upload_dir, ignore_errors=True)
            return Outcome("refused", source, upload, index, reason)
        current = self._current().get(name)
        if current is None or current["sha256"] != meta["file_sha256"] \
                or target.stat().st_size != size:
            # (Already there when a kill came after the rename and before the journal record.)
            with atomic_path(target) as tmp, open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as handle:
                        shutil.copyfileobj(handle, out, _COPY)
        self._evict_received(keep=name)
        self.journal.append({"event": "assembled", "t": round(time.time(), 3),
                             "upload": upload, "name": name, "kind": meta["kind"],
                             "bytes": meta["file_bytes"], "sha256": meta["file_sha256"],
                             "path": str(target)})
        shutil.rmtree(upload_dir, ignore_errors=True)
        return Outcome("assembled", source, upload, index, assembled=target)

    # -- status ----------------------------------------------------------------------------------

    def _meta(self, upload_dir: Path) -> dict[str, Any] | None:
        path = upload_dir / "meta.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise StorageError(path, f"cannot read upload meta: {error}") from error

    def _status(self, upload_dir: Path, meta: dict[str, Any]) -> UploadStatus:
        present = sorted(int(p.name[: -len(PART_SUFFIX)]) for p in upload_dir.iterdir()
                         if p.name.endswith(PART_SUFFIX) and p.name[: -len(PART_SUFFIX)].isdigit())
        present = [i for i in present if i < meta["total"]]
        refused: dict[int, str] = {}
        for record in self.journal:
            if record.get("event") == "chunk_refused" and record.get("upload") == meta["upload"] \
                    and isinstance(record.get("index"), int):
                refused[record["index"]] = record["reason"]
        for i in present:
            refused.pop(i, None)
        return UploadStatus(meta["upload"], meta["name"], meta["kind"], meta["total"],
                            meta["file_bytes"], meta["file_sha256"], present, refused)

    def uploads(self) -> list[UploadStatus]:
        """Every incomplete upload: what arrived, what is missing, what was asked again."""
        out = []
        for upload_dir in sorted(p for p in self.staging.iterdir() if p.is_dir()):
            meta = self._meta(upload_dir)
            if meta is not None:
                out.append(self._status(upload_dir, meta))
        return out

    def assembled(self) -> list[dict[str, Any]]:
        """The assembled files now in ``received/`` (journal records), oldest first."""
        return sorted(self._current().values(), key=lambda r: r["t"])

    def unreadable_refusals(self) -> list[dict[str, Any]]:
        """Refused chunks whose header could not be read: the ground resends by the missing
        list, since their index is unknown."""
        return [r for r in self.journal if r.get("event") == "chunk_refused"
                and r.get("index") is None]

    def path_of(self, name: str) -> Path:
        path = self.received / name
        if not path.is_file():
            names = [r["name"] for r in self.assembled()]
            raise StorageError(path, f"no received file {name!r}; received: {names or 'none'}")
        return path

    # -- disk budget -----------------------------------------------------------------------------

    def staged_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.staging.rglob("*") if p.is_file())

    def _make_room(self, needed: int, keep: str) -> str:
        """Evict stale incomplete uploads until ``needed`` bytes fit; the refusal reason if
        they cannot."""
        if needed > self.staging_budget_bytes:
            return (f"the chunk ({needed} B) is larger than the whole staging budget "
                    f"({self.staging_budget_bytes} B)")
        while self.staged_bytes() + needed > self.staging_budget_bytes:
            stale = [(self._last_change(p), p) for p in self.staging.iterdir()
                     if p.is_dir() and p.name != keep]
            if not stale:
                return (f"staging is full ({self.staged_bytes()} of "
                        f"{self.staging_budget_bytes} B used by this upload); send it again "
                        "once space is freed")
            _, oldest = min(stale)
            meta = self._meta(oldest) or {}
            self.journal.append({"event": "upload_evicted", "t": round(time.time(), 3),
                                 "upload": oldest.name, "name": meta.get("name"),
                                 "reason": "staging budget"})
            shutil.rmtree(oldest, ignore_errors=True)
        return ""

    @staticmethod
    def _last_change(upload_dir: Path) -> float:
        with contextlib.suppress(OSError):
            return max(p.stat().st_mtime for p in upload_dir.iterdir())
        return 0.0

    def _evict_received(self, keep: str) -> None:
        files = sorted((p.stat().st_mtime, p) for p in self.received.iterdir()
                       if p.is_file() and not p.name.startswith("."))
        total = sum(p.stat().st_size for _, p in files)
        for _, path in files:
            if total <= self.received_budget_bytes:
                break
            if path.name == keep:
                continue
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
            self.journal.append({"event": "received_evicted", "t": round(time.time(), 3),
                                 "name": path.name, "reason": "received budget"})
