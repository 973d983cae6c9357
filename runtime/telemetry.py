"""Structured telemetry: one JSON object per line, because on orbit a log is all you get back.

Telemetry competes with products for onboard storage and downlink, so it has a budget in bytes
per pass: once it is spent, detail records (per tile) are counted instead of written, and the
records that summarise (per acquisition, per pass, errors) are still written. Lines are whole
(each written in one call) and the file is fsync'd at the end of a pass (:meth:`sync`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from onboard.runtime.errors import StorageError


class Telemetry:
    """Writes events as JSON lines to a file (appending) or a stream, flushed per event."""

    def __init__(self, sink: str | Path | IO[str] | None = None,
                 budget_bytes: int | None = None, keep: bool = True) -> None:
        self._own = isinstance(sink, (str, Path))
        self.path = Path(sink) if isinstance(sink, (str, Path)) else None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._stream: IO[str] | None = open(self.path, "a", encoding="utf-8")
            except OSError as error:
                raise StorageError(self.path, f"cannot open telemetry: "
                                              f"{error.strerror or error}") from error
        else:
            self._stream = sink  # type: ignore[assignment]
        self.budget_bytes = budget_bytes
        self.keep = keep
        self.events: list[dict[str, Any]] = []
        self.bytes_written = 0
        self.dropped = 0  # detail records not written because the budget was spent
        self._lock = threading.Lock()  # the pipeline's threads share one telemetry

    @property
    def detail_budget_spent(self) -> bool:
        """True once detail records are no longer written (so callers can skip making them)."""
        return self.budget_bytes is not None and self.bytes_written >= self.budget_bytes

    def emit(self, event: str, *, detail: bool = False, **fields: Any) -> dict[str, Any]:
        """Record ``event``; a ``detail`` record is counted, not written, once the budget is
        spent."""
        record = {"t": round(time.time(), 3), "event": event, **fields}
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            over = (self.budget_bytes is not None
                    and self.bytes_written + len(line) > self.budget_bytes)
            if detail and over:
                self.dropped += 1
                return record
            if self.keep:
                self.events.append(record)
            if self._stream is not None:
                try:
                    self._stream.write(line)
                    self._stream.flush()
                except OSError as error:
                    raise StorageError(self.path, f"cannot write telemetry: "
                                                  f"{error.strerror or error}") from error
            self.bytes_written += len(line)
        return record

    def new_pass(self) -> None:
        """Start a new pass's budget."""
        self.bytes_written = 0
        self.dropped = 0

    def sync(self) -> None:
        """Make what was written durable (end of a pass)."""
        if self._own and self._stream is not None:
            try:
                self._stream.flush()
                os.fsync(self._stream.fileno())
            except OSError as error:
                raise StorageError(self.path, f"cannot sync telemetry: "
                                              f"{error.strerror or error}") from error

    def close(self) -> None:
        if self._own and self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except OSError as error:
                raise StorageError(self.path, f"cannot write telemetry: "
                                              f"{error.strerror or error}") from error


def stderr_telemetry() -> Telemetry:
    return Telemetry(sys.stderr)
