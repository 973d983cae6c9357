"""Super-resolution over a Sentinel-2-tile-wide scene, streamed: peak RSS and throughput.

    python -m onboard.bench.superres [--width 10980] [--rows 10980] [--bundle B] [--threads 2]

Writes a ``rows`` × ``width`` × 4-band (blue, green, red, NIR) uint16 GeoTIFF made of shifted
real Sentinel-2 texture (the Malmö 10 m bands, or the bundled sample without the shared data),
then runs ``onboard predict BUNDLE scene.tif --out sr.tif`` in a fresh process, so the peak RSS
is the command's own, and reports it with the throughput in Mpx/s of input and of output. The
streaming stitcher holds about ``256 + tile × 2`` output rows, so peak memory depends on the
width, not on the number of rows: ``--rows`` shortens a run without changing what it measures
(the full 10980² takes the whole model time). Results: ``bench/results/superres.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onboard.models.data import default_data_root
from onboard.models.superres.dataset import MALMO_FILE
from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.georef import CRS, Affine, Georef

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "superres" / "superres-x2-int8-ort.onboard"
RESULTS = Path(__file__).resolve().parent / "results"
GOAL_RSS_MB = 400.0


def _texture() -> np.ndarray:
    """(4, H, W) uint16 real 10 m bands."""
    malmo = default_data_root() / MALMO_FILE
    if malmo.exists():
        return np.moveaxis(np.load(malmo)["im10"], -1, 0)
    from onboard.runtime.sources.oscd import OscdScene
    from onboard.runtime.windows import Window

    scene = OscdScene(ROOT / "runtime" / "sample" / "hongkong" / "imgs_1",
                      ("B02", "B03", "B04", "B08"))
    return scene.read(Window(0, 0, scene.height, scene.width)).pixels


def _tiles(rows: int, width: int, tile: int) -> Iterator[np.ndarray]:
    real = _texture()
    rng = np.random.default_rng(0)
    down, across = -(-rows // tile), -(-width // tile)
    shifts = rng.integers(0, min(real.shape[1:]), (down * across, 2))
    for band in range(4):
        for shift in shifts:
            yield np.roll(real[band], tuple(shift), axis=(0, 1))[:tile, :tile].astype(np.uint16)


def write_scene(path: Path, rows: int, width: int, tile: int = 256) -> float:
    start = time.perf_counter()
    georef = Georef(CRS.from_epsg(32633), Affine.from_origin(300000, 5000040, 10, 10))
    write_geotiff(path, _tiles(rows, width, tile), ["blue", "green", "red", "nir"], georef,
                  shape=(4, rows, width), dtype=np.uint16, compression="zstd", level=1,
                  tile=tile)
    return time.perf_counter() - start


CHILD = """
import json, resource, sys, time
from onboard.runtime.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"seconds": time.perf_counter() - start, "code": code,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(bundle: Path, scene: Path, out: Path, threads: int, batch: int) -> dict:
    command = [sys.executable, "-c", CHILD, "predict", str(bundle), str(scene), "--out",
               str(out), "--threads", str(threads), "--batch", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"onboard predict failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=10980)
    parser.add_argument("--rows", type=int, default=10980)
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        scene, out = Path(tmp) / "scene.tif", Path(tmp) / "sr.tif"
        print(f"writing {args.rows}×{args.width}×4 scene ...", file=sys.stderr)
        wrote = write_scene(scene, args.rows, args.width)
        print(f"  {wrote:.0f} s; running onboard predict ...", file=sys.stderr)
        result = run(args.bundle, scene, out, args.threads, args.batch)
        from onboard.runtime.sources.geotiff import GeoTiffScene

        with GeoTiffScene(out) as sr:
            result["output"] = [sr.count, sr.height, sr.width]
            result["output_pixel_m"] = abs(sr.georef.transform.a) if sr.georef else None
        pixels = args.rows * args.width
        result.update(
            bundle=args.bundle.name, scene=f"{args.rows}x{args.width}x4 uint16",
            threads=args.threads, batch=args.batch,
            input_mpx_s=round(pixels / result["seconds"] / 1e6, 3),
            output_mpx_s=round(4 * pixels / result["seconds"] / 1e6, 3),
            output_mib=round(out.stat().st_size / 2**20, 1),
            machine=f"{platform.machine()}, {os.cpu_count()} cores (shared), load "
                    f"{os.getloadavg()[0]:.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "superres.json").write_text(json.dumps(result, indent=2) + "\n")
    met = result["peak_rss_mb"] < GOAL_RSS_MB
    (RESULTS / "superres.md").write_text(
        "# ×2 super-resolution of a Sentinel-2-tile-wide scene, streamed\n\n"
        "| scene | bundle | output | peak RSS | input Mpx/s | output Mpx/s | seconds |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['scene']} | {result['bundle']} | {result['output'][0]}×"
        f"{result['output'][1]}×{result['output'][2]} at {result['output_pixel_m']} m, "
        f"{result['output_mib']} MiB | {result['peak_rss_mb']:.0f} MB | "
        f"{result['input_mpx_s']} | {result['output_mpx_s']} | {result['seconds']:.0f} |\n\n"
        f"Goal: peak RSS under {GOAL_RSS_MB:g} MB for a ×2 of a 10980² scene: "
        f"**{'met' if met else 'missed'}** (the stitcher's memory grows with the width, "
        f"which is the full 10980 here). `onboard predict` in a fresh process, "
        f"{args.threads} threads, {result['machine']}.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
