"""``onboard run [CONFIG] [--out DIR]``: the flight pipeline over a config's source.

With no config it runs the bundled sample: both dates of a Hong Kong crop, date 1 as a first
pass and date 2 after it, through the cloud stage, the planner and the queue.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from onboard.runtime import pipeline
from onboard.runtime.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help=f"a runtime config (TOML); default: the bundled sample "
                             f"({pipeline.SAMPLE_CONFIG.name})")
    parser.add_argument("--out", type=Path, default=Path("onboard-run"),
                        help="output folder for products, plan, telemetry and the report "
                             "(default: ./onboard-run)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--cfdp", metavar="HOST:PORT",
                        help="downlink over CFDP Class 2 (UDP) to an onboard ground listening "
                             "there, instead of the config's [link]")
    parser.add_argument("--active", type=Path, metavar="STATE",
                        help="run the uplinked active set kept in STATE (switched only here, at "
                             "the pass boundary; judged after the pass, rolled back if it fails)")


def cfdp_overrides(address: str | None) -> dict[str, dict[str, Any]] | None:
    """``--cfdp HOST:PORT`` as config keys: the link becomes CFDP over UDP to that ground."""
    if address is None:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--cfdp takes HOST:PORT (an onboard ground's --listen), got "
                          f"{address!r}")
    return {"link": {"kind": "cfdp"},
            "cfdp": {"transport": "udp", "host": host, "port": int(port)}}


def run(args: argparse.Namespace) -> int:
    config = args.config or pipeline.SAMPLE_CONFIG
    overrides = cfdp_overrides(args.cfdp)
    interactive = sys.stderr.isatty()

    def progress(acquisition: str, done: int, total: int) -> None:
        if interactive or done == total:
            end = "\n" if done == total else ""
            print(f"\r{acquisition}: tiles {done}/{total}", end=end, file=sys.stderr, flush=True)

    if args.active is None:
        result = pipeline.run(config, args.out, progress=progress, overrides=overrides)
    else:
        from onboard.runtime import uplink

        config = uplink.active_config(args.active, args.out)
        try:
            result = pipeline.run(config, args.out, progress=progress, overrides=overrides)
        except BaseException as error:
            uplink.pass_finished(args.active, args.out, error)
            raise
        uplink.pass_finished(args.active, args.out)
    if args.json:
        print(json.dumps(result.summary, indent=2, default=str))
    else:
        for line in result.summary_lines():
            print(line)
    return 0 if not result.fatal else 1

