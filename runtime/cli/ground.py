"""``onboard ground --listen HOST:PORT --out DIR``: the ground side of the CFDP downlink.

Receives CFDP Class 2 transactions over UDP, stores each product once under its id in
``DIR/store`` (its SHA-256 checked against the one the flight side sent and the one its STAC
Item states), acknowledges it, catalogues it (``DIR/catalogue.json``, a STAC ItemCollection
with one Feature per product id; each Item in ``DIR/items``), and decodes the telemetry space
packets to ``DIR/telemetry.jsonl``. It stops by itself: after ``--duration`` seconds, after
``--idle-exit`` quiet seconds once something arrived, or on SIGTERM / SIGINT, and prints a JSON
summary.

``onboard ground --decode PACKETS --out DIR`` decodes a file of concatenated telemetry space
packets instead (no listening).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from onboard.runtime.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", metavar="HOST:PORT", default=None,
                        help="UDP address to receive on (port 0: any free port, printed)")
    parser.add_argument("--out", type=Path, required=True, help="the ground's folder")
    parser.add_argument("--config", type=Path, default=None,
                        help="a runtime config whose [cfdp] section sets entity ids, PDU size "
                             "and timers (default: the section's defaults)")
    parser.add_argument("--duration", type=float, default=3600.0,
                        help="stop after this many seconds (default 3600)")
    parser.add_argument("--idle-exit", type=float, default=None,
                        help="stop once nothing arrived for this many seconds (after the first "
                             "packet, with no transaction open)")
    parser.add_argument("--decode", type=Path, default=None, metavar="PACKETS",
                        help="decode a file of telemetry space packets into --out and exit")


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen wants HOST:PORT, got {text!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    from onboard.runtime.downlink.cfdp import CfdpLinkConfig, GroundStation, serve_udp
    from onboard.runtime.downlink.packets import TelemetryDecoder, iter_packets
    from onboard.runtime.durability import write_text

    if args.decode is not None:
        try:
            stream = args.decode.read_bytes()
        except OSError as error:
            raise ConfigError(f"{args.decode}: cannot read: {error.strerror or error}") from error
        decoder = TelemetryDecoder()
        records = decoder.feed_all(iter_packets(stream))
        write_text(args.out / "telemetry.jsonl",
                   "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        print(json.dumps(decoder.report.to_dict()))
        return 0
    if args.listen is None:
        raise ConfigError("onboard ground needs --listen HOST:PORT (or --decode PACKETS)")
    host, port = _address(args.listen)
    config = CfdpLinkConfig()
    if args.config is not None:
        from onboard.runtime import pipeline  # registers every section a run config may hold
        from onboard.runtime.config import load_config

        config = load_config(args.config).section("cfdp")
        del pipeline
    station = GroundStation(args.out, config)
    stopping: dict[str, Any] = {"now": False}

    def stop(signum: int, frame: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def ready(bound: int) -> None:
        print(f"listening {host}:{bound}", flush=True)

    summary = serve_udp(station, host, port, duration_s=args.duration,
                        idle_exit_s=args.idle_exit, ready=ready, stop=lambda: stopping["now"])
    print(json.dumps(summary, default=str), flush=True)
    sys.stdout.flush()
    return 0
