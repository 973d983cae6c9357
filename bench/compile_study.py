"""The compiler study: its headline numbers on a real zoo model, measured in one run.

    python -m onboard.bench.compile_study [--model cloud-4band] [--data DIR] [--out-dir DIR]

A benchmark of ``onboard compile`` (moved here from the compiler's package, which keeps only
the compiler).

Five compiles of the same model, then the flight runtime's engines on the five bundles:

* ``fp32-ort``: unpruned, ONNX Runtime fp32: the "before" bundle.
* ``int8-ov``: unpruned, OpenVINO INT8 (NNCF with accuracy control when ``--max-drop`` is set).
  Its report holds the ONNX Runtime fp32 step and the OpenVINO INT8 step of one compile.
* ``int8-ort``: unpruned, ONNX Runtime INT8 QDQ, for comparison.
* ``pruned-fp32-ort``: 50 % of the channels pruned, fine-tuned, ONNX Runtime fp32.
* ``pruned-int8-ov``: 50 % of the channels pruned, fine-tuned, OpenVINO INT8: the "after"
  bundle. Its ONNX Runtime fp32 step is the pruned model to compare with ``int8-ov``'s.

The engines are timed in alternating blocks, one engine open at a time, so that load from other
processes on the machine falls on all of them alike and no engine's idle threads slow another's.
Results go to ``compile/REPORT.md`` and ``compile/study.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onboard.compile import measure
from onboard.compile.pipeline import CompileOptions, compile_model, resolve_model
from onboard.models.data import default_data_root
from onboard.runtime.errors import AccuracyGateError

COMPILE = Path(__file__).resolve().parents[1] / "compile"  # REPORT.md sits by the compiler


def _step(report: dict[str, Any], name: str) -> dict[str, Any] | None:
    for step in report["gate"]["steps"]:
        if step["step"] == name:
            return step
    return None


def engine_latency(bundles: dict[str, Path], tile: np.ndarray, rounds: int,
                   threads: int, block: int = 20, batch: int = 1) -> dict[str, dict[str, float]]:
    """Median and minimum ms per tile of each bundle's engine, as the flight runtime opens it,
    timed in alternating blocks of ``block`` runs with one engine open at a time
    (:func:`onboard.compile.measure.latency_stats_alternating`)."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.engines import open_engine

    def opener(bundle: Bundle) -> Callable[[], Callable[[np.ndarray], Any]]:
        backend = next(iter(bundle.manifest.engines))
        return lambda: open_engine(bundle, backend, "cpu", threads=threads, warmup=0,
                                   batch_size=batch).run

    factories = {name: opener(Bundle.open(path)) for name, path in bundles.items()}
    stats = measure.latency_stats_alternating(factories, tile, repeats=rounds, block=block)
    runs = max(1, -(-rounds // block)) * block
    return {name: {"median": median / len(tile), "min": fastest / len(tile), "runs": runs}
            for name, (median, fastest) in stats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cloud-4band")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/onboard-compile-study"))
    parser.add_argument("--prune", type=float, default=0.5)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--finetune-steps", type=int, default=None)
    parser.add_argument("--finetune-lr", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", type=Path, default=COMPILE / "REPORT.md")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights to use instead of the zoo entry's (a pinned copy)")
    args = parser.parse_args(argv)

    zoo = resolve_model(args.model)
    root = args.data or default_data_root()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    common = dict(data_root=root, threads=args.threads, latency_repeats=50,
                  max_drop=args.max_drop)
    runs = {
        "fp32-ort": CompileOptions(target="onnxruntime", precision="fp32", **common),
        "int8-ov": CompileOptions(target="openvino", precision="int8", **common),
        "int8-ort": CompileOptions(target="onnxruntime", precision="int8", **common),
        "pruned-fp32-ort": CompileOptions(
            target="onnxruntime", precision="fp32", prune=args.prune,
            finetune_epochs=args.finetune_epochs, finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr, **common),
        "pruned-int8-ov": CompileOptions(
            target="openvino", precision="int8", prune=args.prune,
            finetune_epochs=args.finetune_epochs, finetune_steps=args.finetune_steps,
            finetune_lr=args.finetune_lr, **common),
    }
    started = time.time()
    reports: dict[str, dict[str, Any]] = {}
    bundles: dict[str, Path] = {}
    for name, options in runs.items():
        out = args.out_dir / f"{zoo.name}-{name}.onboard"
        print(f"[study] compiling {name}", file=sys.stderr, flush=True)
        try:
            result = compile_model(zoo, out, options, checkpoint=args.checkpoint)
            reports[name] = result.report
            bundles[name] = out
        except AccuracyGateError as error:
            # The full report (every step up to the failure) is written next to the bundle.
            reports[name] = json.loads((out.parent / f"{out.name}.report.json").read_text())
            print(f"[study] {name}: {error}", file=sys.stderr, flush=True)

    tile = np.ascontiguousarray(zoo.calibration_tiles(root, 8), np.float32)
    latency = engine_latency(bundles, tile[:1], args.rounds, args.threads) if bundles else {}
    # Throughput: 8 tiles per call, where per-call overheads no longer hide the arithmetic.
    latency8 = engine_latency(bundles, tile, max(20, args.rounds // 4), args.threads,
                              batch=len(tile)) if bundles else {}
    study = {
        "model": zoo.name, "data_root": str(root),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
                   f"{os.getloadavg()[0]:.1f} at the end",
        "seconds": round(time.time() - started), "threads": args.threads,
        "tile": list(tile.shape), "rounds": args.rounds,
        "engine_latency_ms": latency,
        "engine_latency_ms_per_tile_batch8": latency8,
        "bundle_bytes": {n: p.stat().st_size for n, p in bundles.items()},
        "reports": reports,
    }
    (args.report.parent / "study.json").write_text(json.dumps(study, indent=2, default=str))
    args.report.write_text(render(study))
    print(args.report.read_text())
    return 0


def _ort_level(report: dict[str, Any]) -> str | None:
    """The ONNX Runtime graph optimisation the compiler chose for the bundle, if any."""
    steps = report["gate"]["steps"]
    return steps[-1].get("extra", {}).get("graph_optimization") if steps else None


def render(study: dict[str, Any]) -> str:
    reports = study["reports"]
    first = next(iter(reports.values()))
    metric = first["gate"]["metric"]
    lines = [
        f"# Compile study: {study['model']}",
        "",
        f"Measured in one run of `python -m onboard.bench.compile_study` ({study['seconds']} s) on "
        f"{study['machine']}, {study['threads']} threads, one {study['tile'][1:]} tile per "
        "run. Metric: the zoo model's own "
        f"`{metric}` on its held-out validation split, measured with each step's own engine.",
        "",
        f"Weights: `{first['checkpoint']}` (SHA-256 `{first['checkpoint_sha256'][:16]}…`). "
        "The machine is shared with other jobs: medians include their load, minima are the "
        "closest to the model's own cost; both are given. Goals: INT8 OpenVINO ≥ 2× faster "
        "than fp32 ONNX Runtime with ≤ 0.01 metric drop; 50 % pruned + fine-tuned faster with "
        "≤ 0.01 drop.",
        "",
        "## Headline",
        "",
    ]
    fp32_ort = _step(reports.get("int8-ov", {"gate": {"steps": []}}), "onnx-fp32")
    int8_ov = _step(reports.get("int8-ov", {"gate": {"steps": []}}), "ir-int8-nncf")
    lat = study["engine_latency_ms"]
    if fp32_ort and int8_ov:
        lines.append(
            f"- INT8 OpenVINO vs fp32 ONNX Runtime (same compile, step runners, median of 50): "
            f"{fp32_ort['latency_ms']:.2f} → {int8_ov['latency_ms']:.2f} ms/tile, "
            f"**{fp32_ort['latency_ms'] / int8_ov['latency_ms']:.2f}× faster** (minimum "
            f"{fp32_ort['latency_min_ms']:.2f} → {int8_ov['latency_min_ms']:.2f}, "
            f"{fp32_ort['latency_min_ms'] / int8_ov['latency_min_ms']:.2f}×); {metric} "
            f"{fp32_ort['metric']:.4f} → {int8_ov['metric']:.4f} (drop from the fp32 torch "
            f"model {int8_ov['drop']:+.4f}).")
    if "fp32-ort" in lat and "int8-ov" in lat:
        a, b = lat["fp32-ort"], lat["int8-ov"]
        lines.append(
            f"- The same through the flight runtime's engines on the bundles (alternating "
            f"blocks, one engine open at a time, {a['runs']} runs each): median "
            f"{a['median']:.2f} → {b['median']:.2f} ms/tile, "
            f"**{a['median'] / b['median']:.2f}×**; minimum {a['min']:.2f} → "
            f"{b['min']:.2f} ms/tile, {a['min'] / b['min']:.2f}×.")
    int8_ort = _step(reports.get("int8-ort", {"gate": {"steps": []}}), "int8-qdq")
    if fp32_ort and int8_ort:
        lines.append(
            f"- For comparison, INT8 QDQ on ONNX Runtime (U8/S8) vs fp32 ONNX Runtime: "
            f"{fp32_ort['latency_ms']:.2f} → {int8_ort['latency_ms']:.2f} ms/tile "
            f"({fp32_ort['latency_ms'] / int8_ort['latency_ms']:.2f}×, minimum "
            f"{fp32_ort['latency_min_ms'] / int8_ort['latency_min_ms']:.2f}×); {metric} drop "
            f"{int8_ort['drop']:+.4f}.")
    levels = {name: _ort_level(report) for name, report in reports.items()}
    for batch_name, table in (("one tile", lat),
                              ("8 tiles", study.get("engine_latency_ms_per_tile_batch8") or {})):
        for before, after, what in (("fp32-ort", "pruned-fp32-ort", "fp32 ONNX Runtime"),
                                    ("int8-ov", "pruned-int8-ov", "INT8 OpenVINO")):
            if before not in table or after not in table:
                continue
            a, b = table[before], table[after]
            graph = (f" (graph optimisation `{levels[before]}` → `{levels[after]}`, as "
                     "measured fastest by the compiler)" if levels.get(before) else "")
            lines.append(
                f"- Pruned vs unpruned, both {what} bundles in the flight runtime{graph}, "
                f"{batch_name} per call: median {a['median']:.2f} → {b['median']:.2f} ms/tile "
                f"(**{a['median'] / b['median']:.2f}×**), minimum {a['min']:.2f} → "
                f"{b['min']:.2f} ({a['min'] / b['min']:.2f}×).")
    if "fp32-ort" in lat and "pruned-int8-ov" in lat:
        a, b = lat["fp32-ort"], lat["pruned-int8-ov"]
        lines.append(
            f"- Before → after (unpruned fp32 ONNX Runtime bundle → pruned INT8 OpenVINO "
            f"bundle, flight runtime): median {a['median']:.2f} → {b['median']:.2f} ms/tile "
            f"({a['median'] / b['median']:.2f}×), minimum {a['min']:.2f} → {b['min']:.2f}.")
    pruned = reports.get("pruned-int8-ov")
    if pruned:
        p_onnx = _step(pruned, "onnx-fp32")
        p_tuned = _step(pruned, "fine-tuned")
        p_base = _step(pruned, "fp32")
        if p_onnx and fp32_ort and p_tuned and p_base:
            lines.append(
                f"- {pruned['options']['prune']:.0%} channel-pruned and fine-tuned vs unpruned "
                f"(both fp32 ONNX Runtime): {fp32_ort['latency_ms']:.2f} → "
                f"{p_onnx['latency_ms']:.2f} ms/tile "
                f"({fp32_ort['latency_ms'] / p_onnx['latency_ms']:.2f}× faster; minimum "
                f"{fp32_ort['latency_min_ms']:.2f} → {p_onnx['latency_min_ms']:.2f}, "
                f"{fp32_ort['latency_min_ms'] / p_onnx['latency_min_ms']:.2f}×), MACs "
                f"{fp32_ort['macs'] / 1e6:.1f} M → {p_onnx['macs'] / 1e6:.1f} M, params "
                f"{p_base['params']} → {p_tuned['params']}; {metric} {p_base['metric']:.4f} → "
                f"{p_tuned['metric']:.4f} (drop {p_tuned['drop']:+.4f}).")
        if not pruned["gate"]["passed"]:
            lines.append(f"- The pruned compile FAILED its gate at "
                         f"{pruned['gate']['failed_step']}: {pruned.get('error')}")
    sizes = study["bundle_bytes"]
    if sizes:
        lines.append("- Bundle sizes: " + ", ".join(
            f"{n} {b / 1e6:.3f} MB" for n, b in sizes.items()) + ".")
    if lat:
        lines.append("- Engine latency (flight runtime, one tile per call, median / min): "
                     + ", ".join(f"{n} {v['median']:.2f} / {v['min']:.2f} ms"
                                 for n, v in lat.items()) + ".")
    lat8 = study.get("engine_latency_ms_per_tile_batch8") or {}
    if lat8:
        lines.append("- Engine time per tile with 8 tiles per call (median / min): "
                     + ", ".join(f"{n} {v['median']:.2f} / {v['min']:.2f} ms"
                                 for n, v in lat8.items()) + ".")
        if "fp32-ort" in lat8 and "int8-ov" in lat8:
            a, b = lat8["fp32-ort"], lat8["int8-ov"]
            lines.append(f"  INT8 OpenVINO vs fp32 ONNX Runtime at 8 tiles per call: "
                         f"**{a['median'] / b['median']:.2f}×** (median), "
                         f"{a['min'] / b['min']:.2f}× (min).")
    for name, report in reports.items():
        from onboard.compile.gate import markdown

        lines += ["", f"## {name}", "", markdown(report).split("\n", 1)[1]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
