"""A spool folder that an instrument writes into.

Each complete file is handed out exactly once, in arrival order. What has been handled is kept in
an append-only journal (fsync'd per entry), so a restart after a crash resumes where it stopped:
a file whose handling was not recorded as finished is handed out again, one that was is not.

A file counts as complete once it has its final name (instruments should write ``name.part`` or
``.name`` and rename) and has not changed for ``settle_s`` seconds, which also covers writers
that cannot rename. A file that cannot be handled is moved to ``quarantine/`` and reported.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboard.runtime.errors import OnboardError, SpoolError
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
        self._handled = self._load_journal()

    def _load_journal(self) -> set[str]:
        handled: set[str] = set()
        if not self.journal_path.exists():
            return handled
        with open(self.journal_path, "rb") as fh:
            raw = fh.read()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a crash mid-write leaves a partial last line: it never happened
            try:
                handled.add(json.loads(line)["key"])
            except (ValueError, KeyError):
                raise SpoolError(
                    f"{self.journal_path}: corrupt journal line at byte {good_end}"
                ) from None
            good_end += len(line)
        if good_end != len(raw):
            with open(self.journal_path, "r+b") as fh:
                fh.truncate(good_end)
        return handled

    def _record(self, item: SpoolItem, state: str, **fields: Any) -> None:
        entry = {"key": item.key, "file": item.path.name, "state": state,
                 "t": round(time.time(), 3), **fields}
        try:
            with open(self.journal_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as error:
            raise SpoolError(f"{self.journal_path}: cannot record {item.path.name}: "
                             f"{error.strerror or error}") from error
        self._handled.add(item.key)

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
        self.quarantine.mkdir(exist_ok=True)
        target = self.quarantine / item.path.name
        try:
            shutil.move(str(item.path), target)
        except OSError as move_error:
            raise SpoolError(f"{item.path}: cannot quarantine: {move_error}") from move_error
        self._record(item, "rejected", error=str(error), error_type=type(error).__name__)
        self.telemetry.emit("spool.rejected", file=str(item.path), quarantined=str(target),
                            error=str(error), error_type=type(error).__name__)
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
