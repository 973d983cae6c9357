"""The downlink queue, the folder link and its receiver, and the kill test of the whole path."""

from __future__ import annotations

import hashlib
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onboard.runtime.downlink.link import FolderTransmitter, Receiver, drain, stored_name
from onboard.runtime.downlink.queue import DownlinkQueue
from onboard.runtime.errors import OnboardError, StorageError


def product(folder: Path, name: str, size: int = 100, seed: int = 0) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(f"{name}/{seed}").randbytes(size))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_states_go_queued_sending_acknowledged(tmp_path: Path) -> None:
    a = product(tmp_path, "a.bin", 300)
    with DownlinkQueue(tmp_path / "q.sqlite") as queue:
        assert queue.enqueue("acq/0_0/full", a, priority=1.0, meta={"kind": "full"})
        item = queue.get("acq/0_0/full")
        assert item is not None
        assert (item.state, item.attempts, item.nbytes, item.sha256) == ("queued", 0, 300, sha(a))
        assert item.meta == {"kind": "full"}
        queue.mark_sending(item.id)
        assert queue.get(item.id).state == "sending"
        assert queue.get(item.id).attempts == 1
        queue.mark_acknowledged(item.id)
        done = queue.get(item.id)
        assert done.state == "acknowledged" and done.acknowledged_at is not None
        assert queue.counts() == {"queued": 0, "sending": 0, "acknowledged": 1}
        # A transition from the wrong state is an error naming the database.
        with pytest.raises(StorageError, match=r"q\.sqlite.*acknowledged, not queued"):
            queue.mark_sending(item.id)
        with pytest.raises(StorageError, match="not in the queue"):
            queue.mark_acknowledged("nothing")


def test_enqueue_is_idempotent_by_id(tmp_path: Path) -> None:
    a = product(tmp_path, "a.bin", 100)
    with DownlinkQueue(tmp_path / "q.sqlite") as queue:
        assert queue.enqueue("p", a, priority=2.0)
        assert not queue.enqueue("p", a, priority=9.0)
        assert len(queue) == 1
        assert queue.get("p").priority == 2.0
        # Remade before it was sent: the queue takes the new file.
        product(tmp_path, "a.bin", 120, seed=1)
        assert not queue.enqueue("p", a)
        assert (queue.get("p").nbytes, queue.get("p").sha256) == (120, sha(a))
        # Once acknowledged, the ground has its version: nothing changes any more.
        queue.mark_sending("p")
        queue.mark_acknowledged("p")
        product(tmp_path, "a.bin", 140, seed=2)
        assert not queue.enqueue("p", a)
        assert queue.get("p").nbytes == 120


def test_next_is_window_then_priority_then_arrival(tmp_path: Path) -> None:
    with DownlinkQueue(tmp_path / "q.sqlite") as queue:
        for name, priority, window in [("late", 9.0, 1), ("low", 1.0, 0), ("high", 5.0, 0),
                                       ("tie1", 3.0, 0), ("tie2", 3.0, 0), ("unplanned", 99.0,
                                                                            None)]:
            queue.enqueue(name, product(tmp_path, f"{name}.bin"), priority=priority,
                          window=window)
        assert [i.id for i in queue.next()] == ["high", "tie1", "tie2", "low", "late",
                                                "unplanned"]
        assert [i.id for i in queue.next(limit=2)] == ["high", "tie1"]
        queue.reprioritize("unplanned", 7.0, 0)
        assert queue.next(limit=1)[0].id == "unplanned"


def test_sending_items_go_back_to_queued_on_open_under_the_same_id(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    with DownlinkQueue(db) as queue:
        for name in ("a", "b", "c"):
            queue.enqueue(name, product(tmp_path, f"{name}.bin", 200))
        queue.mark_sending("a")
        queue.mark_sending("b")
        queue.mark_acknowledged("b")
        assert queue.bytes_held() == 400
    with DownlinkQueue(db) as queue:
        assert queue.recovered == ["a"]
        assert queue.get("a").state == "queued"
        assert queue.get("a").attempts == 1  # the attempt on the link before the crash counts
        assert queue.get("b").state == "acknowledged"
        assert [i.id for i in queue.next()] == ["a", "c"]
        assert queue.bytes_held() == 400
        queue.forget("b")
        assert queue.get("b") is None


def test_damaged_database_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"q\.sqlite") as caught:
        DownlinkQueue(db)
    assert isinstance(caught.value, OnboardError)
    with pytest.raises(StorageError, match="missing.bin"):
        with DownlinkQueue(tmp_path / "ok.sqlite") as queue:
            queue.enqueue("x", tmp_path / "missing.bin")


def test_queue_uses_wal_and_full_sync(tmp_path: Path) -> None:
    db = tmp_path / "q.sqlite"
    with DownlinkQueue(db) as queue:
        queue.enqueue("a", product(tmp_path, "a.bin"))
        assert queue._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_receiver_stores_once_drops_duplicates_and_rejects_bad_bytes(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "ground")
    link = FolderTransmitter(receiver)
    a = product(tmp_path, "a.bin", 500)
    assert link.send("acq/1_2/full", a, sha(a))
    assert link.send("acq/1_2/full", a, sha(a))  # sent again after a crash: acknowledged
    assert receiver.ids() == {"acq/1_2/full"}
    assert receiver.duplicates == 1
    assert receiver.stored_counts() == {"acq/1_2/full": 1}
    assert receiver.path_of("acq/1_2/full").read_bytes() == a.read_bytes()
    assert "/" not in stored_name("acq/1_2/full")
    # Bytes that do not match what was sent are not acknowledged, and not stored.
    assert not link.send("acq/3_3/full", a, "0" * 64)
    assert receiver.rejected == 1
    assert receiver.ids() == {"acq/1_2/full"}
    assert list(receiver.inbox.iterdir()) == []
    # The journal survives a restart of the ground side.
    again = Receiver(tmp_path / "ground")
    assert (again.duplicates, again.rejected, again.stored_counts()) == (1, 1,
                                                                        {"acq/1_2/full": 1})


def test_receiver_records_a_product_stored_just_before_a_crash(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "ground")
    long_id = "scene/" + "x" * 300  # too long for a file name: stored under a hash
    name = stored_name(long_id)
    assert name.startswith("id-") and len(name) < 100
    receiver.journal.append({"event": "storing", "id": long_id, "name": name})
    receiver.path_of(long_id).write_bytes(b"payload")  # moved in, then the process died
    after = Receiver(tmp_path / "ground")
    assert after.stored_counts() == {long_id: 1}
    assert after.ids() == {long_id}


def test_drain_sends_in_order_within_the_budget(tmp_path: Path) -> None:
    receiver = Receiver(tmp_path / "ground")
    with DownlinkQueue(tmp_path / "q.sqlite") as queue:
        queue.enqueue("big", product(tmp_path, "big.bin", 800), priority=9.0)
        queue.enqueue("mid", product(tmp_path, "mid.bin", 300), priority=5.0)
        queue.enqueue("small", product(tmp_path, "small.bin", 100), priority=1.0)
        queue.enqueue("gone", product(tmp_path, "gone.bin", 50), priority=0.5)
        (tmp_path / "gone.bin").unlink()
        report = drain(queue, FolderTransmitter(receiver), budget_bytes=500)
        # "big" does not fit and waits; the smaller ones after it still go.
        assert report.acknowledged == ["mid", "small"]
        assert report.sent_bytes == 400
        assert report.left_for_later == 1
        assert list(report.failed) == ["gone"] and "gone.bin" in report.failed["gone"]
        assert queue.get("gone").state == "queued"
        assert queue.get("big").state == "queued"
        assert receiver.ids() == {"mid", "small"}
        assert queue.bytes_held() == 850


CHILD = textwrap.dedent("""
    import random, sys
    from pathlib import Path

    from onboard.runtime.downlink.link import FolderTransmitter, Receiver, drain
    from onboard.runtime.downlink.queue import DownlinkQueue
    from onboard.runtime.durability import remove_partials, write_bytes

    root, batches, per = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    products = root / "products"
    remove_partials(products)
    queue = DownlinkQueue(root / "queue.sqlite")
    link = FolderTransmitter(Receiver(root / "ground"))
    print("ready", len(queue.recovered), flush=True)
    drain(queue, link, 10 ** 12)  # what earlier runs left first, so kills land mid-send
    # Every batch so far (a killed run may not have queued its own) and one new batch.
    for b in range(batches):
        for j in range(per):
            item_id, path = f"acq{b}/{j}_0/full", products / f"{b}_{j}.bin"
            if queue.get(item_id) is not None:
                continue
            if not path.exists():  # written atomically: present means whole
                write_bytes(path, random.Random(f"{b}/{j}").randbytes(200 + 50 * j))
            queue.enqueue(item_id, path, priority=(b * per + j) % 7)
    drain(queue, link, 10 ** 12)
    print("done", flush=True)
""")


def test_kill_at_random_points_loses_nothing_and_stores_nothing_twice(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = tmp_path / "state"
    per, kills, runs, recovered = 3, 0, 0, 0
    rng = random.Random(20240611)
    started = time.monotonic()
    while kills < 50:
        runs += 1
        child = subprocess.Popen([sys.executable, str(script), str(root), str(runs), str(per)],
                                 stdout=subprocess.PIPE, text=True)
        ready = child.stdout.readline().split()
        assert ready and ready[0] == "ready", "child died before it was ready"
        recovered += int(ready[1])
        # From a few ms to tens of ms into the work: mid-write, mid-commit, mid-send.
        time.sleep(rng.uniform(0.001, 0.04))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        if child.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert child.returncode == 0
        assert time.monotonic() - started < 120, "the kill loop is far slower than expected"

    finished = subprocess.run([sys.executable, str(script), str(root), str(runs), str(per)],
                              capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    recovered += int(finished.stdout.split()[1])

    expected = {f"acq{b}/{j}_0/full" for b in range(runs) for j in range(per)}
    receiver = Receiver(root / "ground")
    assert receiver.ids() == expected  # none missing, none extra
    counts = receiver.stored_counts()
    assert set(counts) == expected
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    assert receiver.rejected == 0
    for b in range(runs):
        for j in range(per):
            stored = receiver.path_of(f"acq{b}/{j}_0/full").read_bytes()
            assert stored == random.Random(f"{b}/{j}").randbytes(200 + 50 * j)
    with DownlinkQueue(root / "queue.sqlite") as queue:
        assert queue.counts() == {"queued": 0, "sending": 0, "acknowledged": len(expected)}
        assert queue.bytes_held() == 0
    # Kills landed between "sending" and "acknowledged" too: those items went out again.
    assert recovered >= 1
    print(f"\n{kills} SIGKILLs over {runs + 1} runs, {len(expected)} products, "
          f"{recovered} resent after a kill, {receiver.duplicates} duplicates dropped, "
          f"{time.monotonic() - started:.1f} s")
