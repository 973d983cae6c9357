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
bundle, backend, threads, data, zoo_name = sys.argv[1:6]
t0 = time.perf_counter()
engine = open_engine(bundle, backend, threads=int(threads), batch_size=1, warmup=2)
load_s = time.perf_counter() - t0
predictor = Predictor(engine)
size = predictor.tile_size
rng = np.random.default_rng(0)
tile = [rng.random((len(engine.input_spec.bands), size, size), dtype=np.float32) * 0.3]
times = []
for _ in range(30):
    t = time.perf_counter()
    predictor.run(tile)
    times.append(time.perf_counter() - t)
median = float(np.median(times))
result = {"load_s": load_s, "latency_ms": median * 1e3, "mpx_s": size * size / median / 1e6,
          "tile": size}
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


def measure(bundle: Path, backend: str, threads: int, data: Path, zoo_name: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(bundle), backend, str(threads),
                          str(data), zoo_name], capture_output=True, text=True, env=env)
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


def run(bundles: list[Path], threads: int, data: Path, peers: bool) -> list[dict[str, Any]]:
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
                row.update(measure(path, backend, threads, data, zoo_name))
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
                row.update(measure(peer, "onnxruntime", threads, data, zoo_name))
                rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = ["# Engines: model × backend × precision", "",
             f"Measured in one run on this machine, {threads} threads, one 256×256 tile per "
             "call (median of 30 after warm-up); peak RSS of a fresh process that loads and "
             "runs the engine; metric on the zoo model's held-out split through that engine.",
             "", "| model | backend | precision | size KB | latency ms | Mpx/s | peak RSS MB "
             "| metric |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['size_kb']} "
                         f"| – | – | – | not run: {why} |")
            continue
        metric = f"{r['metric']} {r['value']:.4f}" if "metric" in r else "–"
        lines.append(f"| {r['model']} | {r['backend']} | {r['precision']} | {r['size_kb']} | "
                     f"{r['latency_ms']:.2f} | {r['mpx_s']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{metric} |")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Mpx/s per row as a horizontal bar chart PNG (log scale: peers are 100× slower)."""
    from onboard.runtime.png import write_png

    measured = [r for r in rows if "mpx_s" in r]
    if not measured:
        return
    height, bar, width = 24 * len(measured) + 8, 16, 600
    image = np.full((height, width, 3), 255, np.uint8)
    top = max(np.log10(r["mpx_s"] * 10 + 1) for r in measured)
    for i, r in enumerate(measured):
        length = int((width - 10) * np.log10(r["mpx_s"] * 10 + 1) / top)
        colour = (200, 80, 40) if "peer" in r["model"] else (40, 110, 200)
        image[8 + 24 * i: 8 + 24 * i + bar, 5: 5 + max(length, 2)] = colour
    write_png(path, image)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "ONBOARD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=RESULTS / "engines")
    args = parser.parse_args(argv)
    rows = run(args.bundles, args.threads, args.data, args.peers)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows, args.threads)
    args.out.with_suffix(".md").write_text(text)
    bar_chart(rows, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
