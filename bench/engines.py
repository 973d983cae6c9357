"""The engine matrix: bundle × backend × precision × threads, each in a fresh process.

    python -m onboard.bench.engines [BUNDLE ...] [--threads 1 2] [--rounds 3] [--peers]

Every bundle (default: every ``models/*/*.onboard``) runs on every backend that can read it here
(the engines it carries, plus OpenVINO on an ONNX model; TensorRT where CUDA is), at each thread
count: per-tile latency p50/p99 (one tile per call), throughput in Mpx/s of input (``batch``
tiles per call), peak RSS of the process, bundle size, energy per Mpx where the board exposes
it, and the zoo model's own metric on its evaluation set through that very engine ("n/a" with
the reason when the zoo entry has no evaluation or its data is absent). Real tiles: the bundled
Sentinel-2 sample. Rows are measured in interleaved rounds so that the shared machine's noise
falls on all alike; medians and minima are both kept. ``--peers`` adds :mod:`onboard.bench.peers`
and the ratios. ``onboard bench`` runs this as its first part.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from onboard.bench.measure import (
    REPO,
    RESULTS,
    in_child,
    latency_stats,
    peak_rss_mb,
    sample_tiles,
    timed_calls,
)
from onboard.models.data import default_data_root

MODULE = "onboard.bench.engines"


def shipped_bundles() -> list[Path]:
    """Every bundle in the zoo's folders, the ones others are building now included."""
    return [Path(p) for p in sorted(glob.glob(str(REPO / "models" / "*" / "*.onboard")))]


def runnable(backend: str) -> str | None:
    """None if ``backend`` can run here, else why not."""
    modules = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
    try:
        __import__(modules[backend])
    except ImportError as error:
        return f"{modules[backend]} does not import here ({error})"
    if backend == "tensorrt":
        try:
            import pycuda.driver  # noqa: F401
        except ImportError as error:
            return f"pycuda/CUDA unavailable ({error})"
    return None


def backends_for(engines: dict[str, str], extra: bool) -> list[tuple[str, str]]:
    """(backend, how) pairs: the engines a bundle carries, and with ``extra`` the ones that can
    read its ONNX model (OpenVINO, TensorRT)."""
    out = [(b, "shipped engine") for b in engines]
    if extra and "onnxruntime" in engines:
        out += [(b, "from the ONNX model") for b in ("openvino", "tensorrt") if b not in engines]
    return out


def zoo_entry(name: str) -> Any:
    try:
        from onboard.models import zoo

        return zoo.get(name) if name in zoo.names() else None
    except ImportError:  # the flight-only install has no zoo
        return None


# -- in the fresh process -------------------------------------------------------------------------


def _evaluate(engine: Any, zoo_name: str, data: str, metric_batches: list[int] | None = None,
              eval_set: str | None = None) -> dict[str, Any]:
    """The zoo model's metric on its evaluation batches through ``engine`` (only the batches
    ``metric_batches`` when given). Batches hold the zoo model's normalised input; they are
    mapped back to DN and normalised as this bundle's manifest says, so a peer bundle with its
    own scaling sees the same pixels."""
    from onboard.runtime.inference import Predictor

    entry = zoo_entry(zoo_name)
    if entry is None or entry.validation_batches is None or entry.metric is None:
        return {"metric": "n/a", "why": f"zoo entry {zoo_name!r} exposes no evaluation"}
    if len(engine.manifest.inputs) != 1:
        return {"metric": "n/a", "why": "multi-input bundle: evaluated by its zoo module"}
    try:
        batches = entry.validation_batches(Path(data))
    except (OSError, KeyError) as error:
        return {"metric": "n/a", "why": f"evaluation data unavailable: {error}"}
    spec = engine.input_spec
    z_scale = np.asarray(entry.input_scale, np.float32)[:, None, None]
    z_offset = np.asarray(entry.input_offset, np.float32)[:, None, None]
    scale = np.asarray(spec.scale, np.float32)[:, None, None]
    offset = np.asarray(spec.offset, np.float32)[:, None, None]
    if metric_batches is not None:
        batches = [batches[i] for i in metric_batches]
    outputs, labels = [], []
    if entry.task == "superres":
        # Whole held-out scenes, larger than the bundle's tile: tiled and stitched by the
        # runtime's own super-resolver, in DN as on board.
        from onboard.runtime.frame import Frame
        from onboard.runtime.stages.superres import SuperResolver

        resolver = SuperResolver(engine)
        out_scale = np.asarray(spec.scale, np.float32)[resolver.first_band:, None, None]
        for x, y in batches:
            for scene, truth in zip(x, y, strict=True):
                dn = ((scene - z_offset) / z_scale).astype(np.float32)
                frame = Frame(pixels=dn, bands=tuple(spec.bands), gsd_m=10.0)
                outputs.append(resolver.upsample(frame).pixels[None] * out_scale)
                labels.append(truth[None])
    else:
        predictor = Predictor(engine)
        for x, y in batches:
            inputs = [((tile - z_offset) / z_scale) * scale + offset for tile in x]
            outputs.append(np.stack(predictor.run([t.astype(np.float32) for t in inputs])))
            labels.append(y)
    result: dict[str, Any] = {
        "metric": entry.metric_name, "value": float(entry.metric(outputs, labels)),
        "eval_set": eval_set or entry.extra.get("heldout", "the zoo entry's validation split")}
    # Human-labelled batches apart: a peer that labelled the rest is compared on these only.
    human = entry.extra.get("human_batches")
    if human and metric_batches is None:
        result["value_human"] = float(entry.metric([outputs[i] for i in human],
                                                   [labels[i] for i in human]))
        result["human_set"] = entry.extra.get("human_set", "the human-labelled batches")
    return result


def child_bundle(spec: dict[str, Any]) -> dict[str, Any]:
    from onboard.bench.power import EnergyMeter
    from onboard.runtime.engines import open_engine

    t0 = time.perf_counter()
    engine = open_engine(spec["bundle"], spec["backend"], threads=spec["threads"],
                         batch_size=spec["batch"], warmup=3)
    load_s = time.perf_counter() - t0
    inputs = engine.manifest.inputs
    size = inputs[0].tile_size
    batch = spec["batch"]

    def feeds(n: int) -> dict[str, np.ndarray]:
        out = {}
        for item in inputs:
            dn = sample_tiles(list(item.bands), n, item.tile_size).astype(np.float32)
            dn *= spec.get("pixel_scale", 1.0)
            out[item.name] = np.stack([item.normalise(t) for t in dn]).astype(np.float32)
        return out

    one, many = feeds(1), feeds(batch)
    budget = spec.get("budget_s")
    times = timed_calls(lambda: engine.run_named(one), spec["latency_calls"], budget)
    with EnergyMeter().measure() as energy:
        through = timed_calls(lambda: engine.run_named(many), spec["throughput_calls"], budget)
    mpx = batch * size * size / 1e6
    median = float(np.median(through))
    result: dict[str, Any] = {
        "load_s": load_s, "tile": size, "batch": batch, "latency_s": times,
        "mpx_s": mpx / median, "mpx_s_best": mpx / float(np.min(through)),
        "energy_j_per_mpx": energy.per_mpx(mpx * len(through)), "energy_source": energy.source,
    }
    scale = engine.output_spec.scale_factor
    if scale != 1:
        result["output_mpx_s"] = result["mpx_s"] * scale * scale
    if spec.get("zoo") and spec.get("evaluate", True):
        result.update(_evaluate(engine, spec["zoo"], spec["data"], spec.get("metric_batches"),
                                spec.get("eval_set")))
    engine.close()
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    if kind == "bundle":
        return child_bundle(spec)
    from onboard.bench import peers

    return peers.run_child(kind, spec)


# -- the matrix -----------------------------------------------------------------------------------


def plan_rows(bundles: list[Path], threads: list[int], extra_backends: bool, data: Path,
              quick: bool) -> list[dict[str, Any]]:
    """One row per bundle × backend × threads, each with the spec its child runs."""
    from onboard.runtime.bundle import Bundle

    rows = []
    for path in bundles:
        try:
            manifest = Bundle.open(path).manifest
        except Exception as error:  # a bundle someone is writing right now, say
            rows.append({"model": path.stem, "bundle": path.name, "backend": "-",
                         "precision": "-", "threads": "-", "skipped": f"cannot open: {error}"})
            continue
        entry = zoo_entry(manifest.name)
        for backend, how in backends_for(dict(manifest.engines), extra_backends):
            for n in threads:
                row: dict[str, Any] = {
                    "model": manifest.name, "task": manifest.task, "bundle": path.name,
                    "backend": backend, "how": how, "precision": manifest.precision,
                    "threads": n, "size_kb": round(path.stat().st_size / 1024, 1),
                    "kind": "bundle"}
                if quick:
                    row["why"] = "not evaluated in a --quick run"
                why = runnable(backend)
                if why:
                    row["skipped"] = why
                else:
                    row["spec"] = {"bundle": str(path), "backend": backend, "threads": n,
                                   "batch": 4 if quick else 8,
                                   "latency_calls": 15 if quick else 60,
                                   "throughput_calls": 4 if quick else 12,
                                   "zoo": entry.name if entry else None, "data": str(data),
                                   "budget_s": 1.5 if quick else 20.0,
                                   # The metric once per engine, and not in a quick run.
                                   "evaluate": n == threads[-1] and not quick}
                rows.append(row)
    return rows


def measure_rows(rows: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Run every row's child ``rounds`` times, interleaved, and fold the rounds together:
    latency percentiles over every call, throughput as the median and best round."""
    runs: dict[int, list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for i, row in enumerate(rows):
            if "spec" not in row:
                continue
            print(f"[bench] round {round_ + 1}/{rounds}: {row['model']} {row['backend']} "
                  f"{row['precision']} {row['threads']} threads", file=sys.stderr, flush=True)
            spec = dict(row["spec"], evaluate=row["spec"].get("evaluate", True) and round_ == 0)
            runs.setdefault(i, []).append(in_child(MODULE, {"kind": row["kind"], **spec},
                                                   threads=row["threads"]))
    out = []
    for i, row in enumerate(rows):
        evaluates = bool(row.get("spec", {}).get("evaluate"))
        row = {k: v for k, v in row.items() if k != "spec"}
        row["spec_evaluates"] = evaluates
        results = runs.get(i, [])
        good = [r for r in results if "error" not in r]
        if results and not good:
            row["error"] = results[0]["error"]
        if good:
            calls = [t for r in good for t in r.pop("latency_s", [])]
            row.update(latency_stats(calls))
            speeds = [r["mpx_s"] for r in good]
            first = good[0]
            row.update({k: v for k, v in first.items() if k not in ("mpx_s", "mpx_s_best")})
            row["mpx_s"] = float(np.median(speeds))
            row["mpx_s_best"] = max(r["mpx_s_best"] for r in good)
            row["mpx_s_rounds"] = [round(s, 2) for s in speeds]
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in good)
            row["rounds"] = len(good)
            failed = [r["error"] for r in results if "error" in r]
            if failed:
                row["round_errors"] = failed
                if row.get("spec_evaluates") and "metric" not in row:
                    # The first round is the one that evaluates: say so, never drop it.
                    row["why"] = f"the evaluating round failed: {failed[0][-300:]}"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        spec = json.loads(argv[1])
        print(json.dumps(main_child(spec.pop("kind"), spec)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path, help="default: models/*/*.onboard")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--out", type=Path, default=RESULTS / "engines")
    args = parser.parse_args(argv)
    from onboard.bench import peers, report

    rows = plan_rows(args.bundles or shipped_bundles(), args.threads, True, args.data, False)
    if args.peers:
        rows += peers.plan_rows(rows, args.threads, args.data, quick=False)
    rows = measure_rows(rows, args.rounds)
    peers.add_ratios(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    text = report.matrix_markdown(rows)
    args.out.with_suffix(".md").write_text("# Engines\n\n" + text)
    report.throughput_chart(rows, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
