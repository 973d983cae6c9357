"""Fuzzing that lasts: hypothesis drives damaged inputs into every reader a hostile or unlucky
link reaches (TIFF, bundle, config, the hardware-in-loop frame header). Each must answer with an
:class:`OnboardError` naming the problem, or read the input, never a traceback of another kind.
The downlink queue is fuzzed as a state machine against a model of what it promises.

The budget is small in the default run; ``ONBOARD_FUZZ_EXAMPLES`` raises it for a campaign.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from onboard.runtime.bundle import Bundle
from onboard.runtime.config import config_from_dict
from onboard.runtime.downlink.queue import DownlinkQueue
from onboard.runtime.errors import BundleError, ConfigError, OnboardError, StorageError
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.tcp import FrameHeader
from onboard.runtime.windows import Window

REPO = Path(__file__).resolve().parents[1]
TIFF = REPO / "tests" / "data" / "oscd" / "paris" / "imgs_1" / "paris_B02.tif"
BUNDLE = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
EXAMPLES = int(os.environ.get("ONBOARD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# (offset, new byte) pairs, biased to the header where the layout lives.
_EDITS = st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=8)


def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for offset, value in edits:
        out[offset % len(out)] = value
    return bytes(out[:cut] if cut else out)


@FUZZ
@given(edits=_EDITS, cut=st.one_of(st.none(), st.integers(8, 4096)))
def test_a_damaged_tiff_is_read_or_refused_cleanly(tmp_path, edits, cut):
    path = tmp_path / "damaged.tif"
    path.write_bytes(_mutated(TIFF.read_bytes(), edits, cut))
    try:
        with GeoTiffScene(path) as scene:
            scene.read(Window(0, 0, min(scene.height, 64), min(scene.width, 64)))
    except OnboardError as error:
        assert str(path) in str(error)  # the message names the file


@FUZZ
@given(position=st.integers(0, 10**9), value=st.integers(1, 255))
def test_every_changed_byte_of_a_bundle_is_refused(tmp_path, position, value):
    data = bytearray(BUNDLE.read_bytes())
    index = position % len(data)
    data[index] ^= value  # a real change of that byte
    path = tmp_path / "damaged.onboard"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as caught:
        Bundle.open(path)
    assert str(path) in str(caught.value)


_TOML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_SECTIONS = st.sampled_from(["source", "tiling", "buffer", "telemetry", "cloud", "change",
                             "planner", "products", "storage", "link", "aoi", "signatures",
                             "cfdp", "passes", "nonsense"])


@FUZZ
@given(data=st.dictionaries(_SECTIONS, _TOML_VALUES, max_size=4))
def test_any_config_is_mapped_or_refused_with_a_config_error(data):
    import onboard.runtime.pipeline  # noqa: F401 - registers every section

    try:
        config_from_dict(data, where="fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml")


def _header_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


@FUZZ
@given(header=st.one_of(
    st.binary(max_size=200),
    st.builds(_header_bytes, _TOML_VALUES),
    st.builds(_header_bytes, st.fixed_dictionaries(
        {"id": st.text(max_size=10), "shape": st.lists(st.integers(-5, 10**6), max_size=4),
         "dtype": st.sampled_from(["uint16", "float32", "int64", "bogus"]),
         "bands": st.lists(st.text(max_size=5), max_size=4)},
        optional={"transform": st.lists(st.floats(), max_size=7),
                  "crs_epsg": st.integers(-1, 10**6), "acquired": st.text(max_size=12),
                  "nodata": st.floats()}))),
    payload=st.integers(0, 10**9))
def test_any_frame_header_is_parsed_or_refused_with_a_protocol_error(header, payload):
    try:
        parsed = FrameHeader.parse(header, payload)
    except OnboardError:
        return
    assert parsed.payload_bytes == payload  # accepted only when it matches its payload


def test_a_queue_database_whose_schema_text_is_damaged_is_a_storage_error(tmp_path):
    """Found by the queue fuzzer: one byte of the schema text made invalid UTF-8 escaped as a
    UnicodeDecodeError from opening the queue."""
    db = tmp_path / "queue.sqlite"
    product = tmp_path / "p.bin"
    product.write_bytes(b"product")
    with DownlinkQueue(db) as queue:
        queue.enqueue("p", product)
        queue.checkpoint()
    data = bytearray(db.read_bytes())
    # The "N" of NOT NULL in the state column: the schema no longer parses, and SQLite's error
    # message quotes the byte that is not UTF-8.
    data[data.index(b"state TEXT NOT NULL CHECK") + 15] ^= 0x80
    db.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="queue.sqlite"):
        DownlinkQueue(db)


@pytest.mark.parametrize(("column", "value"), [("meta", "{not json"), ("meta", "[1]"),
                                               ("nbytes", "many"), ("priority", "high")])
def test_a_queue_row_with_damaged_values_is_a_storage_error(tmp_path, column, value):
    """A row whose bytes were damaged in place (SQLite has no checksums) reads back as other
    values; the queue names its file instead of raising JSONDecodeError or ValueError."""
    import sqlite3

    db = tmp_path / "queue.sqlite"
    product = tmp_path / "p.bin"
    product.write_bytes(b"product")
    with DownlinkQueue(db) as queue:
        queue.enqueue("p", product)
    with contextlib.closing(sqlite3.connect(db)) as raw, raw:
        raw.execute(f"UPDATE items SET {column} = ?", (value,))
    with DownlinkQueue(db) as queue, pytest.raises(StorageError, match="queue.sqlite"):
        queue.items()


# -- the downlink queue, as a state machine ----------------------------------------------------

_IDS = st.sampled_from([f"acq{a}/{r}_{c}/{k}" for a in range(2) for r, c in ((0, 0), (0, 1))
                        for k in ("full", "thumb")])
_PRIORITY = st.floats(-1e6, 1e6, allow_nan=False, width=32)
_WINDOW = st.one_of(st.none(), st.integers(0, 3))


_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class _Item:
    """What the model knows of one queued product."""

    def __init__(self, seq: int, path: Path, digest: str, nbytes: int, priority: float,
                 window: int | None) -> None:
        self.seq, self.path, self.sha256, self.nbytes = seq, path, digest, nbytes
        self.priority, self.window = priority, window
        self.state, self.attempts = "queued", 0


class QueueMachine(RuleBasedStateMachine):
    """Random enqueue / send / acknowledge / fail / reprioritise / forget / batch / checkpoint /
    close-and-reopen / crash-and-reopen sequences over one queue, checked after every step
    against a plain model of what the queue promises; damaged copies of its files are opened
    on the side and must be refused (or read) with an :class:`OnboardError`."""

    def __init__(self) -> None:
        super().__init__()
        # In memory where there is a tmpfs: this checks the queue's logic, whose every step
        # waits on fsync on a disk (the kill tests in test_queue.py check the durability).
        self.folder = Path(tempfile.mkdtemp(prefix="onboard-fuzz-queue-", dir=_SCRATCH))
        self.db = self.folder / "queue.sqlite"
        self.queue = DownlinkQueue(self.db)
        self.model: dict[str, _Item] = {}
        self.seq = 0
        self.versions = 0

    def teardown(self) -> None:
        with contextlib.suppress(OnboardError):
            self.queue.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def _product(self, item_id: str, size: int) -> Path:
        self.versions += 1
        path = self.folder / "products" / f"{item_id.replace('/', '_')}.{self.versions}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(f"{item_id}/{size}".encode()).digest() * size)
        return path

    def _order(self) -> list[str]:
        queued = [(i, m) for i, m in self.model.items() if m.state == "queued"]
        queued.sort(key=lambda p: (p[1].window is None, p[1].window or 0, -p[1].priority,
                                   p[1].seq))
        return [i for i, _ in queued]

    def _model_enqueue(self, item_id: str, path: Path, priority: float,
                       window: int | None) -> bool:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        known = self.model.get(item_id)
        if known is None:
            self.seq += 1
            self.model[item_id] = _Item(self.seq, path, digest, path.stat().st_size,
                                        float(priority), window)
            return True
        if known.state == "queued" and known.sha256 != digest:
            known.path, known.sha256, known.nbytes = path, digest, path.stat().st_size
        return False

    def _in_state(self, state: str) -> list[str]:
        return sorted(i for i, m in self.model.items() if m.state == state)

    # -- rules ------------------------------------------------------------------------------

    @rule(item_id=_IDS, size=st.integers(0, 4), priority=_PRIORITY, window=_WINDOW)
    def enqueue(self, item_id, size, priority, window):
        path = self._product(item_id, size)
        inserted = self.queue.enqueue(item_id, path, priority=priority, window=window)
        assert inserted == self._model_enqueue(item_id, path, priority, window)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), priority=_PRIORITY, window=_WINDOW)
    def enqueue_the_same_file_again(self, data, priority, window):
        item_id = data.draw(st.sampled_from(sorted(self.model)))
        # Idempotent by id: neither the priority nor the window of the first enqueue changes.
        assert not self.queue.enqueue(item_id, self.model[item_id].path, priority=priority,
                                      window=window)

    @rule()
    def send_next(self):
        batch = self.queue.next(1)
        order = self._order()
        assert [i.id for i in batch] == order[:1]
        if batch:
            self.queue.mark_sending(batch[0].id)
            self.model[batch[0].id].state = "sending"
            self.model[batch[0].id].attempts += 1

    @precondition(lambda self: bool(self._in_state("sending")))
    @rule(data=st.data())
    def acknowledge(self, data):
        item_id = data.draw(st.sampled_from(self._in_state("sending")))
        self.queue.mark_acknowledged(item_id)
        self.model[item_id].state = "acknowledged"

    @precondition(lambda self: bool(self._in_state("sending")))
    @rule(data=st.data())
    def fail(self, data):
        item_id = data.draw(st.sampled_from(self._in_state("sending")))
        self.queue.requeue(item_id)
        self.model[item_id].state = "queued"

    @rule(item_id=_IDS, transition=st.sampled_from(["sending", "acknowledged", "requeue"]))
    def a_transition_from_the_wrong_state_is_refused(self, item_id, transition):
        allowed = {"sending": "queued", "acknowledged": "sending", "requeue": "sending"}
        known = self.model.get(item_id)
        if known is not None and known.state == allowed[transition]:
            return  # a legal transition: the rules above make those
        call = {"sending": self.queue.mark_sending,
                "acknowledged": self.queue.mark_acknowledged,
                "requeue": self.queue.requeue}[transition]
        with pytest.raises(StorageError, match="cannot mark"):
            call(item_id)

    @rule(item_id=_IDS, priority=_PRIORITY, window=_WINDOW)
    def reprioritize(self, item_id, priority, window):
        self.queue.reprioritize(item_id, priority, window)
        known = self.model.get(item_id)
        if known is not None and known.state != "acknowledged":
            known.priority, known.window = float(priority), window

    @rule(item_id=_IDS)
    def forget(self, item_id):
        self.queue.forget(item_id)
        known = self.model.get(item_id)
        if known is not None and known.state == "acknowledged":
            del self.model[item_id]

    @rule(ids=st.lists(_IDS, min_size=1, max_size=4), abort=st.booleans())
    def enqueue_in_one_batch(self, ids, abort):
        paths = [self._product(i, 1) for i in ids]
        try:
            with self.queue.batch():
                for item_id, path in zip(ids, paths, strict=True):
                    self.queue.enqueue(item_id, path)
                if abort:
                    raise _Abort
        except _Abort:
            return  # rolled back: the model does not change
        for item_id, path in zip(ids, paths, strict=True):
            self._model_enqueue(item_id, path, 0.0, None)

    @rule()
    def checkpoint(self):
        self.queue.checkpoint()

    def _reopened(self, queue: DownlinkQueue) -> None:
        was_sending = sorted((m.seq, i) for i, m in self.model.items() if m.state == "sending")
        assert queue.recovered == [i for _, i in was_sending]
        for _, item_id in was_sending:
            self.model[item_id].state = "queued"
        self.queue = queue

    @rule()
    def close_and_reopen(self):
        self.queue.close()
        self._reopened(DownlinkQueue(self.db))

    @rule()
    def crash_and_reopen(self):
        """The process dies holding the queue open: its files as they are (WAL not folded
        back, no close), opened by the next process."""
        crashed = Path(tempfile.mkdtemp(prefix="crashed-", dir=self.folder))
        for suffix in ("", "-wal"):
            source = Path(f"{self.db}{suffix}")
            if source.exists():
                shutil.copyfile(source, crashed / f"{self.db.name}{suffix}")
        self.queue.close()
        self.db = crashed / self.db.name
        self._reopened(DownlinkQueue(self.db))

    @rule(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                         max_size=6),
          which=st.sampled_from(["", "-wal"]), cut=st.one_of(st.none(), st.integers(0, 9000)))
    def a_damaged_copy_is_refused_or_read_cleanly(self, edits, which, cut):
        damaged = Path(tempfile.mkdtemp(prefix="damaged-", dir=self.folder))
        for suffix in ("", "-wal"):
            source = Path(f"{self.db}{suffix}")
            if source.exists():
                shutil.copyfile(source, damaged / f"{self.db.name}{suffix}")
        victim = damaged / f"{self.db.name}{which}"
        if victim.exists() and victim.stat().st_size:
            data = bytearray(victim.read_bytes())
            for offset, flip in edits:
                data[offset % len(data)] ^= flip
            victim.write_bytes(bytes(data[:cut] if cut is not None else data))
        path = damaged / self.db.name
        try:
            with DownlinkQueue(path) as queue:
                queue.counts()
                queue.items()
                for item in queue.next():
                    queue.mark_sending(item.id)
                queue.enqueue("new", self._product("new", 1))
                queue.bytes_held()
                queue.checkpoint()
        except OnboardError as error:
            assert str(path) in str(error), error
        finally:
            shutil.rmtree(damaged, ignore_errors=True)

    # -- what must hold after every step ------------------------------------------------------

    @invariant()
    def matches_the_model(self):
        items = {i.id: i for i in self.queue.items()}
        assert set(items) == set(self.model)  # nothing enqueued is lost, nothing invented
        for item_id, known in self.model.items():
            item = items[item_id]
            assert (item.state, item.attempts, item.sha256, item.nbytes, item.path,
                    item.window) == (known.state, known.attempts, known.sha256, known.nbytes,
                                     known.path, known.window), item_id
            assert item.priority == known.priority
        counts = {s: sum(m.state == s for m in self.model.values())
                  for s in ("queued", "sending", "acknowledged")}
        assert self.queue.counts() == counts
        assert len(self.queue) == len(self.model)
        assert self.queue.bytes_held() == sum(m.nbytes for m in self.model.values()
                                              if m.state != "acknowledged")
        assert [i.id for i in self.queue.next()] == self._order()

    @invariant()
    def nothing_acknowledged_is_offered_again(self):
        # (and the wrong-state rule checks that it cannot be marked sending again)
        offered = {i.id for i in self.queue.next()}
        assert not offered & set(self._in_state("acknowledged"))


class _Abort(Exception):
    pass


QueueMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_the_downlink_queue_keeps_its_promises_under_any_sequence = QueueMachine.TestCase
