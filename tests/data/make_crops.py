"""Cut the small real crops committed for tests and the bundled sample pass.

Run once from the repository root with ONBOARD_DATA pointing at the shared data:
    python tests/data/make_crops.py
Each band keeps its native resolution and georeferencing (window of the original transform);
files are rewritten tiled and zstd-compressed by onboard's own product writer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from onboard.models.data import default_data_root
from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.windows import Window

ROOT = Path(__file__).resolve().parents[2]
DATA = default_data_root()

ATTRIBUTION = """Contains modified Copernicus Sentinel data {years}, processed by ESA.
Cropped from the Onera Satellite Change Detection dataset (OSCD; Caye Daudt, Le Saux, Boulch,
Gousseau, IGARSS 2018). Change mask: CC BY-NC-SA 4.0. Crop: rows {r0}:{r1}, columns {c0}:{c1}
of the date-1 10 m grid of {city}; every band at its native resolution.
"""


def crop_city(city: str, window: Window, out: Path) -> None:
    src = DATA / "oscd" / city
    if out.exists():
        shutil.rmtree(out)
    ref = OscdScene(src / "imgs_1")
    west, north = ref.georef.transform * (window.col_off, window.row_off)
    east, south = ref.georef.transform * (window.col_off + window.width,
                                          window.row_off + window.height)
    for date in ("imgs_1", "imgs_2"):
        (out / date).mkdir(parents=True)
        for path in sorted((src / date).glob("*.tif")):
            with GeoTiffScene(path) as scene:
                inv = scene.georef.transform.inverse()
                c0, r0 = (math.floor(v + 1e-6) for v in inv * (west, north))
                c1, r1 = (math.ceil(v - 1e-6) for v in inv * (east, south))
                c0, r0 = max(c0, 0), max(r0, 0)
                c1, r1 = min(c1, scene.width), min(r1, scene.height)
                win = Window(r0, c0, r1 - r0, c1 - c0)
                band = path.stem.rsplit("_", 1)[1]
                write_geotiff(out / date / f"{city}_{band}.tif", scene.read_pixels(win), [band],
                              scene.georef.window(c0, r0), tile=64)
    shutil.copy(src / "dates.txt", out / "dates.txt")
    with GeoTiffScene(src / "cm" / f"{city}-cm.tif", bands=["change"]) as cm:
        mask = cm.read_pixels(window)
    (out / "cm").mkdir()
    write_geotiff(out / "cm" / f"{out.name}-cm.tif", mask.astype(np.uint8), ["change"],
                  ref.georef.window(window.col_off, window.row_off), tile=64)
    dates = (src / "dates.txt").read_text()
    years = "–".join(sorted({line.split(":")[1].strip()[:4] for line in dates.splitlines()}))
    (out / "ATTRIBUTION.txt").write_text(ATTRIBUTION.format(
        years=years, city=city, r0=window.row_off, r1=window.row_off + window.height,
        c0=window.col_off, c1=window.col_off + window.width))


def main() -> None:
    # The bundled sample pass: hazy Hong Kong (date 1) with urban change by date 2.
    crop_city("hongkong", Window(384, 256, 256, 256), ROOT / "runtime" / "sample" / "hongkong")
    # Small crops for fast tests; paris date 2 has small clouds.
    crop_city("paris", Window(0, 0, 96, 120), ROOT / "tests" / "data" / "oscd" / "paris")
    crop_city("hongkong", Window(600, 440, 95, 100), ROOT / "tests" / "data" / "oscd" / "hongkong")
    cloud = np.load(DATA / "cloud" / "ukis_sentinel2_6band.npz")
    np.savez_compressed(ROOT / "tests" / "data" / "ukis_6band_crop.npz",
                        img=cloud["img"][:128, :128], msk=cloud["msk"][:128, :128])


if __name__ == "__main__":
    main()
