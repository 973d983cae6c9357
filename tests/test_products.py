"""Products of real tiles: GDAL reads them with their georeferencing and band names, the LERC
bound holds, sizes are the real compressed sizes, and a failed write leaves nothing behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import rasterio
import tifffile

from onboard.runtime.config import config_from_dict
from onboard.runtime.downlink.products import (
    ProductConfig,
    ProductMaker,
    crop,
    make_full,
    make_mask,
    make_near_lossless,
    make_thumbnail,
    product_id,
    write_geotiff,
)
from onboard.runtime.errors import ConfigError, ProductWriteError
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.windows import Window

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "runtime" / "sample" / "hongkong" / "imgs_1"
PARIS = ROOT / "tests" / "data" / "oscd" / "paris" / "imgs_2"


@pytest.fixture(scope="module")
def scene_frame():
    return open_scene(SAMPLE).read(Window(0, 0, 256, 256))


def _open(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NotGeoreferencedWarning would mean lost georeferencing
        memfile = rasterio.MemoryFile(data)
        return memfile, memfile.open()


def test_full_is_lossless_and_gdal_reads_georef_and_band_names(scene_frame, tmp_path):
    tile = crop(scene_frame, Window(64, 128, 128, 96))
    product = make_full(tile)
    assert product.media_type == "image/tiff; application=geotiff" and product.suffix == ".tif"
    memfile, ds = _open(product.data)
    with memfile, ds:
        assert ds.count == 13 and (ds.height, ds.width) == (128, 96)
        assert ds.descriptions == tile.bands
        assert ds.crs.to_epsg() == 4326
        t = tile.georef.transform
        assert tuple(ds.transform)[:6] == pytest.approx((t.a, t.b, t.c, t.d, t.e, t.f))
        assert ds.compression.name.lower() == "zstd"
        assert ds.profile["tiled"]
        assert ds.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "2"
        assert np.array_equal(ds.read(), tile.pixels)
    # The bytes written are the bytes measured.
    path = product.write(tmp_path / f"{product_id('hk/64_128', 'full')}{product.suffix}")
    assert path.name == "hk_64_128-full.tif"
    assert path.stat().st_size == product.size == len(product.data)
    assert path.read_bytes() == product.data


@pytest.mark.parametrize("bound", [0.0, 2.0, 7.0])
def test_near_lossless_stays_within_its_stated_error(scene_frame, bound):
    tile = crop(scene_frame, Window(0, 0, 128, 128))
    product = make_near_lossless(tile, ProductConfig(max_error_dn=bound))
    decoded = tifffile.imread(io.BytesIO(product.data))
    error = np.abs(decoded.astype(np.int64) - tile.pixels.astype(np.int64))
    assert error.max() <= bound
    if bound >= 2:
        assert error.max() > 0  # it really is lossy, not a lossless file under another name
    memfile, ds = _open(product.data)
    with memfile, ds:  # GDAL decodes LERC to the same values
        assert ds.descriptions == tile.bands and ds.crs.to_epsg() == 4326
        assert np.array_equal(ds.read(), decoded)
    assert product.metadata["max_error_dn"] == bound


def test_near_lossless_saves_bytes_on_native_10m_bands(scene_frame):
    # Resampled 20 m and 60 m bands repeat pixels, which zstd exploits better than LERC; on the
    # native 10 m bands LERC at 2 DN is clearly smaller.
    tile = crop(scene_frame, Window(0, 0, 256, 256)).select(["blue", "green", "red", "nir"])
    full, near = make_full(tile), make_near_lossless(tile)
    assert near.size < 0.85 * full.size


def test_mask_layers_are_named_bands(scene_frame):
    cloud = (scene_frame.pixels[1] > 1400).astype(np.uint8)
    change = np.zeros(scene_frame.shape, np.uint8)
    product = make_mask({"cloud": cloud, "change": change}, scene_frame.georef)
    memfile, ds = _open(product.data)
    with memfile, ds:
        assert ds.descriptions == ("cloud", "change") and ds.dtypes == ("uint8", "uint8")
        assert np.array_equal(ds.read(1), cloud) and ds.crs.to_epsg() == 4326
    assert product.size < cloud.size / 10  # small: class masks are long runs
    with pytest.raises(ValueError, match="uint8"):
        make_mask({"cloud": cloud.astype(np.int16)}, scene_frame.georef)


def test_thumbnail_is_a_downsampled_stretched_png(scene_frame):
    product = make_thumbnail(scene_frame, ProductConfig(thumbnail_scale=4))
    image = imagecodecs.png_decode(product.data)
    assert image.shape == (64, 64, 3) and product.media_type == "image/png"
    assert image.min() == 0 and image.max() == 255  # stretched 2-98 %
    # Red is red: the thumbnail's red channel follows B04, not B02.
    red = scene_frame.select(["red"]).pixels[0].reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.corrcoef(red.ravel(), image[..., 0].ravel().astype(float))[0, 1] > 0.95


def test_estimates_learn_from_what_was_made():
    scene = open_scene(SAMPLE)
    maker = ProductMaker()
    first_errors, later_errors = [], []
    for i, (r, c) in enumerate([(r, c) for r in range(0, 256, 64) for c in range(0, 256, 64)]):
        frame = scene.read(Window(r, c, 64, 64))
        for kind in ("full", "near_lossless", "thumbnail"):
            estimate = maker.estimate_bytes(kind, frame)
            real = maker.make(kind, frame).size
            (first_errors if i == 0 else later_errors).append(abs(estimate / real - 1))
    assert max(first_errors) < 0.5  # the first guess, before anything was made
    assert np.mean(later_errors) < 0.15 and max(later_errors) < 0.5
    # Another city (Paris, 120 × 96) with what Hong Kong taught.
    paris = open_scene(PARIS).read(Window(0, 0, 96, 120))
    estimate = maker.estimate_bytes("full", paris)
    assert abs(estimate / make_full(paris).size - 1) < 0.5


def test_config_section_and_its_checks():
    config = config_from_dict({"products": {"kinds": ["thumbnail", "full"], "max_error_dn": 4,
                                            "compression_level": 9}}).section("products")
    assert config == ProductConfig(kinds=("thumbnail", "full"), max_error_dn=4.0,
                                   compression_level=9)
    with pytest.raises(ConfigError, match="kinds"):
        ProductConfig(kinds=("full", "jpeg"))
    with pytest.raises(ConfigError, match="max_error_dn"):
        ProductConfig(max_error_dn=-1)
    with pytest.raises(ConfigError, match="not configured"):
        ProductMaker(ProductConfig(kinds=("full",))).make("thumbnail", None)  # type: ignore


def test_a_path_under_a_regular_file_names_the_file_and_leaves_nothing(scene_frame, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"x")
    product = make_full(crop(scene_frame, Window(0, 0, 32, 32)))
    target = blocker / "tile.tif"
    with pytest.raises(ProductWriteError, match="not-a-folder/tile.tif") as caught:
        product.write(target)
    assert caught.value.path == str(target)
    with pytest.raises(ProductWriteError, match="not-a-folder/b.tif"):
        write_geotiff(blocker / "b.tif", scene_frame.pixels[:2], ["a", "b"], None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


WRITE_UNDER_A_SIZE_LIMIT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from onboard.runtime.errors import ProductWriteError
    from onboard.runtime.downlink.products import ProductMaker, write_geotiff
    from onboard.runtime.png import write_png
    from onboard.runtime.sources.oscd import open_scene
    from onboard.runtime.windows import Window
    frame = open_scene(sys.argv[2]).read(Window(0, 0, 128, 128))
    maker = ProductMaker()
    products = {k: maker.make(k, frame) for k in ("full", "near_lossless", "thumbnail")}
    # A file-size limit makes the kernel refuse writes past it, as a full disk does.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000, 2_000))
    folder = sys.argv[1]
    attempts = [lambda: write_geotiff(folder + "/product.tif", frame.pixels, frame.bands, None)]
    attempts += [lambda p=p: p.write(folder + "/" + p.kind + p.suffix) for p in products.values()]
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    attempts.append(lambda: write_png(folder + "/quick.png", noise))
    for attempt in attempts:
        try:
            attempt()
        except ProductWriteError as error:
            print("ERROR", error)
        else:
            print("WROTE")
""")


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_product(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    previous = {"product.tif": b"previous product", "full.tif": b"old full",
                "quick.png": b"old png"}
    for name, data in previous.items():
        (folder / name).write_bytes(data)
    script = tmp_path / "write.py"
    script.write_text(WRITE_UNDER_A_SIZE_LIMIT)
    result = subprocess.run([sys.executable, str(script), str(folder), str(SAMPLE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all(line.startswith("ERROR") for line in lines), lines
    assert "product.tif: cannot write product" in lines[0]
    assert "near_lossless.tif: cannot write product" in lines[2]
    assert "quick.png: cannot write PNG" in lines[4]
    for name, data in previous.items():  # the old files are untouched ...
        assert (folder / name).read_bytes() == data
    # ... and nothing new, partial or empty was left.
    assert sorted(os.listdir(folder)) == sorted(previous)
