"""``onboard bench``: engines × precisions × threads with their peers, end to end, and HIL.

The work is in ``onboard.bench`` (ground and bench side); this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", type=Path, nargs="*",
                        help="bundles to measure (default: every models/*/*.onboard)")
    parser.add_argument("--quick", action="store_true",
                        help="one round, 2 threads, shipped engines only, a 1024² scene: under "
                             "a minute")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="folder for bench.json, bench.md and the PNG charts")
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of every row (default 1 quick, 3 full)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    parser.add_argument("--scene-size", type=int, nargs="+", default=None,
                        help="sides of the generated 13-band scenes (default 1024 quick; 4096 "
                             "and 10980, a Sentinel-2 tile)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the shared imagery for the metrics (default: ONBOARD_DATA)")
    parser.add_argument("--hil", metavar="HOST:PORT",
                        help="also stream the sample to an onboard serve there")
    parser.add_argument("--hil-config", type=Path, default=None,
                        help="the config the board serves, for the local reference run")
    parser.add_argument("--line-rate", type=float, nargs="+", default=None,
                        help="HIL line rates in pixels per second (default: half and three "
                             "times the measured capacity)")
    parser.add_argument("--hil-frames", type=int, default=4,
                        help="repeats of the sample's two dates in each HIL run")


def run(args: argparse.Namespace) -> int:
    from onboard.bench.suite import BenchOptions, headline, run_bench

    options = BenchOptions(out=args.out, quick=args.quick, bundles=list(args.bundles),
                           threads=args.threads or [], rounds=args.rounds,
                           peers=not args.no_peers, scene_sizes=args.scene_size or [],
                           e2e=not args.no_e2e, hil=args.hil, hil_config=args.hil_config,
                           line_rates=args.line_rate or [], hil_frames=args.hil_frames)
    if args.data is not None:
        options.data = args.data
    result = run_bench(options)
    for line in headline(result):
        print(line)
    print(f"results: {args.out / 'bench.md'} ({result['seconds']} s)", file=sys.stderr)
    return 0
