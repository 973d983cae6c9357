"""``onboard bench``: the engine matrix with its peers, end to end, and hardware-in-loop.

One run gives a payload team the table to choose an engine and a precision from:

1. the matrix (:mod:`onboard.bench.engines`): bundle × backend × precision × threads, with the
   peers of each stage (:mod:`onboard.bench.peers`) in interleaved rounds and the ratios;
2. end to end (:mod:`onboard.bench.pipeline`'s machinery): ``onboard run`` on the bundled sample
   and ``Pipeline.score`` on generated 13-band scenes up to a Sentinel-2 tile (10980²), in Mpx/s
   of input with the per-stage breakdown, and the decode-only figure of the same windows;
3. with ``hil``, a hardware-in-loop campaign against ``onboard serve`` (:mod:`onboard.bench.hil`).

Writes ``bench.json``, ``bench.md`` and PNG charts into ``out``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onboard.bench import engines, peers, report
from onboard.models.data import default_data_root

CACHE = Path(tempfile.gettempdir()) / "onboard-bench"


@dataclass
class BenchOptions:
    out: Path = Path("bench-results")
    quick: bool = False
    bundles: list[Path] = field(default_factory=list)  # default: models/*/*.onboard
    threads: list[int] = field(default_factory=list)  # default: [2] quick, [1, 2] full
    rounds: int | None = None  # default: 1 quick, 3 full
    peers: bool = True
    data: Path = field(default_factory=default_data_root)
    scene_sizes: list[int] = field(default_factory=list)  # default: [1024] quick, [4096, 10980]
    e2e: bool = True
    hil: str | None = None  # HOST:PORT of an onboard serve
    hil_config: Path | None = None  # the config the board serves (default: the sample's)
    line_rates: list[float] = field(default_factory=list)
    hil_frames: int = 4  # repeats of the sample's two dates
    cache: Path = CACHE


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, "
            f"Python {platform.python_version()}")


def matrix(options: BenchOptions) -> list[dict[str, Any]]:
    threads = options.threads or ([2] if options.quick else [1, 2])
    rounds = options.rounds or (1 if options.quick else 3)
    rows = engines.plan_rows(options.bundles or engines.shipped_bundles(), threads,
                             not options.quick, options.data, options.quick)
    if options.peers:
        rows += peers.plan_rows(rows, threads, options.data, options.quick)
    rows = engines.measure_rows(rows, rounds)
    peers.add_ratios(rows)
    return rows


def end_to_end(options: BenchOptions) -> dict[str, Any]:
    from onboard.bench import pipeline as e2e

    sizes = options.scene_sizes or ([1024] if options.quick else [4096, 10980])
    out: dict[str, Any] = {"runs": [], "decode": []}
    if not options.quick:  # the whole run with its exact-optimum planner: seconds
        print("[bench] onboard run on the bundled sample ...", file=sys.stderr, flush=True)
        try:
            run = e2e.measure("run")
            out["runs"].append({"label": "onboard run, bundled sample (2 dates, plan, "
                                         "products, queue, link)",
                                "input": "2 × 256² × 13, OSCD band files", **run})
        except SystemExit as error:
            out["runs"].append({"label": "onboard run, bundled sample", "error": str(error)})
    backends = ["onnxruntime"] if options.quick else list(e2e.BUNDLES)
    for size in sizes:
        path = e2e.scene_path(options.cache, size)
        for backend in backends:
            print(f"[bench] Pipeline.score on {size}² ({backend}) ...", file=sys.stderr,
                  flush=True)
            spec = {**e2e.BASE, "backend": backend, "path": str(path)}
            try:
                result = e2e.measure("score", **spec)
            except SystemExit as error:
                out["runs"].append({"label": f"score {size}², {backend}", "error": str(error)})
                continue
            out["runs"].append({"label": f"Pipeline.score, {size}², INT8 cloud on {backend}",
                                "input": f"{size}² × 13 uint16 GeoTIFF, zstd, tiles 256",
                                "wall_s": result["timings_s"]["wall"], **result})
        bands = out["runs"][-1].get("bands_read") if out["runs"] else None
        for label, chosen in ((f"{size}², the stage's bands", bands), (f"{size}², all 13", None)):
            if options.quick and chosen is None:
                continue
            try:
                d = e2e.measure("decode", path=str(path), bands=chosen)
                out["decode"].append({"label": label, **d})
            except SystemExit as error:
                out["decode"].append({"label": label, "error": str(error)})
    return out


def hil(options: BenchOptions) -> dict[str, Any]:
    from onboard.bench.hil import run_hil, sample_frames
    from onboard.runtime.pipeline import SAMPLE_CONFIG

    host, _, port = (options.hil or "").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--hil takes HOST:PORT, got {options.hil!r}")
    return run_hil((host, int(port)), options.hil_config or SAMPLE_CONFIG,
                   sample_frames(options.hil_frames), options.line_rates or None)


def run_bench(options: BenchOptions) -> dict[str, Any]:
    started = time.time()
    result: dict[str, Any] = {"machine": _machine(), "quick": options.quick,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    result["matrix"] = matrix(options)
    if options.e2e:
        result["end_to_end"] = end_to_end(options)
    if options.hil:
        result["hil"] = hil(options)
    result["seconds"] = round(time.time() - started, 1)
    write(result, options.out)
    return result


def headline(result: dict[str, Any]) -> list[str]:
    """The figures a person wants first: Mpx/s per bundle and end to end."""
    lines = []
    for r in result["matrix"]:
        if "mpx_s" in r and not r.get("peer_of"):
            vs = ", ".join(f"{v:.1f}× {k}" for k, v in sorted(r.get("vs", {}).items()))
            lines.append(f"{r['model']} {r['precision']} {r['backend']} {r['threads']}t: "
                         f"{r['mpx_s']:.1f} Mpx/s" + (f" ({vs})" if vs else ""))
    for r in result.get("end_to_end", {}).get("runs", []):
        if "mpx_per_s" in r:
            lines.append(f"end to end, {r['label']}: {r['mpx_per_s']:.2f} Mpx/s")
    for r in result.get("hil", {}).get("runs", []):
        lines.append(f"HIL {r['label']}: sustained {r['sustained_mpx_s']:.2f} Mpx/s, "
                     f"dropped {r['dropped']}, deferred {r['deferred']}, equal "
                     f"{r.get('equal', 'not checked')}")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# onboard bench{' --quick' if result['quick'] else ''}", "",
             f"Measured in one run ({result['seconds']} s, started {result['started']}) on "
             f"{result['machine']}; load average {result['load_avg_1m_start']} at the start "
             "(the machine is shared: every row is a fresh process with its own load average "
             "in the JSON, medians and best rounds are both given, and ratios are taken "
             "within the run).", "",
             "## Engines and peers", "",
             "Latency: one 256² tile per call (p50, p99 over every call of every round). Mpx/s: "
             "pixels of input per second with several tiles per call, median round (best "
             "round). Ratios: this row's Mpx/s over each peer's at the same thread count. "
             "Metric: the zoo model's own, on its held-out evaluation set, through that very "
             "engine. Energy: n/a unless the board exposes RAPL or Jetson rails.", "",
             report.matrix_markdown(result["matrix"]), "Evaluation sets (every one held out "
             "whole from training):", ""]
    sets: dict[str, str] = {}
    for row in result["matrix"]:
        if row.get("eval_set"):
            sets.setdefault(row["model"], row["eval_set"])
    lines += [f"- {model}: {where}" for model, where in sets.items()] + [""]
    if "end_to_end" in result:
        lines += ["## End to end", "",
                  "`onboard run` on the bundled sample is the whole run (two acquisitions, "
                  "planning with the exact optimum beside it, products, STAC, queue, link); the "
                  "larger scenes are `Pipeline.score` (tiles 256, halo 16, INT8 cloud stage, 2 "
                  "engine threads) on generated 13-band scenes made of shifted real Sentinel-2 "
                  "texture. Mpx/s counts pixels of the 13-band input over the wall time.", "",
                  report.e2e_markdown(result["end_to_end"])]
    if "hil" in result:
        h = result["hil"]
        cap = h.get("board_capacity_mpx_s")
        lines += ["## Hardware-in-loop", "",
                  f"Against `onboard serve` at {h['address']}: frames of "
                  f"{' × '.join(map(str, h['frame_shape']))}, board capacity "
                  f"{cap:.2f} Mpx/s (frames one at a time), local scoring "
                  f"{h['local_scoring_mpx_s']:.2f} Mpx/s. Latency: from the frame's last line "
                  "at the instrument to its decisions back at the host.", "",
                  report.hil_markdown(h)]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "bench.md").write_text(markdown(result))
    report.throughput_chart(result["matrix"], out / "throughput.png")
    report.latency_chart(result["matrix"], out / "latency.png")
    if "end_to_end" in result:
        report.e2e_chart(result["end_to_end"], out / "end_to_end.png")
