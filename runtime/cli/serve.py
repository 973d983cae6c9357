"""``onboard serve [CONFIG] --port P``: the pipeline behind a TCP frame link (hardware-in-loop).

Frames come in over the protocol of ``docs/hil.md``; each is scored as an acquisition by the
pipeline the config describes (default: the bundled sample's), and decisions and telemetry go
back as JSON lines. ``onboard bench --hil HOST:PORT`` is the matching instrument.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from onboard.runtime import pipeline
from onboard.runtime.serve import ServeOptions, serve
from onboard.runtime.telemetry import Telemetry


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, nargs="?", default=None,
                        help="a runtime config (TOML) whose stages score the frames; default: "
                             f"the bundled sample ({pipeline.SAMPLE_CONFIG.name})")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for a bench "
                             "network)")
    parser.add_argument("--max-frame-mb", type=float, default=256.0,
                        help="largest frame accepted, MiB; larger ones are refused unread")
    parser.add_argument("--queue", type=int, default=2,
                        help="frames per client received and waiting to be scored")
    parser.add_argument("--policy", choices=["drop", "block"], default="drop",
                        help="when the queue is full: drop the frame (an instrument cannot "
                             "wait) or stop reading (TCP backpressure defers the sender)")
    parser.add_argument("--max-clients", type=int, default=4)
    parser.add_argument("--max-frames", type=int, default=None,
                        help="stop after answering this many frames")
    parser.add_argument("--state", type=Path, default=Path("onboard-serve") / "state",
                        help="stage state that outlives a session (reference store)")
    parser.add_argument("--log", type=Path, default=None,
                        help="append the server's own events here as JSON lines "
                             "(default: stderr)")


def run(args: argparse.Namespace) -> int:
    options = ServeOptions(host=args.host, port=args.port,
                           max_frame_bytes=int(args.max_frame_mb * 2**20),
                           queue_frames=args.queue, policy=args.policy,
                           max_clients=args.max_clients, max_frames=args.max_frames)
    log = Telemetry(args.log) if args.log else Telemetry(sys.stderr, keep=False)

    def ready(host: str, port: int) -> None:
        print(json.dumps({"serving": f"{host}:{port}", "memory_bound_bytes":
                          options.memory_bound_bytes}), flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    stats = serve(args.config or pipeline.SAMPLE_CONFIG, args.state, options, log, ready)
    print(json.dumps({"served": stats}), flush=True)
    log.close()
    return 0
