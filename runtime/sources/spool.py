"""A spool folder that an instrument writes into.

Each complete file is handed out exactly once, in arrival order. What has been handled is kept in
an append-only journal (fsync'd per entry), so a restart after a crash resumes where it stopped:
a file whose handling was not recorded as finished is handed out again, one that was is not.

A file counts as complete once it has its final name (instruments should write ``name.part`` or
``.name`` and rename) and has not changed for ``settle_s`` seconds, which also covers writers
that cannot rename. A file that cannot be handled is moved to ``quarantine/`` and reported.

A rejection is journalled before the file moves (``rejecting``, naming the quarantine target),
and again once it has (``rejected``): a crash in between would otherwise lose why the file was
set aside, or hand out a bad file again. Opening the spool finishes any rejection that was
recorded but not completed, and removes the temporary files a killed writer left in its state.
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboard.runtime.durability import Journal, move, remove_partials
from onboard.runtime.errors import OnboardError, SpoolError, StorageError
from onboard.runtime.telemetry import Telemetry

_PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".incomplete")


@dataclass(frozen=True)
class SpoolItem:
    """One complete file in the spool, identified by name, size and modification time."""

    path: Path
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"{self.path.name}:{self.size}:{self.mtime_ns}"


class Spool:
    def __init__(
        self,
        folder: str | Path,
        patterns: tuple[str, ...] = ("*.tif", "*.tiff"),
        state_dir: str | Path | None = None,
        settle_s: float = 1.0,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SpoolError(f"{self.folder}: spool folder does not exist")
        self.patterns = patterns
        self.settle_s = settle_s
        self.state_dir = Path(state_dir) if state_dir else self.folder / ".onboard"
        self.quarantine = self.folder / "quarantine"
        self.journal_path = self.state_dir / "journal.jsonl"
        self.telemetry = telemetry or Telemetry()
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpoolError(f"{self.state_dir}: cannot create spool state: {error}") from error
        for kept in (self.state_dir, self.quarantine):
            remove_partials(kept)
        self.journal = Journal(self.journal_path)
        self._handled: set[str] = set()
        for number, record in enumerate(self.journal.records, 1):
            if not isinstance(record.get("key"), str) or not isinstance(record.get("file"), str):
                raise StorageError(self.journal_path,
                                   f"journal record {number} has no 'key' and 'file'")
            self._handled.add(record["key"])
        self._finish_rejections()

    def _record(self, item: SpoolItem, state: str, **fields: Any) -> None:
        self.journal.append({"key": item.key, "file": item.path.name, "state": state,
                             "t": round(time.time(), 3), **fields})
        self._handled.add(item.key)

    def _finish_rejections(self) -> None:
        """Complete the rejections a crash interrupted between journalling and moving."""
        last: dict[str, dict[str, Any]] = {}
        for record in self.journal.records:
            last[record["key"]] = record
        for record in last.values():
            if record.get("state") != "rejecting":
                continue
            source = self.folder / record["file"]
            target = self.quarantine / str(record.get("quarantine", record["file"]))
            item = _item(source)
            # Otherwise it moved before the crash, or is gone: the record says which.
            if item is not None and item.key == record["key"]:
                move(source, target)
            fields = {k: record[k] for k in ("error", "error_type") if k in record}
            quarantined = str(target) if target.exists() else None
            self.journal.append({"key": record["key"], "file": record["file"],
                                 "state": "rejected", "t": round(time.time(), 3),
                                 "quarantined": quarantined, "recovered": True, **fields})
            self.telemetry.emit("spool.rejected", file=str(source), quarantined=quarantined,
                                recovered=True, **fields)

    def _quarantine_target(self, name: str) -> Path:
        """Where a rejected file goes; never over an earlier rejected file of the same name."""
        target = self.quarantine / name
        number = 0
        while target.exists():
            number += 1
            target = self.quarantine / f"{Path(name).stem}.{number}{Path(name).suffix}"
        return target

    def pending(self) -> list[SpoolItem]:
        """Complete files not yet handled, oldest first (ties broken by name)."""
        now_ns = time.time_ns()
        items = []
        for entry in os.scandir(self.folder):
            name = entry.name
            if not entry.is_file() or name.startswith(".") or name.endswith(_PARTIAL_SUFFIXES):
                continue
            if not any(fnmatch.fnmatch(name.lower(), p) for p in self.patterns):
                continue
            stat = entry.stat()
            if now_ns - stat.st_mtime_ns < self.settle_s * 1e9:
                continue  # may still be being written
            item = SpoolItem(Path(entry.path), stat.st_size, stat.st_mtime_ns)
            if item.key not in self._handled:
                items.append(item)
        items.sort(key=lambda i: (i.mtime_ns, i.path.name))
        return items

    def done(self, item: SpoolItem, **fields: Any) -> None:
        """Record that ``item`` was handled; call only after its products are safely written."""
        self._record(item, "done", **fields)
        self.telemetry.emit("spool.done", file=str(item.path), **fields)

    def reject(self, item: SpoolItem, error: Exception) -> Path:
        """Set a file that cannot be handled aside in quarantine/ and report why."""
        target = self._quarantine_target(item.path.name)
        reason = {"error": str(error), "error_type": type(error).__name__}
        self._record(item, "rejecting", quarantine=target.name, **reason)
        move(item.path, target)
        self._record(item, "rejected", quarantined=str(target), **reason)
        self.telemetry.emit("spool.rejected", file=str(item.path), quarantined=str(target),
                            **reason)
        return target

    def drain(self, handle: Callable[[SpoolItem], dict[str, Any] | None]) -> list[SpoolItem]:
        """Handle every pending file once, in order; bad files are rejected, not fatal.

        ``handle`` raises an :class:`OnboardError` for a file it cannot use. Returns the items
        handled successfully.
        """
        handled = []
        for item in self.pending():
            try:
                fields = handle(item) or {}
            except OnboardError as error:
                self.reject(item, error)
                continue
            self.done(item, **fields)
            handled.append(item)
        return handled

    def watch(self, poll_s: float = 1.0, stop: Callable[[], bool] = lambda: False
              ) -> Iterator[SpoolItem]:
        """Pending files as they arrive, until ``stop()`` is true. The caller records each."""
        while not stop():
            items = self.pending()
            yield from items
            if not items:
                time.sleep(poll_s)


def _item(path: Path) -> SpoolItem | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return SpoolItem(path, stat.st_size, stat.st_mtime_ns) if path.is_file() else None
