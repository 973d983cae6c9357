"""Structured telemetry: one JSON object per line, because on orbit a log is all you get back."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any


class Telemetry:
    """Writes events as JSON lines to a file (appending) or a stream, flushed per event."""

    def __init__(self, sink: str | Path | IO[str] | None = None) -> None:
        self._own = isinstance(sink, (str, Path))
        if isinstance(sink, (str, Path)):
            Path(sink).parent.mkdir(parents=True, exist_ok=True)
            self._stream: IO[str] | None = open(sink, "a", encoding="utf-8")
        else:
            self._stream = sink
        self.events: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"t": round(time.time(), 3), "event": event, **fields}
        self.events.append(record)
        if self._stream is not None:
            self._stream.write(json.dumps(record, default=str) + "\n")
            self._stream.flush()
        return record

    def close(self) -> None:
        if self._own and self._stream is not None:
            self._stream.close()


def stderr_telemetry() -> Telemetry:
    return Telemetry(sys.stderr)
