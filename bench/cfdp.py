"""CFDP Class 2 downlink throughput and goodput: cfdp-py in pure Python, one core per side.

    python -m onboard.bench.cfdp [--rounds 3]

Payload: real products of the bundled sample (the full zstd GeoTIFFs of both dates' 256² crop,
about 1 MB). Measured per row, median of ``--rounds`` (interleaved, so the shared machine's noise
falls on all rows alike):

- **throughput**: product MB/s from the first PDU to the Finished PDU, with 1 KiB and 4 KiB PDUs,
  over the in-process link (flight and ground in one process: one core for both) and over UDP
  loopback (``onboard ground`` in its own process), at 0 %, 5 % and 20 % file-data PDU loss
  with 10 % reordering;
- **goodput** at 1, 10 and 100 Mbit/s caps with 5 % loss over UDP: the share of the link's
  capacity (cap x time) that carried product bytes, and the share of the octets sent that were
  product bytes (the protocol's overhead: space packet and PDU headers, retransmissions).

Results: ``bench/results/cfdp.md`` and ``cfdp.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onboard.bench.measure import RESULTS
from onboard.runtime.downlink.cfdp import CfdpLinkConfig, CfdpTransmitter, UdpLink, open_transmitter
from onboard.runtime.downlink.products import ProductMaker
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong"
TIMERS = dict(ack_timeout_s=0.2, nak_timeout_s=0.2, ack_limit=8, nak_limit=64,
              transaction_timeout_s=120.0, inactivity_s=10.0)


def payload(folder: Path, size: int = 256) -> list[Path]:
    maker = ProductMaker()
    paths = []
    for date in ("imgs_1", "imgs_2"):
        frame = open_scene(SAMPLE / date).read(Window(0, 0, size, size))
        paths.append(maker.make("full", frame).write(folder / f"{date}-{size}-full.tif"))
    return paths


def _send_all(transmitter: CfdpTransmitter, files: list[Path], tag: str) -> dict[str, Any]:
    link = transmitter.link
    down0, file0 = link.down.bytes, link.down.file_data_bytes
    started = time.perf_counter()
    ok = all(transmitter.send(f"{tag}/{path.name}", path,
                              hashlib.sha256(path.read_bytes()).hexdigest()) for path in files)
    seconds = time.perf_counter() - started
    product = sum(p.stat().st_size for p in files)
    wire = link.down.bytes - down0
    return {"ok": ok, "seconds": seconds, "product_bytes": product, "wire_bytes": wire,
            "file_data_bytes": link.down.file_data_bytes - file0,
            "mb_s": product / seconds / 1e6}


def run_inprocess(files: list[Path], pdu: int, drop: float, work: Path, tag: str
                  ) -> dict[str, Any]:
    config = CfdpLinkConfig(pdu_size=pdu, drop_rate=drop, reorder_rate=0.1 if drop else 0.0,
                            seed=pdu, **TIMERS)
    return _send_all(open_transmitter(config, work / tag), files, tag)


class Ground:
    """``onboard ground`` in its own process on a free loopback port."""

    def __init__(self, folder: Path, pdu: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        toml = folder / "ground.toml"
        toml.write_text("[cfdp]\n" + "".join(f"{k} = {v}\n" for k, v in TIMERS.items())
                        + f"pdu_size = {pdu}\n")
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; from onboard.runtime.cli import main; "
                                   "sys.exit(main())", "ground", "--listen", "127.0.0.1:0",
             "--out", str(folder / "ground"), "--config", str(toml), "--duration", "900"],
            stdout=subprocess.PIPE, text=True)
        self.port = int(self.process.stdout.readline().split()[1].rsplit(":", 1)[1])

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def run_udp(files: list[Path], pdu: int, drop: float, port: int, state: Path, tag: str,
            bitrate: float | None = None) -> dict[str, Any]:
    config = CfdpLinkConfig(transport="udp", port=port, pdu_size=pdu, drop_rate=drop,
                            reorder_rate=0.1 if drop else 0.0, seed=pdu, bitrate_bps=bitrate,
                            **TIMERS)
    state.mkdir(parents=True, exist_ok=True)
    link = UdpLink(config)
    try:
        result = _send_all(CfdpTransmitter(config, link, state), files, tag)
    finally:
        link.close()
    if bitrate:
        result["goodput_of_capacity"] = result["product_bytes"] * 8 / (
            bitrate * result["seconds"])
    result["product_share_of_wire"] = result["product_bytes"] / result["wire_bytes"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="onboard-cfdp-bench-"))
    files = payload(work / "products")
    small = payload(work / "small", 128)  # for the 1 Mbit/s cap: a pass of a few seconds
    rows: dict[str, list[dict[str, Any]]] = {}
    grounds = {pdu: Ground(work / f"udp{pdu}", pdu) for pdu in (1024, 4096)}
    try:
        for round_ in range(args.rounds):
            for pdu in (1024, 4096):
                for drop in (0.0, 0.05, 0.20):
                    tag = f"r{round_}-{pdu}-{drop}"
                    rows.setdefault(f"in-process|{pdu}|{drop}|-", []).append(
                        run_inprocess(files, pdu, drop, work, tag))
                    rows.setdefault(f"udp|{pdu}|{drop}|-", []).append(
                        run_udp(files, pdu, drop, grounds[pdu].port, work / "flight" / tag,
                                tag))
            for cap in (1e6, 10e6, 100e6):
                pdu = 1024 if cap <= 1e6 else 4096
                tag = f"r{round_}-cap{int(cap)}"
                rows.setdefault(f"udp|{pdu}|0.05|{int(cap / 1e6)}", []).append(
                    run_udp(small if cap <= 1e6 else files, pdu, 0.05, grounds[pdu].port,
                            work / "flight" / tag, tag, bitrate=cap))
    finally:
        ground_summaries = {pdu: g.stop() for pdu, g in grounds.items()}
    table = []
    for key, runs in rows.items():
        link, pdu, drop, cap = key.split("|")
        assert all(r["ok"] for r in runs), f"{key}: a transfer was not acknowledged"
        row: dict[str, Any] = {"link": link, "pdu": int(pdu), "drop": float(drop), "cap_mbit_s":
                               None if cap == "-" else int(cap), "rounds": len(runs)}
        for field in ("mb_s", "seconds", "wire_bytes", "goodput_of_capacity",
                      "product_share_of_wire"):
            values = [r[field] for r in runs if field in r]
            if values:
                row[field] = statistics.median(values)
        row["product_bytes"] = runs[0]["product_bytes"]
        table.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cfdp.json").write_text(json.dumps({"rows": table, "ground": ground_summaries},
                                                  indent=2) + "\n")
    lines = ["# CFDP Class 2 downlink (cfdp-py 0.7.0, pure Python)", "",
             f"`python -m onboard.bench.cfdp --rounds {args.rounds}` on this machine (2 shared "
             "cores); payload: the two full zstd GeoTIFFs of the sample's 256² crop "
             f"({table[0]['product_bytes']} B; 128² ones at 1 Mbit/s). Medians of "
             f"{args.rounds} interleaved rounds. Loss is of file-data PDUs; with loss, 10 % of "
             "PDUs are also reordered. Every transfer ended in a Finished NO_ERROR and the "
             "ground's SHA-256 check.", "",
             f"Load average when the run ended: {os.getloadavg()[0]:.1f} on 2 cores (other "
             "sessions' work: the figures are lower bounds).", "",
             "| link | PDU | loss | cap Mbit/s | MB/s | s | product / wire octets | "
             "goodput of capacity |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        cap = "-" if row["cap_mbit_s"] is None else str(row["cap_mbit_s"])
        goodput = row.get("goodput_of_capacity")
        share = row.get("product_share_of_wire")
        lines.append(f"| {row['link']} | {row['pdu']} | {row['drop']:.0%} | {cap} | "
                     f"{row['mb_s']:.2f} | {row['seconds']:.2f} | "
                     f"{'-' if share is None else f'{share:.1%}'} | "
                     f"{'-' if goodput is None else f'{goodput:.1%}'} |")
    (RESULTS / "cfdp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
