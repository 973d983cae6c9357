"""End-to-end throughput of the flight pipeline's scoring, with its breakdown and peak memory.

    python -m onboard.bench.pipeline [--size 4096] [--backend onnxruntime|openvino] [--quick]
                                     [--repeat N] [--s2-tile] [--cache DIR]

Scores a ``size`` × ``size`` × 13-band uint16 GeoTIFF (planar, tiled 256, zstd; generated once
with :mod:`onboard.bench.stream_scene`'s generator into ``--cache``) through
:class:`~onboard.runtime.pipeline.Pipeline` with the INT8 cloud bundle, tile 256, halo 16, two
engine threads, and reports Mpx/s of 13-band input end to end, the per-step breakdown, the
decode-only figure of the same windows (the 4 bands the stage reads, and all 13), the engine
alone, and peak RSS. Without ``--quick`` it then measures each lever (batch sizes, engine
threads, OpenVINO against ONNX Runtime, ORT intra-op spinning, per-tile band statistics), one
run each, or ``--repeat`` interleaved rounds. ``--s2-tile`` also scores the 10980² scene once
per backend. Every measurement runs in a fresh
process, so its peak RSS is its own. Results: ``bench/results/pipeline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = Path(__file__).resolve().parents[1] / "models" / "cloud"
BUNDLES = {"onnxruntime": MODELS / "cloud-4band-int8-ort.onboard",
           "openvino": MODELS / "cloud-4band-int8-ov.onboard"}
BANDS = 13
TILE, HALO = 256, 16
GOAL_MPX_S, GOAL_RSS_MB, GOAL_SIZE = 20.0, 400.0, 10980


def scene_path(cache: Path, size: int) -> Path:
    """The cached scene, written on first use (planar, so that a read decodes only the bands
    the stages ask for)."""
    import tifffile

    from onboard.bench.stream_scene import write_scene

    path = cache / f"scene-{size}-{BANDS}b-t{TILE}-zstd.tif"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"writing {size}×{size}×{BANDS} scene to {path} ...", file=sys.stderr)
        part = path.with_name(path.name + ".part.tif")
        write_scene(part, size, BANDS, TILE)
        part.rename(path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        if int(page.planarconfig) != 2 or not page.is_tiled:
            raise SystemExit(f"{path}: not a planar tiled TIFF; delete it to regenerate")
    return path


# -- what runs in each fresh process --------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU seconds of this process: less moved by other jobs on the machine than the wall,
    and what a lever such as spinning mostly changes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _no_spinning() -> None:
    """Make every ONNX Runtime session of this process turn intra-op spinning off.

    The engine builds its ``SessionOptions`` itself and exposes no such switch (and ORT reads
    no environment variable for it), so the experiment swaps the class the engine calls."""
    import onnxruntime as ort

    base = ort.SessionOptions

    def options() -> Any:
        made = base()
        made.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return made

    ort.SessionOptions = options  # type: ignore[misc]


def _time_calls(owner: Any, name: str, into: dict[str, float], key: str) -> None:
    """Wrap ``owner.name`` so that its time adds up into ``into[key]``: the pipeline times
    reading, statistics and stages itself but not the rest of its main-thread loop."""
    inner = getattr(owner, name)
    into[key] = 0.0

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into[key] += time.perf_counter() - t0

    setattr(owner, name, timed)


def child_score(spec: dict[str, Any]) -> dict[str, Any]:
    import imagecodecs

    from onboard.runtime.config import config_from_dict
    from onboard.runtime.pipeline import Acquisition, Pipeline
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.telemetry import Telemetry

    if not spec.get("spinning", True):
        _no_spinning()
    extra: dict[str, float] = {}
    # Instance-level wraps on the main thread's per-tile work; the mask layers' zstd is the only
    # zstd_encode on that path (the reader decodes, it never encodes).
    _time_calls(imagecodecs, "zstd_encode", extra, "mask_zstd")
    data = {
        "source": {"kind": "geotiff", "paths": [spec["path"]]},
        "tiling": {"tile": TILE, "halo": HALO},
        "buffer": {"batch": spec["batch"]},
        "telemetry": {"band_stats": spec.get("band_stats", True)},
        "cloud": {"bundle": str(BUNDLES[spec["backend"]]), "backend": spec["backend"],
                  "threads": spec["threads"], "batch": spec["cloud_batch"]},
    }
    config = config_from_dict(data, base=Path(spec["path"]).parent)
    with tempfile.TemporaryDirectory() as tmp:
        telemetry = Telemetry(Path(tmp) / "telemetry.jsonl", 8 * 2**20, keep=False)
        t0 = time.perf_counter()
        pipeline = Pipeline(config, telemetry, Path(tmp) / "state")
        load_s = time.perf_counter() - t0
        _time_calls(pipeline, "_quicklook", extra, "quicklook")
        _time_calls(pipeline, "_emit_tile", extra, "tile_telemetry")
        scene = GeoTiffScene(spec["path"])
        cpu0 = _cpu_s()
        from onboard.bench.power import EnergyMeter

        try:
            with EnergyMeter().measure() as energy:
                result = pipeline.score(Acquisition("bench", "bench", scene, None))
            cpu_s = _cpu_s() - cpu0
        finally:
            scene.close()
            pipeline.close()
            telemetry.close()
    timings = dict(result.timings_s)
    main = timings["stats"] + timings["cloud"] + sum(extra.values())
    return {"timings_s": timings, "main_thread_s": extra,
            "waiting_for_reader_s": max(0.0, timings["wall"] - main),
            "engine_load_s": load_s, "tiles": len(result.scores), "counts": result.counts(),
            "mpx": result.input_mpx, "mpx_per_s": result.input_mpx / timings["wall"],
            "bands_read": list(pipeline.bands), "cpu_s": cpu_s,
            "energy_j_per_mpx": energy.per_mpx(result.input_mpx), "energy_source": energy.source,
            "peak_rss_mb": _peak_rss_mb()}


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """``onboard run`` itself on a config (default: the bundled sample): every acquisition
    scored, each window planned, products made, queued and sent; Mpx/s of input over the wall
    time of the whole run, with the run's own breakdown."""
    from onboard.bench.power import EnergyMeter
    from onboard.runtime import pipeline

    config = spec.get("config") or pipeline.SAMPLE_CONFIG
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with EnergyMeter().measure() as energy:
            result = pipeline.run(config, Path(tmp) / "run")
        wall = time.perf_counter() - t0
    summary = result.summary
    scoring = sum(a["tiles"] for a in summary["acquisitions"])
    timings = dict(summary["timings_s"])
    return {"config": str(config), "wall_s": wall, "input_mpx": summary["input_mpx"],
            "mpx_per_s": summary["input_mpx"] / wall, "tiles": scoring,
            "timings_s": timings, "scoring_wall_s": timings.get("wall", 0.0),
            "plan_products_queue_link_s": max(0.0, wall - timings.get("wall", 0.0)),
            "acquisitions": [{k: a[k] for k in ("id", "tiles", "mpx_per_s", "decisions")}
                             for a in summary["acquisitions"]],
            "energy_j_per_mpx": energy.per_mpx(summary["input_mpx"]),
            "energy_source": energy.source, "peak_rss_mb": _peak_rss_mb()}


def child_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """The reader thread's own work on the same windows, alone, on one thread."""
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.windows import CoreGrid

    bands = spec.get("bands")
    with GeoTiffScene(spec["path"]) as scene:
        grid = CoreGrid(scene.height, scene.width, TILE, HALO)
        t0 = time.perf_counter()
        for placement in grid:
            scene.read(placement.window, bands)
        seconds = time.perf_counter() - t0
        mpx = scene.height * scene.width / 1e6
    return {"seconds": seconds, "mpx_per_s": mpx / seconds, "bands": bands or "all",
            "peak_rss_mb": _peak_rss_mb()}


def child_engine(spec: dict[str, Any]) -> dict[str, Any]:
    """The engine alone on batches of the pipeline's windows; Mpx/s counts tile cores, the
    scene pixels those windows stand for."""
    from onboard.runtime.engines import open_engine

    if not spec.get("spinning", True):
        _no_spinning()
    engine = open_engine(BUNDLES[spec["backend"]], spec["backend"], threads=spec["threads"],
                         batch_size=spec["cloud_batch"], warmup=3)
    n, size = spec["cloud_batch"], TILE + 2 * HALO
    x = np.random.default_rng(0).random((n, 4, size, size), dtype=np.float32) * 0.3
    times = []
    for _ in range(spec.get("repeats", 12)):
        t0 = time.perf_counter()
        engine.run(x)
        times.append(time.perf_counter() - t0)
    engine.close()
    median = float(np.median(times))
    return {"ms_per_batch": median * 1e3, "tiles_per_batch": n,
            "core_mpx_per_s": n * TILE * TILE / median / 1e6,
            "window_mpx_per_s": n * size * size / median / 1e6, "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {"score": child_score, "decode": child_decode, "engine": child_engine,
            "run": child_run}


def measure(kind: str, **spec: Any) -> dict[str, Any]:
    """One measurement in a fresh process, with the load average it started under."""
    load = os.getloadavg()
    out = subprocess.run([sys.executable, "-m", "onboard.bench.pipeline", "--child", kind,
                          json.dumps(spec, default=str)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {spec} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(spec=spec, load_avg_1m=round(load[0], 2))
    return result


# -- the runs -------------------------------------------------------------------------------------

BASE = {"backend": "onnxruntime", "threads": 2, "batch": 8, "cloud_batch": 8}


def levers(base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each lever as (label, settings over ``base``), one change at a time."""
    other = "openvino" if base["backend"] == "onnxruntime" else "onnxruntime"
    out: list[tuple[str, dict[str, Any]]] = [
        ("batch 4 / 4", {"batch": 4, "cloud_batch": 4}),
        ("batch 16 / 16", {"batch": 16, "cloud_batch": 16}),
        ("batch 32 / 32", {"batch": 32, "cloud_batch": 32}),
        ("batch 32 / cloud 8", {"batch": 32, "cloud_batch": 8}),
        ("engine threads 1", {"threads": 1}),
        (f"backend {other}", {"backend": other}),
        ("telemetry band_stats off", {"band_stats": False}),
    ]
    if base["backend"] == "onnxruntime":
        out.insert(5, ("ORT spinning off", {"spinning": False}))
        out.insert(6, ("ORT spinning off, threads 1", {"spinning": False, "threads": 1}))
    return out


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    path = scene_path(args.cache, args.size)
    base = {**BASE, "backend": args.backend, "path": str(path)}
    report: dict[str, Any] = {
        "scene": f"{args.size}x{args.size}x{BANDS} uint16, planar, tiles {TILE}, zstd",
        "file_mib": round(path.stat().st_size / 2**20, 1), "size": args.size,
        "tile": TILE, "halo": HALO, "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                   f"{platform.python_version()}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print("scoring (base) ...", file=sys.stderr)
    report["base"] = measure("score", **base)
    print("decode only ...", file=sys.stderr)
    bands = report["base"]["bands_read"]
    report["decode"] = {"stage_bands": measure("decode", path=str(path), bands=bands),
                        "all_bands": measure("decode", path=str(path), bands=None)}
    report["engine"] = measure("engine", **{k: base[k] for k in
                                            ("backend", "threads", "cloud_batch")})
    if not args.quick:
        # Rounds of the base and every lever, interleaved, so that the other jobs on a shared
        # machine fall on all of them alike; each row reports its median round.
        runs: dict[str, list[dict[str, Any]]] = {"base": [report["base"]]}
        for round_ in range(args.repeat):
            if round_:
                runs["base"].append(measure("score", **base))
            for label, change in levers(base):
                print(f"round {round_ + 1}, lever: {label} ...", file=sys.stderr)
                runs.setdefault(label, []).append(measure("score", **{**base, **change}))
        report["base"] = _median_run(runs.pop("base"))
        report["levers"] = [{"lever": label, **_median_run(r)} for label, r in runs.items()]
    if args.s2_tile and args.size != GOAL_SIZE:
        big = scene_path(args.cache, GOAL_SIZE)
        report["s2_tile"] = []
        for backend in BUNDLES:
            print(f"scoring the {GOAL_SIZE}² scene on {backend} ...", file=sys.stderr)
            report["s2_tile"].append({"scene": f"{GOAL_SIZE}x{GOAL_SIZE}x{BANDS}",
                                      "file_mib": round(big.stat().st_size / 2**20, 1),
                                      **measure("score", **{**base, "backend": backend,
                                                            "path": str(big)})})
        report["s2_decode_stage_bands"] = measure("decode", path=str(big), bands=bands)
    return report


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput (an actual run, so that its breakdown adds up), with every
    run's figures beside it."""
    ranked = sorted(runs, key=lambda r: r["mpx_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": len(runs),
            "mpx_per_s_all": [round(r["mpx_per_s"], 2) for r in runs],
            "cpu_s_all": [round(r["cpu_s"], 2) for r in runs]}


# -- reporting ------------------------------------------------------------------------------------


def _row(label: str, r: dict[str, Any], base_mpx: float | None = None) -> str:
    t = r["timings_s"]
    ratio = f"{r['mpx_per_s'] / base_mpx:.2f}×" if base_mpx else "1.00×"
    m = r["main_thread_s"]
    other = m["quicklook"] + m["tile_telemetry"] + m["mask_zstd"]
    return (f"| {label} | **{r['mpx_per_s']:.1f}** | {ratio} | {t['wall']:.2f} | {t['read']:.2f} "
            f"| {t['stats']:.3f} | {t['cloud']:.2f} | {other:.2f} | "
            f"{r['waiting_for_reader_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['load_avg_1m']} |")


HEAD = ("| run | Mpx/s | vs base | wall s | read s (reader thread) | stats s | cloud s | "
        "quicklook + tile telemetry + mask zstd s | main waits for reader s | CPU s | "
        "peak RSS MB | load 1 min |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def markdown(report: dict[str, Any]) -> str:
    base = report["base"]
    s = base["spec"]
    size_flag = "" if report["size"] == 4096 else f" --size {report['size']}"
    lines = [
        "# Flight pipeline scoring, end to end",
        "",
        f"Scene: {report['scene']} ({report['file_mib']} MiB). Cloud stage: INT8 "
        f"`{Path(BUNDLES[s['backend']]).name}` on {s['backend']}, tile {report['tile']}, halo "
        f"{report['halo']}, {s['threads']} engine threads, `[buffer] batch` {s['batch']}, "
        f"`[cloud] batch` {s['cloud_batch']}. Mpx/s counts pixels of the 13-band input "
        f"(height × width) over the wall time of `Pipeline.score`. Machine: "
        f"{report['machine']}, shared with other jobs: the load average at the start of each "
        f"run is in its row. Every run is one fresh process (`python -m onboard.bench.pipeline`"
        f"{size_flag}).",
        "",
        "`read` is the reader thread's time (it overlaps the stages); `stats`, `cloud`, the "
        "quicklook, tile telemetry and mask zstd are the main thread's, and what is left of the "
        "wall is the main thread waiting for the reader.",
        "",
        HEAD + _row("base", base),
    ]
    for big in report.get("s2_tile", []):
        lines.append(_row(f"base on the {big['scene']} scene, {big['spec']['backend']}", big,
                          base["mpx_per_s"]))
    d = report["decode"]
    e = report["engine"]
    lines += [
        "",
        "## Ceilings of the same scene, measured alone",
        "",
        "| what | Mpx/s | peak RSS MB |\n|---|---|---|",
        f"| decode, the {len(base['bands_read'])} bands the stage reads "
        f"({', '.join(base['bands_read'])}), same windows, one thread | "
        f"{d['stage_bands']['mpx_per_s']:.1f} | {d['stage_bands']['peak_rss_mb']:.0f} |",
        f"| decode, all {BANDS} bands, same windows, one thread | "
        f"{d['all_bands']['mpx_per_s']:.1f} | {d['all_bands']['peak_rss_mb']:.0f} |",
        f"| cloud engine alone, batches of {e['tiles_per_batch']} windows of "
        f"{TILE + 2 * HALO}², {e['spec']['threads']} threads (tile-core Mpx/s) | "
        f"{e['core_mpx_per_s']:.1f} | {e['peak_rss_mb']:.0f} |",
    ]
    if "s2_decode_stage_bands" in report:
        big = report["s2_decode_stage_bands"]
        lines.append(f"| decode, stage bands, {GOAL_SIZE}² | "
                     f"{big['mpx_per_s']:.1f} | {big['peak_rss_mb']:.0f} |")
    if report.get("levers"):
        rounds = base["rounds"]
        lines += ["", f"## Levers, one change from the base at a time ({rounds} interleaved "
                  f"round{'s' if rounds > 1 else ''}; each row is its median round)", "",
                  HEAD + _row("base", base)]
        lines += [_row(r["lever"], r, base["mpx_per_s"]) for r in report["levers"]]
        lines += ["", "Every round's Mpx/s and CPU s:", "",
                  "| run | Mpx/s | CPU s |\n|---|---|---|",
                  f"| base | {base['mpx_per_s_all']} | {base['cpu_s_all']} |"]
        lines += [f"| {r['lever']} | {r['mpx_per_s_all']} | {r['cpu_s_all']} |"
                  for r in report["levers"]]
    goals = report.get("s2_tile") or ([base] if report["size"] == GOAL_SIZE else [])
    lines += ["", f"Goal: ≥ {GOAL_MPX_S:g} Mpx/s on 2 cores with peak RSS under "
              f"{GOAL_RSS_MB:g} MB on a {GOAL_SIZE}² scene."]
    if not goals:
        lines.append(f"The {GOAL_SIZE}² scene was not run here (`--s2-tile` runs it).")
    for goal in goals:
        met = goal["mpx_per_s"] >= GOAL_MPX_S and goal["peak_rss_mb"] < GOAL_RSS_MB
        lines.append(f"Measured on {GOAL_SIZE}², {goal['spec']['backend']}: "
                     f"{goal['mpx_per_s']:.1f} Mpx/s, {goal['peak_rss_mb']:.0f} MB: "
                     f"{'met' if met else 'not met'} (one run).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(CHILDREN[argv[1]](json.loads(argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--backend", choices=sorted(BUNDLES), default="onnxruntime")
    parser.add_argument("--quick", action="store_true", help="the base run and ceilings only")
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds of the base and the levers")
    parser.add_argument("--s2-tile", action="store_true",
                        help=f"also score the {GOAL_SIZE}² scene once")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir())
                        / "onboard-bench", help="where generated scenes are kept")
    args = parser.parse_args(argv)
    report = run_all(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "pipeline.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
