"""Peak memory at the largest scene the runtime accepts, and the refusal one step past it.

    python -m onboard.bench.limits [--size 32768] [--cache DIR]

The GeoTIFF reader accepts at most ``MAX_SCENE_PIXELS`` (2**30) pixels per band: 32 768 ×
32 768. This writes that scene once (13 bands, uint16, planar, tiled 256, zstd, shifted real
Sentinel-2 texture: about 14 GB) and measures, each in a fresh process:

- ``Pipeline.score`` (what ``onboard run`` does per acquisition: every tile through the INT8
  OpenVINO cloud stage, with the quicklook and the packed mask layers), and
- ``onboard predict`` with the same bundle to a class-mask GeoTIFF and its PNG preview,

reporting peak RSS (``ru_maxrss``), wall time and Mpx/s of input; then a header declaring one
pixel more per side (32 769²) is opened and must be refused with an error naming the file.
Results: ``bench/results/limits.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onboard.bench.measure import RESULTS
from onboard.bench.pipeline import BASE, BUNDLES, measure, scene_path
from onboard.runtime.sources.geotiff import MAX_SCENE_PIXELS

CACHE = Path(tempfile.gettempdir()) / "onboard-bench"


def predict_peak(scene: Path, out: Path) -> dict[str, Any]:
    """``onboard predict`` in a fresh process: wall time and the child's peak RSS."""
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w+") as output:
        child = subprocess.Popen([sys.executable, "-c", "import sys; from onboard.runtime.cli "
                                  "import main; sys.exit(main())", "predict",
                                  str(BUNDLES["openvino"]), str(scene), "--out", str(out),
                                  "--backend", "openvino", "--threads", "2"],
                                 stdout=output, stderr=subprocess.STDOUT)
        # This child's own peak (RUSAGE_CHILDREN would be the largest of every child so far).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        output.seek(0)
        text = output.read()
    wall = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"onboard predict failed:\n{text[-4000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "output_tail": text[-600:],
            "outputs": sorted(p.name for p in out.parent.iterdir())}


def refused_past_limit(folder: Path, side: int) -> str:
    """The error a scene one pixel larger per side gets (its header only: no pixels)."""
    import numpy as np
    import tifffile

    from onboard.runtime.errors import OnboardError
    from onboard.runtime.sources.geotiff import GeoTiffScene

    path = folder / f"declared-{side}.tif"
    # A small real file whose header is then made to declare the size.
    tifffile.imwrite(path, np.zeros((256, 256), np.uint16), tile=(256, 256),
                     compression="zstd")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages.first.tags["ImageWidth"].overwrite(side)
        tif.pages.first.tags["ImageLength"].overwrite(side)
    try:
        GeoTiffScene(path).close()
    except OnboardError as error:
        return f"{type(error).__name__}: {error}"
    raise SystemExit(f"{path}: a {side}² scene was accepted; the limit is not enforced")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=int(MAX_SCENE_PIXELS ** 0.5))
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    scene = scene_path(args.cache, args.size)
    write_s = time.perf_counter() - t0
    result: dict[str, Any] = {"started": started, "size": args.size, "bands": 13,
                              "scene_bytes": scene.stat().st_size, "write_s": write_s,
                              "load_avg_1m": os.getloadavg()[0]}
    result["score"] = measure("score", **{**BASE, "backend": "openvino", "path": str(scene)})
    with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
        result["predict"] = predict_peak(scene, Path(tmp) / "mask.tif")
        result["refused"] = refused_past_limit(Path(tmp), args.size + 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "limits.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    score, predict = result["score"], result["predict"]
    mpx = args.size * args.size / 1e6
    lines = [
        "# Peak memory at the largest accepted scene", "",
        f"`python -m onboard.bench.limits` ({started}, 2 shared cores, load average "
        f"{result['load_avg_1m']:.1f} at the start): a {args.size}² × 13-band uint16 GeoTIFF "
        f"(planar, tiled 256, zstd, {result['scene_bytes'] / 1e9:.1f} GB on disk; {mpx:.0f} Mpx "
        "per band), the most pixels per band the reader accepts.", "",
        "| what | peak RSS MB | wall s | Mpx/s of input |", "|---|---|---|---|",
        f"| `Pipeline.score`, INT8 OpenVINO cloud stage, tiles 256, halo 16 (what `onboard run` "
        f"does per acquisition) | {score['peak_rss_mb']:.0f} | {score['timings_s']['wall']:.1f} "
        f"| {score['mpx_per_s']:.1f} |",
        f"| `onboard predict` (same bundle) to a class-mask GeoTIFF and its PNG preview | "
        f"{predict['peak_rss_mb']:.0f} | {predict['wall_s']:.1f} | "
        f"{mpx / predict['wall_s']:.1f} |", "",
        f"One pixel more per side ({args.size + 1}²) is refused when the file is opened, before "
        f"any pixel is read: `{result['refused']}`", ""]
    (RESULTS / "limits.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
