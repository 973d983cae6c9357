"""Sources: GeoTIFF scenes in every layout, OSCD band folders and pairs, and their bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.errors import (
    BandError,
    CorruptTiffError,
    InvalidPixelsError,
    NotATiffError,
    OnboardError,
    SceneError,
)
from onboard.runtime.sources.base import iter_tiles
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdPair, OscdScene, open_scene
from onboard.runtime.windows import Window


@pytest.fixture(scope="module")
def real_pixels(test_data):
    """13 bands of a real Sentinel-2 crop on the 10 m grid (uint16 DN)."""
    scene = OscdScene(test_data / "oscd" / "paris" / "imgs_2")
    frame = scene.read(Window(0, 0, scene.height, scene.width))
    return frame


LAYOUTS = {
    "tiled-zstd-planar": dict(tile=(32, 32), compression="zstd", planarconfig="separate"),
    "tiled-deflate-contig": dict(tile=(16, 48), compression="deflate", predictor=2,
                                 planarconfig="contig"),
    "striped-raw-contig": dict(rowsperstrip=7, planarconfig="contig"),
    "striped-lzw-planar": dict(rowsperstrip=10, compression="lzw", planarconfig="separate"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_windows_read_only_what_they_cover_and_match_the_image(tmp_path, real_pixels, layout):
    pixels = real_pixels.pixels
    path = tmp_path / f"{layout}.tif"
    data = pixels if LAYOUTS[layout]["planarconfig"] == "separate" else np.moveaxis(pixels, 0, -1)
    tifffile.imwrite(path, data, photometric="minisblack", **LAYOUTS[layout],
                     extratags=real_pixels.georef.to_tags())
    with GeoTiffScene(path) as scene:
        assert (scene.count, scene.height, scene.width) == pixels.shape
        for window in [Window(0, 0, 96, 120), Window(5, 17, 40, 33), Window(95, 119, 1, 1)]:
            np.testing.assert_array_equal(scene.read(window).pixels, pixels[:, window.row_off:
                                          window.row_off + window.height, window.col_off:
                                          window.col_off + window.width])
        assert scene.georef == real_pixels.georef


def test_product_roundtrip_keeps_pixels_georef_and_band_names(tmp_path, real_pixels):
    for compression in ("zstd", "deflate"):
        out = write_geotiff(tmp_path / f"p-{compression}.tif", real_pixels.pixels,
                            real_pixels.bands, real_pixels.georef, compression=compression, tile=64)
        with GeoTiffScene(out) as scene:
            assert scene.bands == real_pixels.bands
            assert scene.georef == real_pixels.georef
            assert scene.tile_shape == (64, 64)
            assert scene.compression.lower() in {"zstd", "adobe_deflate", "deflate"}
            np.testing.assert_array_equal(scene.read(Window(0, 0, 96, 120)).pixels,
                                          real_pixels.pixels)


def test_products_are_readable_by_gdal(tmp_path, real_pixels):
    rasterio = pytest.importorskip("rasterio", reason="rasterio (GDAL) is in the [dev] extra")
    out = write_geotiff(tmp_path / "gdal.tif", real_pixels.pixels, real_pixels.bands,
                        real_pixels.georef)
    with rasterio.open(out) as ds:
        assert ds.count == 13 and (ds.height, ds.width) == (96, 120)
        assert ds.crs.to_epsg() == 4326
        t = real_pixels.georef.transform
        assert ds.transform.almost_equals(rasterio.Affine(t.a, t.b, t.c, t.d, t.e, t.f))
        assert ds.descriptions[0] == "B01"
        np.testing.assert_array_equal(ds.read(), real_pixels.pixels)


def test_oscd_bands_are_resampled_onto_the_10m_grid(shared_data):
    city = shared_data / "oscd" / "hongkong" / "imgs_1"
    scene = OscdScene(city, bands=["B02", "B8A", "B01"])
    assert (scene.height, scene.width) == (695, 540)
    frame = scene.read(Window(0, 0, 695, 540))
    native_b8a = tifffile.imread(next(city.glob("*_B8A.tif")))
    native_b01 = tifffile.imread(next(city.glob("*_B01.tif")))
    # Each 10 m pixel takes the 20 m (60 m) pixel whose footprint holds its centre.
    assert frame.pixels[1, 0, 0] == native_b8a[0, 0]
    assert frame.pixels[1, 694, 539] == native_b8a[-1, -1]
    assert frame.pixels[2, 300, 200] == native_b01[300 * 116 // 695, 200 * 90 // 540]
    np.testing.assert_array_equal(np.unique(frame.pixels[1]), np.unique(native_b8a))
    assert frame.valid.all()


def test_oscd_pair_puts_date2_on_date1_grid(shared_data):
    pair = OscdPair(shared_data / "oscd" / "hongkong", bands=["B02", "B03", "B04", "B08"])
    before, after = pair.read(Window(0, 0, pair.height, pair.width))
    # date 2 is 693 × 538 on disk; here it is on date 1's 695 × 540 grid
    assert before.pixels.shape == after.pixels.shape == (4, 695, 540)
    assert before.georef == after.georef
    assert after.acquired.year == 2018 and before.acquired.year == 2016
    mask = pair.change_mask()
    assert mask.shape == (695, 540) and 0.01 < mask.mean() < 0.2


def test_committed_crop_matches_the_original(shared_data, test_data):
    crop = OscdScene(test_data / "oscd" / "hongkong" / "imgs_1", bands=["B04", "B11"])
    full = OscdScene(shared_data / "oscd" / "hongkong" / "imgs_1", bands=["B04", "B11"])
    a = crop.read(Window(0, 0, crop.height, crop.width)).pixels
    b = full.read(Window(600, 440, 95, 100)).pixels
    np.testing.assert_array_equal(a[0], b[0])  # 10 m band: identical
    assert np.mean(a[1] == b[1]) > 0.95  # 20 m band: same pixels up to grid rounding at the edge


def test_open_scene_and_band_selection(test_data):
    scene = open_scene(test_data / "oscd" / "paris" / "imgs_1", bands=["B02", "B03", "B04", "B08"])
    frame = scene.read(Window(0, 0, 32, 32))
    assert frame.common_names == ("blue", "green", "red", "nir")
    assert frame.select(["nir", "red"]).bands == ("B08", "B04")
    with pytest.raises(BandError, match="swir16"):
        frame.select(["swir16"])


# --- bad input -----------------------------------------------------------------------------


@pytest.fixture
def good_tif(tmp_path, real_pixels):
    return write_geotiff(tmp_path / "good.tif", real_pixels.pixels, real_pixels.bands,
                         real_pixels.georef, tile=32)


def test_truncated_tiff_is_refused_naming_the_file(tmp_path, good_tif):
    data = good_tif.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptTiffError, match="cut.tif.*truncated"):
        GeoTiffScene(cut)


def test_corrupt_segment_is_reported_and_the_stream_goes_on(tmp_path, good_tif):
    with tifffile.TiffFile(good_tif) as tif:
        offset = tif.pages.first.dataoffsets[5]
    data = bytearray(good_tif.read_bytes())
    data[offset: offset + 40] = b"\xff" * 40
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    errors: list[SceneError] = []
    with GeoTiffScene(bad) as scene:
        tiles = list(iter_tiles(scene, 32, 0, errors=errors))
    assert len(errors) == 1 and isinstance(errors[0], CorruptTiffError)
    assert "bad.tif" in str(errors[0]) and "segment 5" in str(errors[0])
    assert len(tiles) == 11  # the 3 × 4 tiles less the one that could not be decoded


@pytest.mark.parametrize("content", [b"", b"GIF89a....", b"\x89PNG\r\n\x1a\n" + bytes(100)])
def test_non_tiff_is_refused(tmp_path, content):
    path = tmp_path / "scene.tif"
    path.write_bytes(content)
    with pytest.raises(NotATiffError, match="scene.tif.*not a TIFF"):
        GeoTiffScene(path)


def test_garbage_after_tiff_magic_is_refused(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(CorruptTiffError, match="garbage.tif"):
        GeoTiffScene(path)


def test_missing_band_file(tmp_path, test_data):
    import shutil

    folder = tmp_path / "imgs_1"
    shutil.copytree(test_data / "oscd" / "paris" / "imgs_1", folder)
    next(folder.glob("*_B8A.tif")).unlink()
    with pytest.raises(BandError, match=r"imgs_1.*missing band file.*B8A"):
        OscdScene(folder)


def test_mismatched_band_count(good_tif):
    with pytest.raises(BandError, match="good.tif.*4 band names given for 13 bands"):
        GeoTiffScene(good_tif, bands=["blue", "green", "red", "nir"])


def test_nan_and_saturated_pixels_are_flagged(tmp_path, real_pixels):
    pixels = real_pixels.pixels.astype(np.float32) / 10000
    pixels[:, :10, :] = np.nan
    path = write_geotiff(tmp_path / "nan.tif", pixels, real_pixels.bands, real_pixels.georef)
    with GeoTiffScene(path) as scene:
        frame = scene.read(Window(0, 0, 96, 120))
        assert frame.invalid_fraction() == pytest.approx(10 / 96)
        frame.require_valid(0.2)
        with pytest.raises(InvalidPixelsError, match="nan.tif.*10.4% of pixels"):
            frame.require_valid(0.05)
    saturated = real_pixels.pixels.copy()
    saturated[3, 50:, :] = 65535
    path = write_geotiff(tmp_path / "sat.tif", saturated, real_pixels.bands, real_pixels.georef)
    with GeoTiffScene(path) as scene:
        frame = scene.read(Window(0, 0, 96, 120))
        assert not frame.valid[50:].any() and frame.valid[:50].all()


def test_every_error_is_an_onboard_error_and_a_builtin(tmp_path, real_pixels):
    # Real failures, caught as a caller knowing only onboard's errors or only the builtins
    # would catch them, each naming the file.
    from onboard.runtime.sources.spool import Spool

    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    for kind in (OnboardError, ValueError, CorruptTiffError):
        with pytest.raises(kind, match="garbage.tif"):
            GeoTiffScene(garbage)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for kind in (OnboardError, OSError):
        with pytest.raises(kind, match="a-file"):
            write_geotiff(blocker / "out.tif", real_pixels.pixels, real_pixels.bands,
                          real_pixels.georef)
        with pytest.raises(kind, match="no-such-spool"):
            Spool(tmp_path / "no-such-spool")
    assert not (blocker / "out.tif").exists() and blocker.read_text() == "not a folder"
