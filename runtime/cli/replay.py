"""``onboard replay CONFIG ARCHIVE... [--scheduler ADDRESS] --out DIR``: the flight pipeline over
an archive on Dask (ground side; needs the ``[replay]`` extra).

Every scene goes through the same stages, bundles and planner as ``onboard run``; places run in
parallel on a local cluster (this machine's cores) or on a running ``dask.distributed``
scheduler. The work is in :mod:`onboard.runtime.replay`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the runtime config (TOML) to replay; its "
                                                  "[source] is replaced by the archive")
    parser.add_argument("archive", type=Path, nargs="+",
                        help="scenes: OSCD-style folders (a city folder gives both dates) or "
                             "GeoTIFF files; put in time order")
    parser.add_argument("--scheduler", metavar="ADDRESS", default=None,
                        help="a running dask.distributed scheduler (tcp://host:8786); default: "
                             "a local cluster of this machine's processes (the out folder must "
                             "be on a filesystem every worker shares)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes of the local cluster (default: one per core)")
    parser.add_argument("--partition", choices=("footprint", "place"), default="footprint",
                        help="one reference store per group of overlapping footprints (exact, "
                             "the default) or per place name (Sentinel-2 tiles, which overlap "
                             "their neighbours)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder; run again with the same one to resume")


def run(args: argparse.Namespace) -> int:
    from onboard.runtime.replay import replay

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = replay(args.config, args.archive, args.out, scheduler=args.scheduler,
                    workers=args.workers, echo=echo, partition_by=args.partition)
    for line in result.summary_lines():
        print(line)
    return 0
