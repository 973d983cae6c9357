"""Model × engine × precision: latency, throughput, memory, size and accuracy, peers beside.

    python -m onboard.bench.engines BUNDLE [BUNDLE ...] [--threads 2] [--peers] [--data DIR]

Every bundle is run on every backend it carries that can run here (TensorRT is skipped, with the
reason, where it does not import), each in a fresh process so its peak RSS is its own. Accuracy
is the zoo model's own metric on its held-out split, through the same engine. With ``--peers``
the ukis-csmask U-Net (4-band L1C, fp32, ONNX Runtime) is measured in the same run on the same
pixels. Results: ``bench/results/engines.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.bundle import Bundle

RESULTS = Path(__file__).resolve().parent / "results"

MEASURE = r"""
import json, os, resource, sys, time
import numpy as np
from onboard.runtime.engines import open_engine
from onboard.runtime.inference import Predictor
bundle, backend, threads, data, zoo_name, per_call, repeats = sys.argv[1:8]
per_call, repeats = int(per_call), int(repeats)
t0 = time.perf_counter()
engine = open_engine(bundle, backend, threads=int(threads), batch_size=per_call, warmup=5)
load_s = time.perf_counter() - t0
predictor = Predictor(engine)
size = predictor.tile_size
rng = np.random.default_rng(0)
tiles = [rng.random((len(engine.input_spec.bands), size, size), dtype=np.float32) * 0.3
         for _ in range(per_call)]
times = []
for _ in range(repeats):
    t = time.perf_counter()
    predictor.run(tiles)
    times.append(time.perf_counter() - t)
median, best = float(np.median(times)), float(np.min(times))
result = {"load_s": load_s, "latency_ms": median * 1e3, "min_ms": best * 1e3,
          "mpx_s": per_call * size * size / median / 1e6, "tile": size, "per_call": per_call}
if zoo_name != "-":
    from onboard.models import zoo
    entry = zoo.get(zoo_name)
    outputs, labels = [], []
    for x, y in entry.validation_batches(data):
        outs = predictor.run(list(x))
        outputs.append(np.stack(outs))
        labels.append(y)
    result["metric"] = entry.metric_name
    result["value"] = float(entry.metric(outputs, labels))
result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def runnable(backend: str) -> str | None:
    """None if ``backend`` can run here, else why not."""
    modules = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}
    try:
        __import__(modules[backend])
    except ImportError as error:
        return f"{modules[backend]} does not import here ({error})"
    if backend == "tensorrt":
        try:
            import pycuda.driver as cuda  # noqa: F401
        except ImportError as error:
            return f"pycuda/CUDA unavailable ({error})"
    return None


def measure(bundle: Path, backend: str, threads: int, data: Path, zoo_name: str,
            per_call: int = 4, repeats: int = 100) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(bundle), backend, str(threads),
                          str(data), zoo_name, str(per_call), str(repeats)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _zoo_name(bundle: Bundle) -> str:
    try:
        from onboard.models import zoo

        return bundle.manifest.name if bundle.manifest.name in zoo.names() else "-"
    except ImportError:
        return "-"


def peer_bundle(folder: Path, zoo_name: str) -> Path | None:
    """ukis-csmask's 4-band L1C U-Net as a bundle taking the zoo model's inputs (reflectance)."""
    try:
        from onboard.models.peers import ukis_csmask_bundle
    except ImportError:
        return None
    return ukis_csmask_bundle(folder / "ukis-csmask-4b.onboard", bands=4,
                              dn_per_input_unit=1.0, name=f"ukis-csmask-4b (peer of {zoo_name})")


def run(bundles: list[Path], threads: int, data: Path, peers: bool, per_call: int = 4,
        repeats: int = 100) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    zoo_names = []
    for path in bundles:
        bundle = Bundle.open(path)
        zoo_name = _zoo_name(bundle)
        zoo_names.append(zoo_name)
        for backend in bundle.manifest.engines:
            row = {"model": bundle.manifest.name, "bundle": path.name, "backend": backend,
                   "precision": bundle.manifest.precision,
                   "size_kb": round(path.stat().st_size / 1024, 1)}
            why_not = runnable(backend)
            if why_not:
                row["skipped"] = why_not
            else:
                print(f"measuring {path.name} on {backend} ...", file=sys.stderr)
                row.update(measure(path, backend, threads, data, zoo_name, per_call, repeats))
            rows.append(row)
    if peers and any(n != "-" for n in zoo_names):
        with tempfile.TemporaryDirectory() as tmp:
            zoo_name = next(n for n in zoo_names if n.startswith("cloud-4band")) \
                if "cloud-4band" in zoo_names else None
            peer = peer_bundle(Path(tmp), zoo_name) if zoo_name else None
            if peer is not None:
                print("measuring the ukis-csmask peer ...", file=sys.stderr)
                row = {"model": "ukis-csmask-4b (peer)", "bundle": "(pip package)",
                       "backend": "onnxruntime", "precision": "fp32",
                       "size_kb": round(peer.stat().st_size / 1024, 1)}
                row.update(measure(peer, "onnxruntime", threads, data, zoo_name, per_call,
                                   max(repeats // 10, 5)))
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], threads: int, per_call: int) -> str:
    lines = ["# Engines: model × backend × precision", "",
             f"Measured in one run on this machine, {threads} threads, {per_call} 256×256 tiles "
             "per call (latency: median and minimum per call after warm-up; Mpx/s from the "
             "median); peak RSS of a fresh process that loads and runs the engine; metric on "
             "the zoo model's held-out split through that engine.",
             "", "| model | backend | precision | size KB | latency ms (min) | Mpx/s | "
             "peak RSS MB | metric |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['size_kb']} "
                         f"| – | – | – | not run: {why} |")
            continue
        metric = f"{r['metric']} {r['value']:.4f}" if "metric" in r else "–"
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['size_kb']} | "
                     f"{r['latency_ms']:.2f} ({r['min_ms']:.2f}) | {r['mpx_s']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {metric} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path) -> bool:
    """Mpx/s of each measured row as a labelled horizontal bar chart (log scale: the peer is
    100× slower). Needs Pillow (the [dev] extra); returns whether the PNG was written."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        print("Pillow not installed: no PNG chart", file=sys.stderr)
        return False
    measured = [r for r in rows if "mpx_s" in r]
    if not measured:
        return False
    label_w, bar_w, row_h = 330, 420, 22
    image = Image.new("RGB", (label_w + bar_w + 80, row_h * len(measured) + 30), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 6), "throughput, Mpx/s (log scale), 256x256 tiles", fill="black")
    top = np.log10(max(r["mpx_s"] for r in measured) * 10)
    for i, r in enumerate(measured):
        y = 26 + row_h * i
        label = f"{r['model']} {r['backend']} {r['precision']}"
        draw.text((6, y + 4), label, fill="black")
        length = max(int(bar_w * np.log10(max(r["mpx_s"], 0.011) * 10) / top), 2)
        colour = (200, 80, 40) if "peer" in r["model"] else (40, 110, 200)
        draw.rectangle([label_w, y + 3, label_w + length, y + row_h - 3], fill=colour)
        draw.text((label_w + length + 6, y + 4), f"{r['mpx_s']:.2f}", fill="black")
    image.save(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--tiles-per-call", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ONBOARD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=RESULTS / "engines")
    args = parser.parse_args(argv)
    rows = run(args.bundles, args.threads, args.data, args.peers, args.tiles_per_call,
               args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, args.threads, args.tiles_per_call)
    args.out.with_suffix(".md").write_text(text)
    bar_chart(rows, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
