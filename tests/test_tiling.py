"""Tiling and stitching: stitch(tile(x)) == x on real scenes, edges included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onboard.runtime.errors import ConfigError
from onboard.runtime.sources.base import iter_tiles
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.windows import Stitcher, TileGrid, Window, tile_array


def _roundtrip(pixels: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    grid = TileGrid(pixels.shape[1], pixels.shape[2], tile, overlap)
    stitcher = Stitcher(grid, pixels.shape[0], pixels.dtype)
    for placement, block in tile_array(pixels, grid):
        stitcher.add(placement, block)
    assert stitcher.complete
    return stitcher.out


@pytest.mark.parametrize(("tile", "overlap"), [(64, 0), (64, 16), (100, 7), (256, 32), (1000, 0)])
def test_stitch_of_tiles_is_the_scene(sample_pass, tile, overlap):
    scene = OscdScene(sample_pass / "imgs_1")
    full = scene.read(Window(0, 0, scene.height, scene.width)).pixels
    # The sample is 256×256: 100-pixel tiles leave edges that are not a multiple of the tile size.
    np.testing.assert_array_equal(_roundtrip(full, tile, overlap), full)


def test_streamed_tiles_stitch_to_the_scene(shared_data):
    # hongkong is 695 × 540: neither is a multiple of 128
    scene = OscdScene(shared_data / "oscd" / "hongkong" / "imgs_1", bands=["B02", "B8A", "B01"])
    full = scene.read(Window(0, 0, scene.height, scene.width)).pixels
    grid = TileGrid(scene.height, scene.width, 128, 24)
    stitcher = Stitcher(grid, 3, full.dtype)
    tiles = list(iter_tiles(scene, 128, 24))
    assert len(tiles) == len(grid)
    for tile in tiles:
        assert tile.frame.pixels.shape == (3, 128, 128)
        stitcher.add(tile.placement, tile.frame.pixels)
    np.testing.assert_array_equal(stitcher.out, full)


def test_tiles_are_whole_and_cover_the_grid():
    grid = TileGrid(300, 517, 128, 16)
    cover = np.zeros((300, 517), dtype=int)
    for placement in grid:
        assert (placement.window.height, placement.window.width) == (128, 128)
        cover[placement.core.slices] += 1
    assert (cover == 1).all()


def test_scaled_stitch_for_superresolution():
    grid = TileGrid(50, 70, 32, 8)
    stitcher = Stitcher(grid, 1, np.int32, scale=2)
    rows, cols = np.mgrid[0:100, 0:140]
    truth = (rows * 1000 + cols)[None]
    for placement in grid:
        stitcher.add(placement, truth[(slice(None), *placement.window.scaled(2).slices)])
    np.testing.assert_array_equal(stitcher.out, truth)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 90), width=st.integers(1, 90),
    tile=st.integers(1, 40), overlap_frac=st.floats(0, 0.9),
)
def test_roundtrip_any_geometry(height, width, tile, overlap_frac):
    overlap = min(int(tile * overlap_frac), tile - 1)
    pixels = np.arange(2 * height * width, dtype=np.int32).reshape(2, height, width)
    np.testing.assert_array_equal(_roundtrip(pixels, tile, overlap), pixels)


@pytest.mark.parametrize(("tile", "overlap"), [(0, 0), (16, 16), (16, -1)])
def test_bad_tiling_is_refused(tile, overlap):
    with pytest.raises(ConfigError):
        TileGrid(10, 10, tile, overlap)
