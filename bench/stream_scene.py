"""Stream a Sentinel-2-tile-sized scene tile by tile: peak memory and read throughput.

    python -m onboard.bench.stream_scene [--size 10980] [--bands 13] [--tile 256] [--keep PATH]

Writes a 10980 × 10980 × 13-band uint16 GeoTIFF (tiled 256 × 256, zstd), generated from the
bundled real sample so that it compresses like imagery, then streams it in a fresh process (so
the peak RSS is the reader's own) and reports peak RSS in MB and throughput in Mpx/s. The scene
is generated, never committed.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.georef import CRS, Affine, Georef
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong" / "imgs_1"
RESULTS = Path(__file__).resolve().parent / "results"


def _tiles(size: int, bands: int, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a synthetic scene made of shifted real Sentinel-2 texture, band by band."""
    scene = OscdScene(SAMPLE)
    real = scene.read(Window(0, 0, scene.height, scene.width)).pixels  # (13, 256, 256)
    rng = np.random.default_rng(0)
    across = -(-size // tile)
    for band in range(bands):
        source = real[band % real.shape[0]]
        for _ in range(across * across):
            shift = rng.integers(0, 256, 2)
            block = np.roll(source, tuple(shift), axis=(0, 1))[:tile, :tile]
            if block.shape != (tile, tile):
                block = np.resize(block, (tile, tile))
            yield (block + rng.integers(0, 4, block.shape)).astype(np.uint16)


def write_scene(path: Path, size: int, bands: int, tile: int) -> float:
    start = time.perf_counter()
    georef = Georef(CRS.from_epsg(32633), Affine.from_origin(300000, 5000040, 10, 10))
    write_geotiff(path, _tiles(size, bands, tile), [f"B{i:02d}" for i in range(1, bands + 1)],
                  georef, shape=(bands, size, size), dtype=np.uint16, compression="zstd",
                  level=3, tile=tile)
    return time.perf_counter() - start


STREAM = """
import json, resource, sys, time
from onboard.runtime.sources.base import iter_tiles
from onboard.runtime.sources.geotiff import GeoTiffScene
path, tile = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
checksum, tiles = 0, 0
with GeoTiffScene(path) as scene:
    for t in iter_tiles(scene, tile, 0):
        checksum += int(t.frame.pixels[:, 0, 0].sum())
        tiles += 1
    pixels = scene.height * scene.width
    values = pixels * scene.count
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "tiles": tiles, "pixels": pixels, "values": values,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "checksum": checksum}))
"""


def stream(path: Path, tile: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STREAM, str(path), str(tile)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10980)
    parser.add_argument("--bands", type=int, default=13)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--keep", type=Path, help="write the scene here and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "s2_tile.tif"
        if not path.exists():
            print(f"writing {args.size}×{args.size}×{args.bands} scene to {path} ...",
                  file=sys.stderr)
            wrote = write_scene(path, args.size, args.bands, args.tile)
            print(f"  written in {wrote:.0f} s, {path.stat().st_size / 2**20:.0f} MiB",
                  file=sys.stderr)
        print("streaming ...", file=sys.stderr)
        result = stream(path, args.tile)
        result.update(
            scene=f"{args.size}x{args.size}x{args.bands} uint16, tiles {args.tile}, zstd",
            file_mib=round(path.stat().st_size / 2**20, 1),
            mpx_per_s=round(result["pixels"] / result["seconds"] / 1e6, 2),
            raw_mb_per_s=round(result["values"] * 2 / result["seconds"] / 1e6, 1),
            machine=f"{platform.machine()}, {resource.getpagesize()} B pages, "
                    f"{__import__('os').cpu_count()} cores",
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stream_scene.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "stream_scene.md").write_text(
        "# Streaming a Sentinel-2-tile-sized scene\n\n"
        "| scene | file | tiles | peak RSS | throughput | raw read |\n|---|---|---|---|---|---|\n"
        f"| {result['scene']} | {result['file_mib']} MiB | {result['tiles']} | "
        f"{result['peak_rss_mb']:.0f} MB | {result['mpx_per_s']} Mpx/s | "
        f"{result['raw_mb_per_s']} MB/s |\n\n"
        f"Goal: peak RSS under 400 MB. Measured with `python -m onboard.bench.stream_scene` on "
        f"{result['machine']}; one process, one thread.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
