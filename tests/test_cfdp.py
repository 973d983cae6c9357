"""CFDP Class 2 downlink end to end: real GeoTIFF products of the bundled sample, enqueued,
drained over a lossy simulated or UDP loopback link into a ground station, and checked byte for
byte; damaged segments, lost ACKs, the end of a pass, concurrent transactions, SIGKILLs of the
sender; telemetry as CCSDS space packets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cfdppy import IndicationConfig, LocalEntityConfig
from cfdppy.handler.dest import _AckedModeParams
from cfdppy.mib import RemoteEntityConfigTable
from spacepackets.cfdp import DirectiveType, PduFactory

from onboard.runtime.config import config_from_dict
from onboard.runtime.downlink.cfdp import (
    CfdpLinkConfig,
    CfdpTransmitter,
    GroundStation,
    Impairments,
    SimulatedLink,
    UdpLink,
    _DestHandler,
    _Faults,
    _QuietUser,
    _Timers,
    open_transmitter,
)
from onboard.runtime.downlink.link import Receiver, drain
from onboard.runtime.downlink.packets import (
    CFDP_DOWN_APID,
    CFDP_UP_APID,
    OVERHEAD,
    PackReport,
    TelemetryDecoder,
    TelemetryPacker,
    apid_for,
    iter_packets,
    read_jsonl,
    split_packet,
)
from onboard.runtime.downlink.products import ProductMaker, product_id
from onboard.runtime.downlink.queue import DownlinkQueue
from onboard.runtime.durability import write_json
from onboard.runtime.errors import ConfigError
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Window

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "runtime" / "sample" / "hongkong"
# Short timers: the link is in process or loopback, round trips are well under a millisecond.
FAST = dict(ack_timeout_s=0.2, nak_timeout_s=0.2, ack_limit=8, nak_limit=64,
            transaction_timeout_s=10.0, inactivity_s=3.0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_products(folder: Path, size: int, kinds: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Real products of the sample's tiles (both dates), written as the pipeline writes them."""
    maker = ProductMaker()
    made = []
    for date in ("imgs_1", "imgs_2"):
        scene = open_scene(SAMPLE / date)
        for row in range(0, 256, size):
            for col in range(0, 256, size):
                frame = scene.read(Window(row, col, size, size))
                for kind in kinds:
                    product = maker.make(kind, frame)
                    item_id = product_id(f"hongkong-{date}/{row}_{col}", kind)
                    path = folder / f"{date}-{row}_{col}-{kind}{product.suffix}"
                    product.write(path)
                    made.append((item_id, path))
    return made


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    """16 GeoTIFFs of 128² tiles (full and near-lossless), about 1.9 MB."""
    return make_products(tmp_path_factory.mktemp("products"), 128, ("full", "near_lossless"))


def enqueue(queue: DownlinkQueue, products: list[tuple[str, Path]]) -> None:
    for rank, (item_id, path) in enumerate(products):
        queue.enqueue(item_id, path, priority=float(len(products) - rank), window=0)


def assert_ground_has_exactly(ground: Path, products: list[tuple[str, Path]]) -> Receiver:
    receiver = Receiver(ground)
    expected = {item_id for item_id, _ in products}
    assert receiver.ids() == expected
    counts = receiver.stored_counts()
    assert set(counts) == expected and set(counts.values()) == {1}, counts
    for item_id, path in products:
        assert sha(receiver.path_of(item_id)) == sha(path), item_id  # bit-identical
    return receiver


@pytest.mark.parametrize("drop", [0.05, 0.20])
def test_products_arrive_bit_identical_over_a_lossy_reordering_link(
        products: list[tuple[str, Path]], tmp_path: Path, drop: float) -> None:
    config = CfdpLinkConfig(drop_rate=drop, reorder_rate=0.10, seed=int(drop * 100), **FAST)
    transmitter = open_transmitter(config, tmp_path)
    link = transmitter.link
    assert isinstance(link, SimulatedLink)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, products)
        report = drain(queue, transmitter, 10**9)
        in_order = [i.id for i in sorted(queue.items(), key=lambda i: -i.priority)]
        assert sorted(report.acknowledged) == sorted(in_order)
        # Transactions overlap, so they end in any order; they start in the queue's (their
        # sequence numbers are drawn at the start).
        started = {r.item_id: r.transaction[1] for r in transmitter.results}
        assert [started[i] for i in in_order] == sorted(started.values())
        assert report.acknowledged_bytes == report.sent_bytes == sum(
            p.stat().st_size for _, p in products)
        assert report.link_bytes == link.down.bytes
        assert queue.counts() == {"queued": 0, "sending": 0, "acknowledged": len(products)}
    assert_ground_has_exactly(tmp_path / "ground", products)
    product_bytes = sum(p.stat().st_size for _, p in products)
    # The impairments happened, and NAKs drove the retransmissions.
    assert link.down.dropped > 0.5 * drop * link.down.packets
    assert link.down.reordered > 0
    assert link.down.file_data_bytes > product_bytes
    overhead = link.down.bytes / product_bytes - 1
    print(f"\ndrop {drop:.0%}: {len(products)} products, {product_bytes} B, wire {link.down.bytes}"
          f" B down (+{overhead:.1%}), {link.up.bytes} B up, "
          f"{sum(r.seconds for r in transmitter.results):.2f} s")
    assert all(r.reason == "complete" for r in transmitter.results)


def test_a_damaged_segment_is_caught_by_sha256_and_sent_again(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    some = products[:4]
    # File data damaged before framing: every PDU CRC checks, and with no loss cfdp-py takes
    # the path that never checks the file's CRC (defect 1), so CFDP alone would say complete.
    damaged = CfdpLinkConfig(segment_corrupt_rate=0.05, **FAST)
    transmitter = open_transmitter(damaged, tmp_path)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        report = drain(queue, transmitter, 10**9)
        assert report.acknowledged == []
        assert len(report.not_acknowledged) == len(some)
        assert queue.counts()["queued"] == len(some)
        assert transmitter.link.down.segments_corrupted >= len(some)
        ground = transmitter.link.ground
        # "rejected" is the SHA-256 verdict on a transfer cfdp-py declared complete.
        assert [o["outcome"] for o in ground.outcomes] == ["rejected"] * len(some)
        assert all(r.condition == "FILE_CHECKSUM_FAILURE" for r in transmitter.results)
        assert Receiver(tmp_path / "ground").ids() == set()
        assert list((tmp_path / "ground" / "inbox").iterdir()) == []
        # The next pass, on a clean link, delivers them intact under the same ids.
        clean = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
        assert drain(queue, clean, 10**9).acknowledged
        assert queue.counts()["acknowledged"] == len(some)
    receiver = assert_ground_has_exactly(tmp_path / "ground", some)
    assert receiver.rejected == len(some)


def test_wire_bit_flips_are_dropped_by_the_pdu_crc_and_retransmitted(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    some = products[4:8]
    transmitter = open_transmitter(CfdpLinkConfig(corrupt_rate=0.05, duplicate_rate=0.05,
                                                  **FAST), tmp_path)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        assert len(drain(queue, transmitter, 10**9).acknowledged) == len(some)
    assert transmitter.link.ground.stats["undecodable"] > 0
    assert transmitter.link.down.duplicated > 0
    assert_ground_has_exactly(tmp_path / "ground", some)


def test_lost_directives_are_recovered_or_sent_again(products: list[tuple[str, Path]],
                                                     tmp_path: Path) -> None:
    some = products[8:12]
    # A third of every directive PDU lost, both ways: Metadata, EOF, ACK(EOF), NAK, Finished,
    # ACK(Finished). Whatever the protocol cannot finish, the queue sends again.
    transmitter = open_transmitter(CfdpLinkConfig(directive_drop_rate=0.33, drop_rate=0.05,
                                                  seed=7, **FAST), tmp_path)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        for _ in range(6):
            drain(queue, transmitter, 10**9)
            if not queue.next():
                break
        assert queue.counts()["acknowledged"] == len(some)
    assert_ground_has_exactly(tmp_path / "ground", some)


def _drop_first(impairments: Impairments, directive: DirectiveType, acked: DirectiveType | None,
                apid: int) -> list[tuple[int, int]]:
    """Lose the first ``directive`` PDU (an ACK of ``acked``) of every transaction."""
    dropped: list[tuple[int, int]] = []
    apply = impairments.apply

    def lossy(packet: bytes) -> list[bytes]:
        header, data = split_packet(packet)
        if header.apid == apid and PduFactory.pdu_directive_type(data) == directive:
            pdu = PduFactory.from_raw(data)
            key = (pdu.source_entity_id.value, pdu.transaction_seq_num.value)
            if (acked is None or pdu.directive_code_of_acked_pdu == acked) and key not in dropped:
                dropped.append(key)
                return []
        return apply(packet)

    impairments.apply = lossy  # type: ignore[method-assign]
    return dropped


def test_a_lost_ack_of_eof_and_a_lost_ack_of_finished_are_recovered(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    """cfdp-py alone recovers neither (defect 3); the work-arounds recover both within the
    transaction, so nothing has to be sent twice."""
    some = products[12:16]
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
    link = transmitter.link
    lost_eof_acks = _drop_first(link.up_impairments, DirectiveType.ACK_PDU, DirectiveType.EOF_PDU,
                                CFDP_UP_APID)
    lost_finished_acks = _drop_first(link.down_impairments, DirectiveType.ACK_PDU,
                                     DirectiveType.FINISHED_PDU, CFDP_DOWN_APID)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        assert len(drain(queue, transmitter, 10**9).acknowledged) == len(some)
    transmitter.idle(0.5)  # the end of the pass: the ground's last repeated Finished is answered
    assert len(lost_eof_acks) == len(lost_finished_acks) == len(some)
    ground = link.ground
    assert ground.stats["eof_reacked"] == len(some)
    assert transmitter.finished_reacked == len(some)
    assert ground.active == {} and ground.stats["retired_finished"] == 0
    assert [r.reason for r in transmitter.results] == ["complete"] * len(some)
    receiver = assert_ground_has_exactly(tmp_path / "ground", some)
    assert receiver.duplicates == 0


def test_an_eof_before_a_lost_metadata_pdu_is_not_forgotten(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    """The Metadata PDU lost, file data and EOF first: cfdp-py NAKs the Metadata, and once it
    arrives forgets the EOF it had (defect 5); the ground hands it the EOF again. Thumbnails:
    one segment each."""
    some = make_products(tmp_path / "thumbnails", 64, ("thumbnail",))[:3]  # < 1 segment
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
    lost = _drop_first(transmitter.link.down_impairments, DirectiveType.METADATA_PDU, None,
                       CFDP_DOWN_APID)
    # And the immediate NAK for it, so the EOF is there before the Metadata comes again.
    _drop_first(transmitter.link.up_impairments, DirectiveType.NAK_PDU, None, CFDP_UP_APID)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        assert len(drain(queue, transmitter, 10**9).acknowledged) == len(some)
    assert len(lost) == len(some)
    assert transmitter.link.ground.stats["eof_refed"] == len(some)
    assert transmitter.eof_resent == 0  # the ground did not wait for the sender to repeat it
    assert_ground_has_exactly(tmp_path / "ground", some)


def test_a_sender_that_lost_its_numbering_is_not_answered_for_an_old_transaction(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    """Two flight lives with the same transaction numbers (state lost in between): the ground
    must store the second product, not answer its EOF with the first one's Finished."""
    config = CfdpLinkConfig(**FAST)
    ground = GroundStation(tmp_path / "ground", config)
    for life, (item_id, path) in enumerate(products[:2]):
        state = tmp_path / f"life{life}"
        state.mkdir()
        (state / "cfdp-seq.json").write_text(json.dumps({"next": 5}))
        transmitter = CfdpTransmitter(config, SimulatedLink(ground, config), state)
        assert transmitter.send(item_id, path, sha(path))
        assert transmitter.results[-1].transaction == (config.flight_entity_id, 5)
    assert_ground_has_exactly(tmp_path / "ground", products[:2])


def test_the_end_of_a_pass_cuts_a_transfer_and_the_next_pass_sends_it_again(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    some = products[:3]
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
    first = some[0][1].stat().st_size
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        # Room on the wire for the first product and half of the second.
        transmitter.start_pass(int(first * 1.05 + some[1][1].stat().st_size / 2))
        report = drain(queue, transmitter, 10**9)
        assert report.acknowledged == [some[0][0]]
        # The second was cut mid-file; the third never started (still queued, nothing spent).
        assert report.not_acknowledged == [some[1][0]]
        assert report.sent_bytes == first + some[1][1].stat().st_size
        assert report.acknowledged_bytes == first
        assert queue.get(some[2][0]).state == "queued"
        assert transmitter.results[1].reason == "pass over"
        transmitter.start_pass(None)
        assert set(drain(queue, transmitter, 10**9).acknowledged) == {some[1][0], some[2][0]}
    assert_ground_has_exactly(tmp_path / "ground", some)


def test_each_destination_transaction_has_its_own_lost_segment_tracker() -> None:
    config = CfdpLinkConfig()
    # cfdp-py 0.7.0 (defect 2): one tracker for every field wrapper in the process.
    shared = _AckedModeParams().lost_seg_tracker is _AckedModeParams().lost_seg_tracker
    handlers = [_DestHandler(LocalEntityConfig(config.ground_id, IndicationConfig(), _Faults()),
                             _QuietUser(),
                             RemoteEntityConfigTable([config.remote(config.flight_id)]),
                             _Timers(1.0)) for _ in range(2)]
    a, b = (h._params.acked_params.lost_seg_tracker for h in handlers)
    assert a is not b
    a.add_lost_segment((0, 1024))
    assert b.num_lost_segments == 0
    handlers[0].reset()  # a new field wrapper: a new, empty tracker
    assert handlers[0]._params.acked_params.lost_seg_tracker.num_lost_segments == 0
    print(f"\ncfdp-py's own default tracker shared: {shared}")


def _ground_process(folder: Path, config_text: str) -> tuple[subprocess.Popen, int]:
    (folder / "ground.toml").write_text(config_text)
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from onboard.runtime.cli import main; "
                               "sys.exit(main())",
         "ground", "--listen", "127.0.0.1:0", "--out", str(folder / "ground"),
         "--config", str(folder / "ground.toml"), "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline().split()
    assert line and line[0] == "listening", process.stderr.read()
    return process, int(line[1].rsplit(":", 1)[1])


def _stop(process: subprocess.Popen) -> dict:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


GROUND_TOML = """
[cfdp]
ack_timeout_s = 0.2
nak_timeout_s = 0.2
ack_limit = 8
nak_limit = 64
inactivity_s = 3.0
"""


def test_two_concurrent_senders_over_udp_into_one_ground_process(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    process, port = _ground_process(tmp_path, GROUND_TOML)
    halves = [products[0:8:2], products[1:8:2]]
    results: list[list[str]] = [[], []]

    def sender(index: int) -> None:
        state = tmp_path / f"flight{index}"
        state.mkdir()
        # Distinct transaction numbers, as two source entities' would be.
        (state / "cfdp-seq.json").write_text(json.dumps({"next": index * 1_000_000}))
        config = CfdpLinkConfig(transport="udp", port=port, drop_rate=0.10, reorder_rate=0.10,
                                seed=index, **FAST)
        link = UdpLink(config)
        transmitter = CfdpTransmitter(config, link, state)
        for item_id, path in halves[index]:
            if transmitter.send(item_id, path, sha(path)):
                results[index].append(item_id)
        link.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    summary = _stop(process)
    assert results == [[i for i, _ in half] for half in halves]
    assert_ground_has_exactly(tmp_path / "ground", products[:8])
    assert summary["outcomes"] == {"stored": 8}


def _sender_run(root: Path, port: int, runs: int, pool: list[tuple[str, Path]],
                ready: int) -> None:
    """One flight process's life: drain what earlier runs left, queue every batch so far
    (a killed run may not have queued its own), drain again (three times at most: a transfer
    that does not finish waits for the next pass, as on orbit)."""
    config = CfdpLinkConfig(transport="udp", port=port, drop_rate=0.05, reorder_rate=0.10,
                            seed=runs, **FAST)
    queue = DownlinkQueue(root / "queue.sqlite")
    transmitter = CfdpTransmitter(config, UdpLink(config), root)
    os.write(ready, f"{len(queue.recovered)}\n".encode())
    drain(queue, transmitter, 10**12)
    for run in range(runs):
        for j in range(3):
            name, path = pool[(run * 3 + j) % len(pool)]
            if queue.get(f"run{run}/{name}") is None:
                queue.enqueue(f"run{run}/{name}", path, priority=(run * 3 + j) % 7)
    for _ in range(5):
        if not queue.next():
            break
        drain(queue, transmitter, 10**12)
    reasons: dict[str, int] = {}
    for result in transmitter.results:
        reasons[result.reason] = reasons.get(result.reason, 0) + 1
    write_json(root / "last-run.json", reasons)


def _fork_sender(root: Path, port: int, runs: int, pool: list[tuple[str, Path]]
                 ) -> tuple[int, int]:
    """A sender process forked from this one (the imports are done: it starts in
    milliseconds, so 50 kills fit the test's budget); its pid and what it recovered."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read)
            _sender_run(root, port, runs, pool, write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        line = pipe.readline()
    assert line, "the sender died before it was ready"
    return pid, int(line)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks its senders")
def test_sigkill_of_the_sender_mid_transfer_stores_every_id_exactly_once(
        tmp_path: Path) -> None:
    pool = make_products(tmp_path / "pool", 64, ("full", "thumbnail"))
    process, port = _ground_process(tmp_path, GROUND_TOML)
    rng = random.Random(20240612)
    kills = runs = recovered = 0
    started = time.monotonic()
    try:
        while kills < 50:
            runs += 1
            pid, found = _fork_sender(tmp_path, port, runs, pool)
            recovered += found
            time.sleep(rng.uniform(0.005, 0.08))  # mid-transaction, mid-commit, mid-ACK
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                kills += 1
            else:
                assert os.WEXITSTATUS(status) == 0
            assert time.monotonic() - started < 90, "the kill loop is far slower than expected"
        pid, found = _fork_sender(tmp_path, port, runs, pool)
        recovered += found
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        summary = _stop(process)
    by_name = dict(pool)
    names = [pool[(r * 3 + j) % len(pool)][0] for r in range(runs) for j in range(3)]
    expected = [(f"run{r}/{names[r * 3 + j]}", by_name[names[r * 3 + j]])
                for r in range(runs) for j in range(3)]
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        assert queue.counts() == {"queued": 0, "sending": 0, "acknowledged": len(expected)}
    receiver = assert_ground_has_exactly(tmp_path / "ground", expected)
    assert recovered >= 1  # kills landed between "sending" and "acknowledged"
    print(f"\n{kills} SIGKILLs over {runs + 1} runs, {len(expected)} products, {recovered} "
          f"resent after a kill, {receiver.duplicates} duplicates dropped by id, ground "
          f"{summary['outcomes']}, last run's transfers "
          f"{json.loads((tmp_path / 'last-run.json').read_text())}, "
          f"{time.monotonic() - started:.1f} s")


def test_telemetry_round_trips_as_space_packets(products: list[tuple[str, Path]],
                                                tmp_path: Path) -> None:
    # Real telemetry: what a drain over the CFDP link writes, plus a pass record with nested
    # values and a long tile record that needs several packets.
    log = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry(log)
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path, telemetry)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, products[:3])
        drain(queue, transmitter, 10**9, telemetry)
    telemetry.emit("pass", window=0, chosen_kinds={"full": 2}, value=1.25, note="Hong Kong · 香港")
    telemetry.emit("tile", detail=True, id="x/0_0", values={f"v{i}": i / 7 for i in range(300)})
    telemetry.sync()
    telemetry.close()
    records = read_jsonl(log.read_text(encoding="utf-8"), str(log))
    assert {r["event"] for r in records} >= {"downlink.cfdp", "downlink.drain", "pass", "tile"}
    report = transmitter.send_telemetry(records)
    assert report.records == len(records) and report.packets > len(records)  # one segmented
    ground = transmitter.link.ground
    ground.flush()
    decoded = read_jsonl((tmp_path / "ground" / "telemetry.jsonl").read_text(encoding="utf-8"))
    assert decoded == records
    assert ground.telemetry.report.lost == 0 and ground.telemetry.report.corrupt == 0

    # The packet format: TM, secondary header, the APID of the record's stream, per-APID counts.
    packer = TelemetryPacker(max_packet=256)
    packets = packer.pack(records)
    headers = [split_packet(p)[0] for p in packets]
    assert all(h.packet_type == 0 and h.sec_header_flag for h in headers)
    assert {h.apid for h in headers} == {apid_for(r["event"]) for r in records}
    assert CFDP_DOWN_APID not in {h.apid for h in headers}
    for apid in {h.apid for h in headers}:
        counts = [h.seq_count for h in headers if h.apid == apid]
        assert counts == list(range(len(counts)))
    assert list(iter_packets(b"".join(packets))) == packets

    # Lost and damaged packets are counted; every other record decodes whole.
    damaged = list(packets)
    damaged[3] = damaged[3][:-1] + bytes([damaged[3][-1] ^ 0x01])
    del damaged[1]
    decoder = TelemetryDecoder()
    partial = decoder.feed_all(damaged)
    assert decoder.report.corrupt == 1 and decoder.report.lost >= 1
    assert all(r in records for r in partial) and len(partial) < len(records)

    # A budget: whole records only, within it.
    budgeted = TelemetryPacker(max_packet=256)
    small = PackReport()
    sent = budgeted.pack(records, budget_bytes=600, report=small)
    assert sum(len(p) for p in sent) <= 600 and small.dropped > 0
    assert TelemetryDecoder().feed_all(sent) == [r for r in records if r in
                                                 TelemetryDecoder().feed_all(sent)]
    assert OVERHEAD == 14


def test_ground_command_decodes_a_packet_file(tmp_path: Path) -> None:
    records = [{"t": 1.5, "event": "run_start", "out": "x"}, {"t": 2.0, "event": "pass", "n": 1}]
    (tmp_path / "tm.bin").write_bytes(b"".join(TelemetryPacker().pack(records)))
    done = subprocess.run([sys.executable, "-c", "import sys; from onboard.runtime.cli import "
                           "main; sys.exit(main())", "ground", "--decode", str(tmp_path / "tm.bin"),
                           "--out", str(tmp_path / "g")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records"] == 2
    assert read_jsonl((tmp_path / "g" / "telemetry.jsonl").read_text()) == records


def test_cfdp_section_and_its_checks(tmp_path: Path) -> None:
    config = config_from_dict({"cfdp": {"pdu_size": 4096, "drop_rate": 0.05,
                                        "ground_entity_id": 7}})
    section = config.section("cfdp")
    assert (section.pdu_size, section.drop_rate, section.ground_entity_id) == (4096, 0.05, 7)
    transmitter = open_transmitter(config, tmp_path)
    assert isinstance(transmitter.link, SimulatedLink)
    assert transmitter.link.ground.root == tmp_path / "ground"
    for bad in ({"drop_rate": 1.0}, {"pdu_size": 10}, {"ground_entity_id": 1},
                {"entity_id_bytes": 3}, {"transport": "tcp"}, {"ack_limit": 0}):
        with pytest.raises(ConfigError):
            config_from_dict({"cfdp": bad})


def test_onboard_run_downlinks_its_plan_and_telemetry_to_onboard_ground_over_udp(
        tmp_path: Path) -> None:
    """The two commands side by side, as README shows them: ``onboard ground`` listening,
    ``onboard run`` draining both passes of the sample into it over UDP loopback at 2 Mbit/s
    with 5 % of file-data PDUs lost and 10 % reordered. Every acknowledged product is on the
    ground once, bit for bit, and catalogued once with its STAC Item; the telemetry the
    ground decoded is the flight side's own records, line for line."""
    from onboard.runtime.downlink.link import stored_name
    from onboard.runtime.downlink.queue import file_sha256

    process, port = _ground_process(tmp_path, GROUND_TOML)
    sample = ROOT / "runtime" / "sample"
    text = (sample / "onboard.toml").read_text().replace('kind = "folder"', 'kind = "cfdp"')
    text = (text.replace('"hongkong"', json.dumps(str(sample / "hongkong")))
            .replace('"../../models', f'"{ROOT}/models').replace('"keys/', f'"{sample}/keys/'))
    config = tmp_path / "flight.toml"
    config.write_text(text + f"\n[cfdp]\ntransport = \"udp\"\nport = {port}\n"
                      "bitrate_bps = 2000000\ndrop_rate = 0.05\nreorder_rate = 0.1\nseed = 5\n"
                      + "".join(f"{k} = {v}\n" for k, v in FAST.items()))
    out = tmp_path / "out"
    try:
        run = subprocess.run([sys.executable, "-c", "import sys; from onboard.runtime.cli "
                              "import main; sys.exit(main())", "run", str(config), "--out",
                              str(out), "--json"], capture_output=True, text=True, timeout=240)
    finally:
        ground_summary = _stop(process)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    ground = tmp_path / "ground"
    with DownlinkQueue(out / "queue.sqlite") as queue:
        acknowledged = queue.items("acknowledged")
        queued = {item.id for item in queue.items("queued")}
    assert summary["link"]["acknowledged"] == len(acknowledged) > 0
    receiver = Receiver(ground)
    # A transfer cut by the end of the last pass after the ground had it all is on the ground
    # but not acknowledged: still queued, for the next pass (whose duplicate the ground drops).
    assert {item.id for item in acknowledged} <= receiver.ids()
    assert receiver.ids() - {item.id for item in acknowledged} <= queued
    assert set(receiver.stored_counts().values()) == {1}
    for item in acknowledged:
        assert file_sha256(receiver.store / stored_name(item.id)) == item.sha256
    # The catalogue: each product once, with the Item the flight side wrote for it.
    features = json.loads((ground / "catalogue.json").read_text())["features"]
    assert sorted(f["id"] for f in features) == sorted(receiver.ids())
    for feature in features:
        flight = json.loads((out / "products" / f"{feature['id']}.json").read_text())
        assert feature["properties"] == flight["properties"]
    # Each pass's link: product bytes sent and acknowledged, octets on the wire.
    windows = summary["plan"]["windows"]
    for window in windows:
        link = window["link"]
        assert link["acknowledged_bytes"] <= link["sent_bytes"] <= window["budget_bytes"]
        assert link["link_bytes"] > link["sent_bytes"]  # headers, Metadata, retransmissions
        assert window["telemetry_link"]["records"] > 0
        print(f"\npass: {link['sent_bytes']} B of products sent, {link['acknowledged_bytes']} "
              f"acknowledged, {link['link_bytes']} B on the wire "
              f"(+{link['link_bytes'] / link['sent_bytes'] - 1:.1%}), budget "
              f"{window['budget_bytes']}; telemetry {window['telemetry_link']}")
    # Telemetry: what the ground decoded is what the flight side wrote, record for record, up
    # to the last contact (what came after it waits for the next one), every tile record in.
    flight_records = read_jsonl((out / "telemetry.jsonl").read_text(encoding="utf-8"))
    decoded = read_jsonl((ground / "telemetry.jsonl").read_text(encoding="utf-8"))
    assert decoded == flight_records[:len(decoded)]
    tiles = [r for r in flight_records if r["event"] == "tile"]
    assert tiles and all(r in decoded for r in tiles)
    assert ground_summary["telemetry"]["lost"] == ground_summary["telemetry"]["corrupt"] == 0
    assert ground_summary["catalogued"] == len(receiver.ids())


def test_telemetry_is_sent_once_across_a_restart_and_within_its_budget(tmp_path: Path) -> None:
    config = CfdpLinkConfig(**FAST)
    log = tmp_path / "telemetry.jsonl"
    telemetry = Telemetry(log)
    for i in range(5):
        telemetry.emit("tile", detail=True, id=f"x/{i}", values={"cloud": i / 7})
    telemetry.sync()
    ground = GroundStation(tmp_path / "ground", config)
    first = CfdpTransmitter(config, SimulatedLink(ground, config), tmp_path / "flight")
    assert first.send_telemetry_file(log, None)["records"] == 5
    telemetry.emit("pass", window=0, chosen=3)
    telemetry.sync()
    # A restarted flight side (a new transmitter on the same state folder) sends only what is
    # new, and its sequence counts run on: the ground sees no gap.
    second = CfdpTransmitter(config, SimulatedLink(ground, config), tmp_path / "flight")
    assert second.send_telemetry_file(log, None)["records"] == 1
    assert second.send_telemetry_file(log, None)["records"] == 0
    assert ground.records == read_jsonl(log.read_text(encoding="utf-8"))
    assert ground.telemetry.report.lost == 0
    # Over budget: whole records while they fit, the rest stays on board (in the file).
    for i in range(20):
        telemetry.emit("tile", detail=True, id=f"y/{i}", values={"cloud": i / 3})
    telemetry.close()
    sent = second.send_telemetry_file(log, 600)
    assert sent["bytes"] <= 600 and sent["left_on_board"] > 0
    assert sent["records"] + sent["left_on_board"] == 20


def test_an_unreadable_product_fails_its_item_and_the_others_still_go(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    some = products[:3]
    gone = tmp_path / "gone.tif"
    gone.write_bytes(some[0][1].read_bytes())
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, [("gone", gone), *some[1:]])
        gone.unlink()
        report = drain(queue, transmitter, 10**9)
        assert list(report.failed) == ["gone"] and "gone" in report.failed["gone"]
        assert sorted(report.acknowledged) == sorted(i for i, _ in some[1:])
        assert report.sent_bytes == report.acknowledged_bytes == sum(
            p.stat().st_size for _, p in some[1:])  # the unreadable one spent nothing
        assert queue.get("gone").state == "queued"


def test_file_data_that_overtakes_its_metadata_is_kept_not_sent_again(
        products: list[tuple[str, Path]], tmp_path: Path) -> None:
    """Each Metadata PDU arrives behind the first three file-data PDUs of its transaction:
    cfdp-py alone drops file data that comes before the Metadata and NAKs it all again (with
    16 KiB PDUs that was most of the file data re-sent beyond the loss); the ground keeps it
    for the Metadata, so nothing is sent twice."""
    some = products[:3]
    transmitter = open_transmitter(CfdpLinkConfig(**FAST), tmp_path)
    impairments = transmitter.link.down_impairments
    apply = impairments.apply
    held: list[bytes] = []
    late: list[int] = []

    def late_metadata(packet: bytes) -> list[bytes]:
        header, data = split_packet(packet)
        if header.apid == CFDP_DOWN_APID:
            if PduFactory.pdu_directive_type(data) == DirectiveType.METADATA_PDU:
                held.append(packet)
                late.append(0)
                return []
            if held and not PduFactory.is_file_directive(data):
                late[-1] += 1
                if late[-1] == 3:
                    return apply(packet) + apply(held.pop())
        return apply(packet)

    impairments.apply = late_metadata  # type: ignore[method-assign]
    with DownlinkQueue(tmp_path / "queue.sqlite") as queue:
        enqueue(queue, some)
        assert len(drain(queue, transmitter, 10**9).acknowledged) == len(some)
    assert late == [3, 3, 3]
    assert transmitter.link.down.file_data_bytes == sum(p.stat().st_size for _, p in some)
    assert_ground_has_exactly(tmp_path / "ground", some)


def test_the_sample_passes_fit_a_lossy_cfdp_link_with_its_overhead_planned(tmp_path: Path
                                                                           ) -> None:
    """The sample's small products each carry a Metadata PDU with their STAC Item: planned at
    product bytes alone, each pass overran its window and its last transfers were cut. Planned
    and drained at what they spend of the link (the transmitter's stated overhead), every
    planned product of both passes is acknowledged at 5 % loss with reordering, within the
    plan's budget and, with the telemetry sent first, the link's capacity."""
    from onboard.runtime import pipeline

    pipeline.run(pipeline.SAMPLE_CONFIG, tmp_path / "run", overrides={
        "link": {"kind": "cfdp"},
        "cfdp": {"transport": "simulated", "drop_rate": 0.05, "reorder_rate": 0.1}})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    windows = summary["plan"]["windows"]
    assert len(windows) == 2
    for window in windows:
        link = window["link"]
        assert link["not_acknowledged"] == 0 and not link["failed"], link
        assert link["acknowledged"] >= 40
        assert link["sent_bytes"] < link["charged_bytes"] <= link["budget_bytes"]
        # The telemetry goes first and the products are planned in what it leaves: both
        # together within what the window carries.
        telemetry = window["telemetry_link"]["bytes"]
        assert telemetry > 0
        assert window["budget_bytes"] == int(60 * 38400 / 8 * 0.95) - telemetry
        assert telemetry + link["link_bytes"] <= 60 * 38400 // 8


def test_onboard_run_cfdp_option_names_a_ground_address() -> None:
    from onboard.runtime.cli.run import cfdp_overrides
    from onboard.runtime.errors import ConfigError

    assert cfdp_overrides("127.0.0.1:52001") == {
        "link": {"kind": "cfdp"}, "cfdp": {"transport": "udp", "host": "127.0.0.1",
                                           "port": 52001}}
    for bad in ("52001", "host:", "host:port", "host:70000"):
        with pytest.raises(ConfigError, match="--cfdp takes HOST:PORT"):
            cfdp_overrides(bad)


def test_the_ground_filestore_refuses_paths_with_errors_cfdp_py_maps_to_faults(tmp_path: Path
                                                                               ) -> None:
    """cfdp-py turns a PermissionError from create_file into a Filestore Rejection fault and a
    FileNotFoundError into its own; ours are also OnboardErrors, so nothing escapes unnamed."""
    from onboard.runtime.downlink.cfdp import _StagingFilestore
    from onboard.runtime.errors import OnboardError

    store = _StagingFilestore(tmp_path)
    for name in ("../etc/passwd", "a/b", ".hidden", "x" * 201):
        with pytest.raises(PermissionError, match="not a product file name") as refused:
            store.create_file(Path(name))
        assert isinstance(refused.value, OnboardError)
    with pytest.raises(FileNotFoundError) as missing:
        store.truncate_file(Path("nothing-open"))
    assert isinstance(missing.value, OnboardError)
    assert not list(tmp_path.iterdir())  # nothing staged for a refused name
