"""The downlink queue: products waiting for a pass, kept in SQLite so a crash loses none.

Each item is one product file under its product id: ``queued -> sending -> acknowledged``.
SQLite's own journal makes each transition durable (WAL, ``synchronous=FULL``: a committed
transition survives a kill or a power cut). An item found in ``sending`` when the queue is
opened was on the link when the process died: the ground may or may not have it, so it goes back
to ``queued`` and is sent again under the same id, and the receiver drops the id if it already
has it. Delivery is therefore at least once on the link and exactly once in the ground's store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboard.runtime.errors import OnboardError, StorageError

QUEUED, SENDING, ACKNOWLEDGED = "queued", "sending", "acknowledged"
STATES = (QUEUED, SENDING, ACKNOWLEDGED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    nbytes INTEGER NOT NULL CHECK (nbytes >= 0),
    sha256 TEXT NOT NULL,
    priority REAL NOT NULL,
    window_index INTEGER,
    state TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'acknowledged')),
    attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL,
    sent_at REAL,
    acknowledged_at REAL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS items_order ON items (state, window_index, priority);
"""

# Sending order: the plan's window first (a product planned for the next pass does not take the
# place of one planned for this one), then priority (value per byte), then arrival.
_ORDER = "ORDER BY window_index IS NULL, window_index, priority DESC, rowid"


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks (products are megabytes)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise StorageError(path, f"cannot read to checksum: {error.strerror or error}") from error
    return digest.hexdigest()


@dataclass(frozen=True)
class QueueItem:
    id: str
    path: Path
    nbytes: int
    sha256: str
    priority: float
    window: int | None
    state: str
    attempts: int
    enqueued_at: float
    sent_at: float | None = None
    acknowledged_at: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


_COLUMNS = ("id, path, nbytes, sha256, priority, window_index, state, attempts, enqueued_at, "
            "sent_at, acknowledged_at, meta")


class _DamagedRow(OnboardError, ValueError):
    """A row whose values are not what the schema wrote (a damaged database file); the queue
    reports it as a StorageError naming the database."""


def _item(row: tuple[Any, ...]) -> QueueItem:
    try:
        meta = json.loads(row[11])
        if not isinstance(meta, dict):
            raise _DamagedRow(f"a damaged row (meta is a {type(meta).__name__})")
        return QueueItem(row[0], Path(row[1]), int(row[2]), row[3], float(row[4]), row[5],
                         row[6], int(row[7]), float(row[8]), row[9], row[10], meta)
    except (TypeError, ValueError) as error:
        raise _DamagedRow(f"a damaged row ({error})") from error


class DownlinkQueue:
    """The persistent queue of products to send. One process opens it at a time.

    ``recovered`` lists the ids that were found in ``sending`` on open and were queued again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; each change below is one
            # explicit transaction, so a kill leaves each transition whole or absent.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except (OSError, sqlite3.Error) as error:
            raise StorageError(self.path, f"cannot open the downlink queue: {error}") from error
        try:
            self._set_up()
        except BaseException:
            self._db.close()  # a queue that cannot be opened holds no connection
            raise

    def _set_up(self) -> None:
        with self._errors("set up"):
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(self.path, f"cannot use WAL journaling (got {mode!r})")
            self._db.execute("PRAGMA synchronous=FULL")
            # Onboard storage is budgeted: fold the log back every 64 pages (256 KiB), not the
            # default 1000 (4 MiB).
            self._db.execute("PRAGMA wal_autocheckpoint=64")
            self._db.executescript(_SCHEMA)
            with self._transaction():
                stuck = [row[0] for row in self._db.execute(
                    "SELECT id FROM items WHERE state = ? ORDER BY rowid", (SENDING,))]
                self._db.execute("UPDATE items SET state = ? WHERE state = ?", (QUEUED, SENDING))
        self.recovered: list[str] = stuck

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        # A damaged file also shows as text that is not UTF-8 (Python's sqlite3 raises
        # UnicodeDecodeError decoding such a schema's error message) or as a row of wrong types.
        except (sqlite3.Error, UnicodeDecodeError, _DamagedRow) as error:
            raise StorageError(self.path, f"downlink queue: cannot {doing}: {error}") from error

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        if getattr(self, "_batching", False):  # inside batch(): its transaction holds this
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many changes as one transaction (one fsync): all of them, or none after a crash."""
        with self._errors("batch"), self._transaction():
            self._batching = True
            try:
                yield
            finally:
                self._batching = False

    def checkpoint(self) -> None:
        """Fold the write-ahead log back into the database (end of a pass): the WAL otherwise
        keeps growing and counts against the onboard storage budget."""
        with self._errors("checkpoint"):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._errors("close"):
            self._db.close()

    def __enter__(self) -> DownlinkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- items ------------------------------------------------------------------------------

    def enqueue(self, item_id: str, path: str | Path, *, priority: float = 0.0,
                window: int | None = None, sha256: str | None = None,
                meta: dict[str, Any] | None = None) -> bool:
        """Queue the product file ``path`` under ``item_id``; False if the id is already there.

        Idempotent by id: a second enqueue of a known id changes nothing, except that an item
        still ``queued`` whose file was remade (another SHA-256) takes the new file, since the
        ground has not seen it yet. ``sha256`` may be given to save reading the file again.
        """
        path = Path(path)
        try:
            nbytes = path.stat().st_size
        except OSError as error:
            raise StorageError(path, f"cannot queue {item_id!r}: "
                                     f"{error.strerror or error}") from error
        digest = sha256 or file_sha256(path)
        with self._errors(f"enqueue {item_id!r}"), self._transaction():
            inserted = self._db.execute(
                "INSERT OR IGNORE INTO items (id, path, nbytes, sha256, priority, window_index, "
                "state, enqueued_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, str(path), nbytes, digest, float(priority), window, QUEUED,
                 time.time(), json.dumps(meta or {}, default=str))).rowcount
            if not inserted:
                self._db.execute(
                    "UPDATE items SET path = ?, nbytes = ?, sha256 = ? "
                    "WHERE id = ? AND state = ? AND sha256 != ?",
                    (str(path), nbytes, digest, item_id, QUEUED, digest))
        return bool(inserted)

    def get(self, item_id: str) -> QueueItem | None:
        with self._errors(f"read {item_id!r}"):
            row = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE id = ?",
                                   (item_id,)).fetchone()
        return None if row is None else _item(row)

    def next(self, limit: int | None = None) -> list[QueueItem]:
        """Queued items in sending order (window, then priority, then arrival)."""
        sql = f"SELECT {_COLUMNS} FROM items WHERE state = ? {_ORDER}"
        args: tuple[Any, ...] = (QUEUED,)
        if limit is not None:
            sql += " LIMIT ?"
            args += (int(limit),)
        with self._errors("list queued items"):
            return [_item(row) for row in self._db.execute(sql, args)]

    def items(self, state: str | None = None) -> list[QueueItem]:
        sql = f"SELECT {_COLUMNS} FROM items"
        args: tuple[Any, ...] = ()
        if state is not None:
            sql += " WHERE state = ?"
            args = (state,)
        with self._errors("list items"):
            return [_item(row) for row in self._db.execute(sql + " " + _ORDER, args)]

    def _move(self, item_id: str, source: str, target: str, extra: str = "",
              args: tuple[Any, ...] = ()) -> None:
        with self._errors(f"mark {item_id!r} {target}"), self._transaction():
            changed = self._db.execute(
                f"UPDATE items SET state = ?{extra} WHERE id = ? AND state = ?",
                (target, *args, item_id, source)).rowcount
            if not changed:
                row = self._db.execute("SELECT state FROM items WHERE id = ?",
                                       (item_id,)).fetchone()
                now = "not in the queue" if row is None else f"{row[0]}"
                raise StorageError(self.path, f"downlink queue: cannot mark {item_id!r} "
                                              f"{target}: it is {now}, not {source}")

    def mark_sending(self, item_id: str) -> None:
        self._move(item_id, QUEUED, SENDING, ", attempts = attempts + 1, sent_at = ?",
                   (time.time(),))

    def mark_acknowledged(self, item_id: str) -> None:
        self._move(item_id, SENDING, ACKNOWLEDGED, ", acknowledged_at = ?", (time.time(),))

    def requeue(self, item_id: str) -> None:
        """A send that was not acknowledged: the item waits for the next chance."""
        self._move(item_id, SENDING, QUEUED)

    def reprioritize(self, item_id: str, priority: float, window: int | None) -> None:
        """A new plan's priority and window for an item not yet acknowledged."""
        with self._errors(f"reprioritize {item_id!r}"), self._transaction():
            self._db.execute("UPDATE items SET priority = ?, window_index = ? "
                             "WHERE id = ? AND state != ?",
                             (float(priority), window, item_id, ACKNOWLEDGED))

    def forget(self, item_id: str) -> None:
        """Remove an acknowledged item (its file may then be deleted)."""
        with self._errors(f"forget {item_id!r}"), self._transaction():
            self._db.execute("DELETE FROM items WHERE id = ? AND state = ?",
                             (item_id, ACKNOWLEDGED))

    def counts(self) -> dict[str, int]:
        with self._errors("count items"):
            found = dict(self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state"))
        return {state: int(found.get(state, 0)) for state in STATES}

    def bytes_held(self) -> int:
        """Bytes of the products not yet acknowledged: what the queue keeps on board."""
        with self._errors("sum bytes"):
            total = self._db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM items "
                                     "WHERE state != ?", (ACKNOWLEDGED,)).fetchone()[0]
        return int(total)

    def __len__(self) -> int:
        with self._errors("count items"):
            return int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
