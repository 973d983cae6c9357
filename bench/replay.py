"""Replay scaling: `onboard replay` on 1 and 2 worker processes against a sequential `onboard run`.

    python -m onboard.bench.replay [--data ../shared/data] [--rounds 1] [--out bench/results/replay]

The archive is every OSCD city of the shared data, both dates, given as single-date folders
(``CITY/imgs_1``, ``CITY/imgs_2``) so that the replay's order is global time order and the
quarterly contact windows see the acquisitions made before them. Every scene goes through the
cloud and change stages (the shipped INT8 bundles, one engine thread each), the planner, the
product makers and the queue. Measured in the same session, in interleaved rounds:

- the sequential run (one process): wall time and its scoring throughput;
- the replay on 1 and on 2 local worker processes: wall time, scoring phase (with the cluster
  start given apart), planning phase, and the speed-up of 2 workers over 1;
- Mpx/s per worker process (input pixels over the sum of per-scene scoring time), the figure the
  archive-scale estimate in docs/replay.md uses;
- identity: every replay compared with the sequential run (``compare_with_run``: acquisition
  and tile ids, decisions, reasons, scores to 1e-6, every plan row).

The machine is shared (2 cores): the load average is recorded beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.data import default_data_root

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CLOUD = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
CHANGE = REPO / "models" / "change" / "change-13band-int8-ort.onboard"
PASSES = ["2015-09-01", "2015-12-01", "2016-03-01", "2016-06-01", "2016-09-01", "2016-12-01",
          "2017-03-01", "2017-06-01", "2017-09-01", "2017-12-01", "2018-03-01", "2018-06-01"]


def config_text(paths: list[Path], change: bool = True) -> str:
    # Tiles of 224 px with a 16 px halo: 256 px windows, what the provisional change bundle
    # was compiled for (a scene under 256 px on a side cannot run it: its tiles are failed).
    text = (f'[source]\nkind = "oscd"\npaths = {json.dumps([str(p) for p in paths])}\n'
            "[tiling]\ntile = 224\nhalo = 16\n[buffer]\nbatch = 8\n"
            f'[cloud]\nbundle = "{CLOUD}"\nthreads = 1\nbatch = 8\n'
            '[cloud.gate]\nmax_cloud_fraction = 0.6\naction = "demote"\n'
            + (f'[change]\nbundle = "{CHANGE}"\nthreads = 1\nbatch = 8\n' if change else "")
            + "[planner]\nage_half_life_s = 2592000.0\n"
            "[storage]\nbudget_bytes = 4294967296\n")
    for day in PASSES:
        text += f"[[passes]]\nstart = {day}T12:00:00Z\nduration_s = 60\nbitrate_bps = 1000000\n"
    return text


def archive(data: Path) -> list[Path]:
    cities = sorted(p for p in (data / "oscd").iterdir() if (p / "imgs_1").is_dir())
    return [city / date for city in cities for date in ("imgs_1", "imgs_2")]


def run_sequential(work: Path, paths: list[Path], change: bool) -> dict[str, Any]:
    from onboard.runtime import pipeline

    tag = "change" if change else "cloud"
    config = work / f"sequential-{tag}.toml"
    config.write_text(config_text(paths, change))
    out = work / f"sequential-{tag}"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = pipeline.run(config, out)
    wall = time.perf_counter() - started
    s = result.summary
    scoring = sum(r.timings_s["wall"] for r in result.acquisitions)
    return {"kind": "sequential", "out": str(out), "wall_s": wall, "load": load,
            "mpx": s["input_mpx"], "score_s": scoring, "plan_s": wall - scoring,
            "mpx_per_s_scoring": s["input_mpx"] / scoring}


def run_replay(work: Path, paths: list[Path], workers: int, label: str, change: bool
               ) -> dict[str, Any]:
    from onboard.runtime.replay import replay

    config = work / f"replay-{'change' if change else 'cloud'}.toml"
    config.write_text(config_text([REPO / "nowhere"], change))
    out = work / label
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = replay(config, paths, out, workers=workers, echo=lambda line: None)
    wall = time.perf_counter() - started
    scored = [s for s in result.scenes if s["status"] != "failed"]
    per_scene = sum(s["score_wall_s"] for s in scored)
    mpx = sum(s["mpx"] for s in scored)
    return {"kind": "replay", "workers": result.workers, "out": str(out), "wall_s": wall,
            "load": load, "mpx": mpx, "score_s": result.score_wall_s,
            "cluster_start_s": result.cluster_start_s,
            "score_s_without_start": result.score_wall_s - result.cluster_start_s,
            "plan_s": result.plan_wall_s, "per_scene_score_s": per_scene,
            "mpx_per_s_per_worker": mpx / per_scene, "failed": len(result.failed),
            "partitions": len(result.partitions), "scenes": len(result.scenes)}


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Wall time per run, split into start, scoring and planning: numpy drawing, runtime PNG."""
    from onboard.runtime.downlink.quicklook import draw_text, fill_rect
    from onboard.runtime.png import write_png

    label_w, bar_w, row_h = 190, 520, 26
    image = np.full((40 + row_h * len(rows) + 30, label_w + bar_w + 90, 3), 255, np.uint8)
    draw_text(image, "wall time, s: cluster start / scoring / planning", 8, 8, (0, 0, 0), 2)
    top = max(r["wall_s"] for r in rows)
    colours = {"start": (150, 150, 150), "score": (0, 114, 178), "plan": (230, 159, 0)}
    for i, r in enumerate(rows):
        y = 34 + row_h * i
        name = "sequential" if r["kind"] == "sequential" else f"replay {r['workers']} w"
        stages = r["stages"].replace(" + ", "/")  # the bitmap font has no "+"
        draw_text(image, f"{stages}: {name} #{r['round']}", y + 7, 6, (0, 0, 0), 1)
        parts = [("start", r.get("cluster_start_s", 0.0)),
                 ("score", r["score_s"] - r.get("cluster_start_s", 0.0)),
                 ("plan", r["wall_s"] - r["score_s"])]
        x = label_w
        for key, seconds in parts:
            width = int(bar_w * max(seconds, 0.0) / top)
            fill_rect(image, y + 3, x, row_h - 6, width, colours[key])
            x += width
        draw_text(image, f"{r['wall_s']:.1f}", y + 7, x + 6, (0, 0, 0), 1)
    legend_y = image.shape[0] - 18
    for j, (key, colour) in enumerate(colours.items()):
        fill_rect(image, legend_y, label_w + 110 * j, 8, 8, colour)
        draw_text(image, key, legend_y, label_w + 110 * j + 14, (0, 0, 0), 1)
    write_png(path, image)


def section(rows: list[dict[str, Any]], identity: dict[str, list[str]], title: str
            ) -> list[str]:
    seq = [r for r in rows if r["kind"] == "sequential"]
    one = [r for r in rows if r["kind"] == "replay" and r["workers"] == 1]
    two = [r for r in rows if r["kind"] == "replay" and r["workers"] == 2]

    def best(runs: list[dict[str, Any]], key: str) -> float:
        return min(r[key] for r in runs)

    lines = [f"## {title}", "",
             "| run | round | load | wall s | cluster start s | scoring s | planning s | "
             "Mpx/s per worker |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "sequential `onboard run`" if r["kind"] == "sequential" else \
            f"replay, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
        start = f"{r['cluster_start_s']:.1f}" if "cluster_start_s" in r else "–"
        scoring = r.get("score_s_without_start", r["score_s"])
        rate = r.get("mpx_per_s_per_worker", r.get("mpx_per_s_scoring"))
        lines.append(f"| {name} | {r['round']} | {r['load']:.1f} | {r['wall_s']:.1f} | {start} "
                     f"| {scoring:.1f} | {r['plan_s']:.1f} | {rate:.3f} |")
    lines.append("")
    if one and two:
        score_speedup = best(one, "score_s_without_start") / best(two, "score_s_without_start")
        wall_speedup = best(one, "wall_s") / best(two, "wall_s")
        lines += [f"**Speed-up of 2 workers over 1** (best of {len(one)} rounds each): scoring "
                  f"phase {score_speedup:.2f}×, whole replay {wall_speedup:.2f}× (planning runs "
                  f"once, on the driver, and is the same in both)."]
        if seq:
            lines.append(f"Sequential `onboard run`: {best(seq, 'wall_s'):.1f} s; replay on 2 "
                         f"workers {best(two, 'wall_s'):.1f} s "
                         f"({best(seq, 'wall_s') / best(two, 'wall_s'):.2f}×).")
        lines.append(f"Mpx/s per worker process (scoring time summed over scenes, 1 worker): "
                     f"{max(r['mpx_per_s_per_worker'] for r in one):.3f}.")
    lines += ["", "Identity with the sequential run (`compare_with_run`):", ""]
    for label, problems in identity.items():
        verdict = "identical" if not problems else f"{len(problems)} differences, e.g. " \
            + "; ".join(problems[:2])
        lines.append(f"- {label}: {verdict}")
    return [*lines, ""]


def markdown(sections: list[list[str]], meta: dict[str, Any]) -> str:
    lines = ["# Replay scaling: 1 vs 2 worker processes", "",
             f"Archive: {meta['scenes']} scenes ({meta['cities']} OSCD cities, both dates as "
             f"single-date folders), {meta['mpx']:.2f} Mpx of input, "
             f"{meta['partitions']} partitions (one per city); INT8 bundles, one engine thread "
             f"each; tiles 224 px + 16 px halo; {len(PASSES)} quarterly passes of 7.1 MB. "
             f"Machine: {os.cpu_count()} cores, shared with other work (load average at each "
             f"start in the tables). `python -m onboard.bench.replay --rounds {meta['rounds']}`"
             f" ({meta['date']}).", ""]
    for part in sections:
        lines += part
    lines += ["![wall time](replay.png)", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--cities", type=int, default=0, help="only the first N (0: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "replay")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    args = parser.parse_args(argv)
    from onboard.runtime.replay import compare_with_run

    paths = archive(args.data)
    if args.cities:
        paths = paths[: 2 * args.cities]
    work = Path(tempfile.mkdtemp(prefix="onboard-bench-replay-", dir=args.keep))
    # The sequential run reads the archive in the order the replay puts it in (time order).
    from onboard.runtime.config import load_config
    from onboard.runtime.replay import discover

    probe = work / "probe.toml"
    probe.write_text(config_text([REPO / "nowhere"]))
    paths = list(discover(load_config(probe), paths).paths)
    rows: list[dict[str, Any]] = []
    sections = []
    failures = 0
    try:
        for change in (False, True):
            stages = "cloud + change" if change else "cloud"
            mine: list[dict[str, Any]] = []
            identity: dict[str, list[str]] = {}
            sequential = run_sequential(work, paths, change)
            mine.append({**sequential, "round": 1, "stages": stages})
            print(f"{stages}: sequential {sequential['wall_s']:.1f} s", file=sys.stderr)
            for round_ in range(1, args.rounds + 1):
                for workers in (1, 2) if round_ % 2 else (2, 1):  # interleaved: load drifts
                    label = f"replay-{'change' if change else 'cloud'}-{workers}w-{round_}"
                    row = run_replay(work, paths, workers, label, change)
                    mine.append({**row, "round": round_, "stages": stages})
                    problems = compare_with_run(row["out"], sequential["out"])
                    identity[f"{workers} worker(s), round {round_}"] = problems
                    failures += bool(problems)
                    print(f"{stages}: {label} {row['wall_s']:.1f} s, {len(problems)} "
                          f"differences", file=sys.stderr)
            rows += mine
            sections.append(section(mine, identity, f"Stages: {stages}"))
        replays = [r for r in rows if r["kind"] == "replay"]
        meta = {"scenes": replays[0]["scenes"], "cities": len(paths) // 2,
                "mpx": replays[0]["mpx"], "partitions": replays[0]["partitions"],
                "rounds": args.rounds, "date": time.strftime("%Y-%m-%d")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
        chart(rows, args.out.with_suffix(".png"))
        text = markdown(sections, meta)
        args.out.with_suffix(".md").write_text(text)
        print(text)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
