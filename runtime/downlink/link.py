"""The link: one small interface a transmitter implements, a folder link, and the ground side.

A :class:`Transmitter` sends one product file under its id and says whether the ground
acknowledged it. The :class:`FolderTransmitter` delivers into a :class:`Receiver`'s inbox folder
(the first tests, and a stand-in for CFDP Class 2, which plugs in behind the same interface). The
receiver checks the SHA-256 the product was sent with, stores it atomically under its id, and
drops an id it already has, counting the duplicate: after a crash the queue sends again what was
on the link, so the link is at least once and the ground's store exactly once.

:func:`drain` spends one pass's bytes on the queue, in its order.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, unquote

from onboard.runtime.downlink.queue import DownlinkQueue, QueueItem, file_sha256
from onboard.runtime.durability import Journal, atomic_path, move, remove_partials
from onboard.runtime.errors import OnboardError, StorageError
from onboard.runtime.telemetry import Telemetry

# Longer file names than this are refused by common filesystems (255 bytes), less room for the
# partial-file prefix and suffix durability adds.
_MAX_NAME = 200


class Transmitter(Protocol):
    def send(self, item_id: str, path: Path, sha256: str) -> bool:
        """Send ``path`` under ``item_id``; True once the ground acknowledged it."""
        ...


def stored_name(item_id: str) -> str:
    """A file name for a product id: readable and reversible (ids contain ``/``)."""
    name = quote(item_id, safe="")
    if not item_id or name.startswith(".") or len(name) > _MAX_NAME:
        # Hidden names are durability's partial files; over-long ones do not fit.
        name = "id-" + hashlib.sha256(item_id.encode("utf-8")).hexdigest()
    return name


class Receiver:
    """The ground side of the folder link: ``root/inbox`` receives, ``root/store`` keeps one file
    per product id, ``root/received.jsonl`` records what was stored, dropped and rejected."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.inbox = self.root / "inbox"
        self.store = self.root / "store"
        for folder in (self.inbox, self.store):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StorageError(folder, f"cannot create: {error.strerror or error}") from error
        self.journal = Journal(self.root / "received.jsonl")
        remove_partials(self.inbox)
        remove_partials(self.store)
        # A delivery the receiver died before handling is dropped: the sender did not get its
        # acknowledgement and sends it again.
        for stale in self.inbox.iterdir():
            if stale.is_file():
                with contextlib.suppress(OSError):
                    stale.unlink()
        self._reconcile()

    def _reconcile(self) -> None:
        """A product moved into the store just before a crash has no "stored" record yet; the
        file is the commit point, so the record is written now (its id from the "storing"
        record written before the move: a hashed name cannot be read back)."""
        ids = {r["name"]: str(r["id"]) for r in self.journal.records if "name" in r}
        recorded = {r["name"] for r in self._events("stored")}
        for entry in sorted(self.store.iterdir()):
            if entry.is_file() and entry.name not in recorded:
                self.journal.append({"event": "stored", "id": ids.get(entry.name,
                                                                      unquote(entry.name)),
                                     "name": entry.name, "nbytes": entry.stat().st_size,
                                     "sha256": file_sha256(entry), "recovered": True,
                                     "t": round(time.time(), 3)})

    def inbox_path(self, item_id: str) -> Path:
        return self.inbox / stored_name(item_id)

    def path_of(self, item_id: str) -> Path:
        return self.store / stored_name(item_id)

    def has(self, item_id: str) -> bool:
        return self.path_of(item_id).is_file()

    def accept(self, item_id: str, sha256: str) -> bool:
        """Take the delivery of ``item_id`` from the inbox: True (acknowledged) when it is
        stored or was already; False when its bytes do not match ``sha256``."""
        delivered = self.inbox_path(item_id)
        if self.has(item_id):
            with contextlib.suppress(OSError):
                delivered.unlink()
            self.journal.append({"event": "duplicate", "id": item_id,
                                 "t": round(time.time(), 3)})
            return True
        got = file_sha256(delivered)
        if got != sha256:
            with contextlib.suppress(OSError):
                delivered.unlink()
            self.journal.append({"event": "rejected", "id": item_id, "expected": sha256,
                                 "got": got, "t": round(time.time(), 3)})
            return False
        target = self.path_of(item_id)
        nbytes = delivered.stat().st_size
        self.journal.append({"event": "storing", "id": item_id, "name": target.name})
        move(delivered, target)
        self.journal.append({"event": "stored", "id": item_id, "name": target.name,
                             "nbytes": nbytes, "sha256": sha256, "t": round(time.time(), 3)})
        return True

    def _events(self, event: str) -> list[dict]:
        return [r for r in self.journal.records if r.get("event") == event]

    def ids(self) -> set[str]:
        """The ids in the store."""
        names = {entry.name for entry in self.store.iterdir() if entry.is_file()}
        by_name = {r["name"]: str(r["id"]) for r in self._events("stored")}
        return {by_name.get(name, unquote(name)) for name in names}

    def stored_counts(self) -> dict[str, int]:
        """How many times each id was written into the store (one, or there is a bug)."""
        counts: dict[str, int] = {}
        for record in self._events("stored"):
            counts[record["id"]] = counts.get(record["id"], 0) + 1
        return counts

    @property
    def duplicates(self) -> int:
        return len(self._events("duplicate"))

    @property
    def rejected(self) -> int:
        return len(self._events("rejected"))


class FolderTransmitter:
    """Delivers each product into a :class:`Receiver`'s inbox (an atomic copy) and hands it
    over; the receiver's answer is the acknowledgement."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def send(self, item_id: str, path: Path, sha256: str) -> bool:
        with atomic_path(self.receiver.inbox_path(item_id)) as tmp:
            try:
                shutil.copyfile(path, tmp)
            except OSError as error:
                raise StorageError(path, f"cannot send {item_id!r}: "
                                         f"{error.strerror or error}") from error
        return self.receiver.accept(item_id, sha256)


@dataclass
class DrainReport:
    """What one pass's drain did. Two byte counts, because they differ on a link that can fail
    mid-transfer: ``sent_bytes`` is the product bytes put on the link (what the pass spent:
    a transfer cut by the end of the pass, or one the ground refused, used the link as much as
    one that arrived), ``acknowledged_bytes`` those the ground confirmed. ``link_bytes`` is the
    octets the downlink carried meanwhile (protocol overhead and retransmissions included),
    where the transmitter counts them."""

    budget_bytes: int
    sent_bytes: int = 0
    charged_bytes: int = 0  # what the budget was charged: products and the link's overhead
    acknowledged_bytes: int = 0
    link_bytes: int | None = None
    acknowledged: list[str] = field(default_factory=list)
    not_acknowledged: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # id -> error
    left_for_later: int = 0  # queued items that did not fit what was left of the budget

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "sent_bytes": self.sent_bytes,
                "charged_bytes": self.charged_bytes,
                "acknowledged_bytes": self.acknowledged_bytes, "link_bytes": self.link_bytes,
                "acknowledged": len(self.acknowledged),
                "not_acknowledged": len(self.not_acknowledged), "failed": dict(self.failed),
                "left_for_later": self.left_for_later}


def link_cost(transmitter: object | None, nbytes: int) -> int:
    """What sending a product of ``nbytes`` spends of a pass: its bytes and, on a link that
    states one (``overhead_bytes``: CFDP's headers, Metadata and EOF), the link's overhead."""
    overhead = getattr(transmitter, "overhead_bytes", None)
    return int(nbytes) + (int(overhead(int(nbytes))) if callable(overhead) else 0)


def _link_bytes(transmitter: Transmitter) -> int | None:
    value = getattr(transmitter, "link_bytes", None)
    return value if isinstance(value, int) else None


def drain(queue: DownlinkQueue, transmitter: Transmitter, budget_bytes: int,
          telemetry: Telemetry | None = None) -> DrainReport:
    """Send queued items in the queue's order while they fit ``budget_bytes``; an item too big
    for what is left waits, smaller ones after it still go.

    An item is charged to the budget when its transfer starts, acknowledged or not (bytes on
    the link spend the pass); one that never went on the link (unreadable, or the pass ended
    before it started) is not. A transmitter with ``transfer_many`` (CFDP) has several
    transfers in flight, each item settled in the queue as its own ends."""
    report = DrainReport(int(budget_bytes))
    left = int(budget_bytes)
    link0 = _link_bytes(transmitter)
    pending = iter(queue.next())
    started: dict[str, tuple[QueueItem, int]] = {}

    def pull() -> tuple[str, Path, str] | None:
        nonlocal left
        for item in pending:
            cost = link_cost(transmitter, item.nbytes)
            if cost > left:
                report.left_for_later += 1
                continue
            queue.mark_sending(item.id)
            left -= cost
            report.sent_bytes += item.nbytes
            report.charged_bytes += cost
            started[item.id] = item, cost
            return item.id, item.path, item.sha256
        return None

    def settle(item_id: str, acknowledged: bool, on_link: bool = True,
               error: str | None = None) -> None:
        nonlocal left
        item, cost = started.pop(item_id)
        if not on_link:
            left += cost
            report.sent_bytes -= item.nbytes
            report.charged_bytes -= cost
        if error is not None:
            # A product the link cannot read stays queued and the pass goes on; the error is
            # in the report, never swallowed.
            queue.requeue(item_id)
            report.failed[item_id] = error
        elif acknowledged:
            queue.mark_acknowledged(item_id)
            report.acknowledged.append(item_id)
            report.acknowledged_bytes += item.nbytes
        else:
            queue.requeue(item_id)
            report.not_acknowledged.append(item_id)

    many = getattr(transmitter, "transfer_many", None)
    if many is not None:
        for result in many(pull):
            settle(result.item_id, result.acknowledged,
                   on_link=result.transaction is not None, error=result.error)
    else:
        while (next_item := pull()) is not None:
            try:
                acknowledged = transmitter.send(*next_item)
            except OnboardError as error:
                settle(next_item[0], False, on_link=False, error=str(error))
                continue
            settle(next_item[0], acknowledged)
    link1 = _link_bytes(transmitter)
    if link0 is not None and link1 is not None:
        report.link_bytes = link1 - link0
    end_pass = getattr(transmitter, "end_pass", None)
    if end_pass is not None:
        end_pass()
    if telemetry is not None:
        telemetry.emit("downlink.drain", **report.to_dict())
    return report
