"""CFDP Class 2 downlink goodput and throughput: cfdp-py in pure Python, one core per side.

    python -m onboard.bench.cfdp [--rounds 2] [--pass-s 20]

Everything runs over UDP loopback into ``onboard ground`` in its own process, with 5 % of the
file-data PDUs lost and 10 % of all PDUs reordered (held back behind up to 8 others). Payloads
are real products of the bundled sample, each with its STAC Item beside it as ``onboard run``
keeps them (the Item rides the product's Metadata PDU): the 16 GeoTIFFs of its 128² tiles (full
and near-lossless, both dates) and the full 256² crops, about 120 KB to 490 KB each. The
*sample* payload is the two 256² crops (978 KB, what the last bench sent); a *pass* payload is
those products, each under its own id, until a pass of ``--pass-s`` seconds at the cap is
filled, as a pass that plans for the link's capacity sends it.

- **levers** at 10 Mbit/s: from the last bench's protocol (immediate NAKs, one transaction at
  a time, the sample payload, a pacer with 2 ms of buffer) one change at a time: NAKs deferred
  to the EOF (with the ground's reorder grace), transactions overlapped (a window of 8), the
  pass payload, a 10 ms transmit buffer behind the pacer (the link keeps sending through a
  moment's CPU hiccup, never faster than the cap on average), 8 KiB PDUs;
- **caps** 1, 20, 50 and 100 Mbit/s with the final protocol and pass payloads (at most 40 MB;
  4 KiB PDUs up to 20 Mbit/s, 16 KiB above);
- **one core**: no cap, each PDU size, 10 MB: what the flight side and the ground together
  sustain end to end, and the flight side's product MB per CPU second (what it alone would
  sustain on one core).

Goodput of capacity is product bits over cap x seconds, from the first PDU to the last
Finished; product / wire is product octets over every octet the flight side put on the link
(space packets, PDU headers, Metadata with the Item, EOF, ACKs, retransmissions). Medians of
``--rounds`` interleaved rounds. Results: ``bench/results/cfdp.md`` and ``cfdp.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from onboard.bench.measure import RESULTS
from onboard.runtime.downlink import cfdp as cfdp_link
from onboard.runtime.downlink.cfdp import CfdpLinkConfig, CfdpTransmitter, UdpLink
from onboard.runtime.downlink.products import ProductMaker, product_id
from onboard.runtime.downlink.stac import make_item
from onboard.runtime.scores import TileScore
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong"
TIMERS = dict(ack_timeout_s=0.2, nak_timeout_s=0.2, ack_limit=8, nak_limit=64,
              transaction_timeout_s=120.0, inactivity_s=10.0)
LOSS = dict(drop_rate=0.05, reorder_rate=0.10)
PASS_CAP_BYTES = 40_000_000


Entry = tuple[str, Path, str, dict[str, Any]]  # id, product file, SHA-256, its STAC Item


def products(folder: Path) -> tuple[list[Entry], list[Entry]]:
    """(the sample payload, every product of the pool), each with its STAC Item."""
    maker = ProductMaker()
    folder.mkdir(parents=True, exist_ok=True)
    sample, pool = [], []
    for date in ("imgs_1", "imgs_2"):
        scene = open_scene(SAMPLE / date)
        tiles = [(0, 0, 256, "full")] + [(r, c, 128, k) for r in (0, 128) for c in (0, 128)
                                          for k in ("full", "near_lossless")]
        for row, col, size, kind in tiles:
            product = maker.make(kind, scene.read(Window(row, col, size, size)))
            path = folder / f"{date}-{row}_{col}-{size}-{kind}{product.suffix}"
            product.write(path)
            score = TileScore(f"hongkong-{date}/{row}_{col}_{size}", f"hongkong-{date}",
                              (row, col, size, size))
            score.values.update({"cloud_fraction": 0.1, "clear_fraction": 0.9})
            item_id = product_id(score.tile_id, kind)
            item = make_item(product, score, item_id=item_id, href=path.name, priority=0.5,
                             acquired=datetime(2016, 9, 27, tzinfo=timezone.utc))
            entry = (item_id, path, hashlib.sha256(path.read_bytes()).hexdigest(), item)
            pool.append(entry)
            if size == 256:
                sample.append(entry)
    return sample, pool


def materialise(entries: list[Entry], folder: Path, tag: str) -> list[tuple[str, Path, str]]:
    """Each entry under its own id, as the pipeline keeps it: the product (a hard link to the
    pool's file) with its Item beside it, so each Metadata PDU carries a real Item."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (item_id, path, sha, item) in enumerate(entries):
        new_id = f"{tag}-{n}-{item_id}"
        target = folder / f"{new_id}{path.suffix}"
        os.link(path, target)
        target.with_suffix(".json").write_text(json.dumps({**item, "id": new_id}))
        out.append((new_id, target, sha))
    return out


def pass_payload(pool: list[Entry], nbytes: int) -> list[Entry]:
    out: list[Entry] = []
    total = 0
    for entry in itertools.cycle(pool):
        if total >= nbytes:
            break
        out.append(entry)
        total += entry[1].stat().st_size
    return out


class Ground:
    """``onboard ground`` in its own process on a free loopback port."""

    def __init__(self, folder: Path, pdu: int, immediate_nak: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        toml = folder / "ground.toml"
        toml.write_text("[cfdp]\n" + "".join(f"{k} = {v}\n" for k, v in TIMERS.items())
                        + f"pdu_size = {pdu}\nimmediate_nak = {str(immediate_nak).lower()}\n")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from onboard.runtime.cli import main; "
                                   "sys.exit(main())", "ground", "--listen", "127.0.0.1:0",
             "--out", str(folder / "ground"), "--config", str(toml), "--duration", "3600"],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline().split()[1].rsplit(":", 1)[1])

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])


def run(items: list[tuple[str, Path, str]], port: int, state: Path, *, pdu: int,
        window: int, immediate_nak: bool, bitrate: float | None, seed: int,
        buffer_s: float = 0.01) -> dict[str, Any]:
    # The radio's transmit buffer behind the pacer (the last bench's pacer held 2 ms).
    cfdp_link._LINK_BUFFER_S = buffer_s
    config = CfdpLinkConfig(transport="udp", port=port, pdu_size=pdu, window=window,
                            immediate_nak=immediate_nak, bitrate_bps=bitrate, seed=seed,
                            **LOSS, **TIMERS)
    state.mkdir(parents=True, exist_ok=True)
    link = UdpLink(config)
    transmitter = CfdpTransmitter(config, link, state)
    pending = iter(items)
    cpu0 = time.process_time()
    started = time.perf_counter()
    try:
        results = list(transmitter.transfer_many(lambda: next(pending, None)))
    finally:
        link.close()
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    product = sum(path.stat().st_size for _, path, _ in items)
    item_bytes = sum(path.with_suffix(".json").stat().st_size for _, path, _ in items)
    out: dict[str, Any] = {
        "ok": len(results) == len(items) and all(r.acknowledged for r in results),
        "products": len(items), "seconds": seconds, "cpu_s": cpu,
        "product_bytes": product, "wire_bytes": link.down.bytes, "up_bytes": link.up.bytes,
        "file_data_bytes": link.down.file_data_bytes, "dropped": link.down.dropped,
        "mb_s": product / seconds / 1e6, "product_share_of_wire": product / link.down.bytes,
        # File data sent beyond the product itself, and the part of it the loss forced (each
        # lost PDU sent once more, and so on: 1 / (1 - loss) - 1).
        "resent_share": link.down.file_data_bytes / product - 1,
        "eof_resent": transmitter.eof_resent, "items_too_big": transmitter.items_too_big,
        "item_json_bytes": item_bytes,
        # What the flight side alone could carry on one core: product bytes per CPU second.
        "flight_mb_per_cpu_s": product / cpu / 1e6 if cpu > 0 else None}
    if bitrate:
        out["goodput_of_capacity"] = product * 8 / (bitrate * seconds)
        out["link_busy"] = link.down.bytes * 8 / (bitrate * seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pass-s", type=float, default=20.0)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="onboard-cfdp-bench-"))
    sample, pool = products(work / "products")
    configs = {(pdu, False) for pdu in (1024, 4096, 8192, 16384)}
    configs.add((4096, True))
    grounds = {key: Ground(work / f"ground-{key[0]}-{key[1]}", *key) for key in configs}
    final = dict(window=8, immediate_nak=False)
    for _, _, _, item in pool:
        assert item["assets"]

    def cases(round_: int) -> list[tuple[str, str, list[Entry], dict[str, Any]]]:
        pass10 = pass_payload(pool, int(10e6 * args.pass_s / 8))
        old = dict(buffer_s=0.002)
        out = [
            ("levers", "immediate NAKs, 1 in flight, sample payload (last bench)", sample,
             dict(pdu=4096, window=1, immediate_nak=True, bitrate=10e6, **old)),
            ("levers", "+ NAKs deferred to the EOF", sample,
             dict(pdu=4096, window=1, immediate_nak=False, bitrate=10e6, **old)),
            ("levers", "+ 8 transactions in flight", sample,
             dict(pdu=4096, **final, bitrate=10e6, **old)),
            ("levers", f"+ a {args.pass_s:g} s pass payload", pass10,
             dict(pdu=4096, **final, bitrate=10e6, **old)),
            ("levers", "+ 10 ms radio buffer behind the pacer", pass10,
             dict(pdu=4096, **final, bitrate=10e6)),
            ("levers", "+ 8 KiB PDUs", pass10, dict(pdu=8192, **final, bitrate=10e6)),
        ]
        for cap in (1e6, 20e6, 50e6, 100e6):
            items = pass_payload(pool, min(int(cap * args.pass_s / 8), PASS_CAP_BYTES))
            out.append(("caps", f"{cap / 1e6:g} Mbit/s", items,
                        dict(pdu=4096 if cap <= 20e6 else 16384, **final, bitrate=cap)))
        core = pass_payload(pool, 10_000_000)
        for pdu in (1024, 4096, 8192, 16384):
            out.append(("one core", f"no cap, {pdu} B PDUs", core,
                        dict(pdu=pdu, **final, bitrate=None)))
        return out

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    params: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        for round_ in range(args.rounds):
            for number, (section, name, entries, p) in enumerate(cases(round_)):
                ground = grounds[(p["pdu"], p["immediate_nak"])]
                tag = f"r{round_}c{number}"
                items = materialise(entries, work / "send" / tag, tag)
                # A seed per round and case: the medians are over different loss patterns.
                result = run(items, ground.port, work / "flight" / tag, **p,
                             seed=1000 * round_ + number)
                print(section, name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                 for k, v in result.items()}), flush=True)
                rows.setdefault((section, name), []).append(result)
                params[(section, name)] = p
    finally:
        ground_summaries = {f"{k[0]}-{'immediate' if k[1] else 'deferred'}": g.stop()
                            for k, g in grounds.items()}
    table = []
    for (section, name), runs in rows.items():
        assert all(r["ok"] for r in runs), f"{section} {name}: a transfer was not acknowledged"
        row: dict[str, Any] = {"section": section, "case": name, "rounds": len(runs),
                               **params[(section, name)],
                               "products": runs[0]["products"],
                               "product_bytes": runs[0]["product_bytes"]}
        for key in ("mb_s", "seconds", "cpu_s", "goodput_of_capacity", "link_busy",
                    "product_share_of_wire", "resent_share", "wire_bytes", "eof_resent",
                    "items_too_big", "item_json_bytes", "flight_mb_per_cpu_s"):
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = statistics.median(values)
        table.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cfdp.json").write_text(json.dumps(
        {"rows": table, "ground": ground_summaries, "pass_s": args.pass_s,
         "rounds": args.rounds, "load_average": os.getloadavg()[0]}, indent=2) + "\n")
    lines = ["# CFDP Class 2 downlink (cfdp-py 0.7.0, pure Python)", "",
             f"`python -m onboard.bench.cfdp --rounds {args.rounds} --pass-s {args.pass_s:g}` "
             "on this machine (2 shared cores), UDP loopback into `onboard ground` in its own "
             "process; 5 % of file-data PDUs lost, 10 % of PDUs reordered; ACK and NAK timers "
             "0.2 s. Medians of interleaved rounds. Every transfer ended in a Finished NO_ERROR "
             "and the ground's SHA-256 check.", "",
             f"Load average when the run ended: {os.getloadavg()[0]:.1f} on 2 cores.", "",
             "| section | case | PDU | products | MB | s | MB/s | flight MB per CPU s | "
             "file data resent | product / wire | link busy | goodput of capacity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    for row in table:
        lines.append(f"| {row['section']} | {row['case']} | {row['pdu']} | {row['products']} | "
                     f"{row['product_bytes'] / 1e6:.1f} | {row['seconds']:.2f} | "
                     f"{row['mb_s']:.2f} | {row['flight_mb_per_cpu_s']:.1f} | "
                     f"{pct(row['resent_share'])} | "
                     f"{pct(row['product_share_of_wire'])} | {pct(row.get('link_busy'))} | "
                     f"{pct(row.get('goodput_of_capacity'))} |")
    (RESULTS / "cfdp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
