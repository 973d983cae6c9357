"""``onboard predict CHANGE_BUNDLE --reference DATE1 INPUT``: the score raster on the input's
own cell grid, for GeoTIFFs as for band folders, NaN where DATE1 has no cell to compare with,
on shifted input grids, where two cells share a place, and the options it refuses.

Everything runs the shipped 13-band change bundle on the committed paris crop and the bundled
Hong Kong sample, written out as real multi-band GeoTIFFs where a test needs one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from onboard.runtime.cli import main
from onboard.runtime.downlink.products import write_geotiff
from onboard.runtime.engines import open_engine
from onboard.runtime.georef import CRS, Affine, Georef, read_georef
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.stages.change import change_raster
from onboard.runtime.store.reference import ReferenceStore
from onboard.runtime.windows import Window

REPO = Path(__file__).resolve().parents[1]
CHANGE = REPO / "models" / "change" / "change-13band-int8-ort.onboard"
UTM = CRS.from_epsg(32650)


def _dates(city: Path) -> tuple[np.ndarray, np.ndarray, list[str], Georef]:
    """Both dates of an OSCD city folder as (13, h, w) pixels on date 1's grid."""
    before = OscdScene(city / "imgs_1")
    after = OscdScene(city / "imgs_2", grid=before.grid)
    window = Window(0, 0, before.height, before.width)
    d1, d2 = before.read(window), after.read(window)
    return d1.pixels, d2.pixels, list(d1.bands), before.georef


def _tif(path: Path, pixels: np.ndarray, bands: list[str], georef: Georef) -> Path:
    return write_geotiff(path, pixels, bands, georef, source_id=path.stem)


def _predict(reference: Path, scene: Path, out: Path, *options: str) -> int:
    return main(["predict", str(CHANGE), "--reference", str(reference), str(scene), "--out",
                 str(out), "--threads", "1", "--no-png", *options])


def _read(path: Path) -> tuple[np.ndarray, Georef, dict]:
    with tifffile.TiffFile(path) as tif:
        scores = tif.asarray()
        page = tif.pages[0]
        georef = read_georef({t.code: t.value for t in page.tags.values()})
        meta = json.loads(page.description)["onboard"]
    return scores, georef, meta


@pytest.fixture(scope="module")
def engine():
    opened = open_engine(CHANGE, threads=1, batch_size=4)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def sample(sample_pass) -> tuple[np.ndarray, np.ndarray, list[str], Georef]:
    return _dates(sample_pass)


def test_geotiff_input_scores_as_the_band_folders_do(test_data, tmp_path, capsys):
    """The paris crop as two 13-band GeoTIFFs (date 1 the reference, date 2 the input): the
    same scores as the OSCD band folders, one per whole cell on the input's own grid, and a
    nodata description that says what NaN means here (no cloud masking in predict)."""
    paris = test_data / "oscd" / "paris"
    d1, d2, bands, georef = _dates(paris)
    first = _tif(tmp_path / "paris-1.tif", d1, bands, georef)
    second = _tif(tmp_path / "paris-2.tif", d2, bands, georef)
    assert _predict(first, second, tmp_path / "tif.tif") == 0
    assert "cells_scored: 9" in capsys.readouterr().out
    assert _predict(paris / "imgs_1", paris / "imgs_2", tmp_path / "folders.tif") == 0
    scores, grid, meta = _read(tmp_path / "tif.tif")
    folders, _, _ = _read(tmp_path / "folders.tif")
    assert scores.dtype == np.float32 and scores.shape == (96 // 32, 120 // 32)
    assert np.isfinite(scores).all() and 0 <= scores.min() <= scores.max() <= 1
    np.testing.assert_allclose(scores, folders, atol=1e-6)
    assert str(grid.crs) == str(georef.crs)
    assert grid.transform == georef.transform.scaled(1 / 32)
    assert "no cloud masking" in meta["nodata"] and "cloudy" not in meta["nodata"]


def test_nan_where_the_reference_does_not_cover_the_input(sample, tmp_path, capsys):
    """DATE1 is the east half of the sample (its own GeoTIFF, georeferenced there): the
    input's western cells have no place to compare with and are NaN; the eastern ones score."""
    d1, d2, bands, georef = sample
    east = Georef(georef.crs, georef.transform.shifted(128, 0))
    reference = _tif(tmp_path / "east-half.tif", d1[:, :, 128:], bands, east)
    scene = _tif(tmp_path / "input.tif", d2, bands, georef)
    assert _predict(reference, scene, tmp_path / "scores.tif") == 0
    printed = capsys.readouterr().out
    assert "cells_scored: 32" in printed and "cells_without_score: 32" in printed
    scores, grid, _ = _read(tmp_path / "scores.tif")
    assert scores.shape == (8, 8)
    assert np.isnan(scores[:, :4]).all()
    assert np.isfinite(scores[:, 4:]).all()
    assert grid.transform == georef.transform.scaled(1 / 32)


def test_an_input_grid_shifted_by_a_few_pixels_scores_on_the_references_keys(sample, engine,
                                                                             tmp_path):
    """The input starts 3 px east and 2 px south of DATE1's grid: its 7 × 7 cells land on
    the places DATE1's cells keyed, and every one is scored, close to the unshifted scores."""
    d1, d2, bands, georef = sample
    reference = GeoTiffScene(_tif(tmp_path / "d1.tif", d1, bands, georef))
    aligned = GeoTiffScene(_tif(tmp_path / "d2.tif", d2, bands, georef))
    moved = Georef(georef.crs, georef.transform.shifted(3, 2))
    shifted = GeoTiffScene(_tif(tmp_path / "d2-shifted.tif", d2[:, 2:226, 3:227], bands, moved))
    try:
        base = change_raster(engine, reference, aligned)
        raster = change_raster(engine, reference, shifted)
    finally:
        for scene in (reference, aligned, shifted):
            scene.close()
    assert raster.scores.shape == (7, 7) and raster.scored == 49
    assert raster.georef.transform == moved.transform.scaled(1 / 32)
    store = ReferenceStore(tmp_path / "unused", dim=1)
    centres = np.mgrid[0:7, 0:7][::-1].reshape(2, -1) * 32 + 16
    ours = set(store.keys(moved, *centres).packed().tolist())
    theirs = store.keys(georef, *np.mgrid[0:8, 0:8][::-1].reshape(2, -1) * 32 + 16)
    assert ours <= set(theirs.packed().tolist())
    # 2-3 px of shift moves each latent a little, not the ranking.
    same = base.scores[:7, :7]
    assert np.corrcoef(raster.scores.ravel(), same.ravel())[0, 1] > 0.8
    assert np.abs(raster.scores - same).mean() < 0.15


def test_two_input_cells_on_one_place_keep_their_own_scores(sample, engine, tmp_path):
    """At 9.77 m pixels (the 10 m rung; 32-px cells 2.3 % smaller than a place) whose first
    cell is centred 3 m inside a place, cells 0 and 1 of each row fall on one place. DATE1's
    cell 1 (centred nearer) is its reference; both input cells are scored against it, and each
    keeps its own pixel in the raster: none overwrites the other."""
    d1, d2, bands, _ = sample
    pixel, cell = 9.77, 32 * 9.77
    west = 3000 * 320.0 + 3.2 - cell / 2
    north = 70000 * 320.0 + cell / 2 - 160.0  # rows centred on places
    georef = Georef(UTM, Affine.from_origin(west, north, pixel, pixel))
    store = ReferenceStore(tmp_path / "unused", dim=1)
    keys = store.keys(georef, np.arange(8) * 32 + 16.0, np.full(8, 16.0))
    assert keys.gx.tolist() == [3000, 3000, 3001, 3002, 3003, 3004, 3005, 3006]
    real = sample[3]
    scenes = [GeoTiffScene(_tif(tmp_path / name, pixels, bands, where)) for name, pixels, where
              in (("r.tif", d1, real), ("i.tif", d2, real), ("r-utm.tif", d1, georef),
                  ("i-utm.tif", d2, georef))]
    try:
        base = change_raster(engine, scenes[0], scenes[1])  # one place per cell
        shared = change_raster(engine, scenes[2], scenes[3])
    finally:
        for scene in scenes:
            scene.close()
    assert shared.scores.shape == (8, 8) and shared.scored == 64
    assert shared.georef.transform == georef.transform.scaled(1 / 32)
    # Cells 1..7 meet DATE1's cell at their own position; cell 0 meets cell 1's reference.
    np.testing.assert_allclose(shared.scores[:, 1:], base.scores[:, 1:], atol=1e-6)
    assert not np.allclose(shared.scores[:, 0], base.scores[:, 0], atol=1e-3)
    assert not np.allclose(shared.scores[:, 0], shared.scores[:, 1], atol=1e-3)


def test_a_cell_meets_its_places_reference_even_30_px_away(sample, engine, tmp_path):
    """What the store's keys compare at an unfavourable offset (a documented limit, not a
    wish): UTM 10 m frames of date 1 against date 1 itself, the input's grid 2 px west of
    DATE1's. With DATE1's cell centres mid-place, each input cell meets the reference 2 px
    away and scores near the floor. With DATE1's centres 1 px inside a place's western edge,
    the input's centres fall 1 px into the neighbouring place, whose reference is the cell
    30 px away: the same ground then scores as change."""
    d1, _, bands, _ = sample
    results, offsets = {}, {}
    for name, centre_phase_m in (("mid-place", 180.0), ("1 px inside the edge", 10.0)):
        west = 3000 * 320.0 + centre_phase_m - 160.0  # DATE1's first cell centre in its place
        north = 70000 * 320.0  # rows centred on places
        reference = Georef(UTM, Affine.from_origin(west, north, 10.0, 10.0))
        moved = Georef(UTM, Affine.from_origin(west - 20.0, north, 10.0, 10.0))
        # The same ground in both: the input's pixel c is DATE1's pixel c - 2.
        scenes = [GeoTiffScene(_tif(tmp_path / f"{name}-r.tif", d1[:, :, 2:], bands, reference)),
                  GeoTiffScene(_tif(tmp_path / f"{name}-i.tif", d1[:, :, :254], bands, moved))]
        try:
            results[name] = change_raster(engine, *scenes)
        finally:
            for scene in scenes:
                scene.close()
        store = ReferenceStore(tmp_path / "unused", dim=1)
        ours = store.keys(moved, np.arange(7) * 32 + 16.0, np.full(7, 16.0))
        theirs = store.keys(reference, np.arange(7) * 32 + 16.0, np.full(7, 16.0))
        # The ground distance between the cells each place pairs, in pixels.
        pairs = [(i, j) for i in range(7) for j in range(7) if ours.gx[i] == theirs.gx[j]]
        offsets[name] = {(-20.0 + 32 * 10.0 * (i - j)) / 10.0 for i, j in pairs}
    assert offsets == {"mid-place": {-2.0}, "1 px inside the edge": {30.0}}
    near, far = results["mid-place"], results["1 px inside the edge"]
    assert near.scored == 56 and far.scored == 48  # the westmost column meets no reference
    assert np.nanmax(near.scores) < 0.5
    assert np.nanmean(far.scores) > 3 * np.nanmean(near.scores)


@pytest.mark.parametrize(("options", "refused"), [
    (["--scale", "1"], "--scale"), (["--overlap", "0"], "--overlap"),
    (["--overlap", "16"], "--overlap"), (["--bands", "B02,B03"], "--bands")])
def test_options_the_change_path_would_ignore_are_refused(test_data, tmp_path, capsys, options,
                                                          refused):
    paris = test_data / "oscd" / "paris"
    out = tmp_path / "scores.tif"
    assert _predict(paris / "imgs_1", paris / "imgs_2", out, *options) == 1
    error = capsys.readouterr().err
    assert f"{refused}" in error and "--reference" in error
    assert not out.exists()


def test_an_input_without_georeferencing_is_refused_naming_it(sample, tmp_path, capsys):
    d1, d2, bands, georef = sample
    reference = _tif(tmp_path / "d1.tif", d1, bands, georef)
    bare = _tif(tmp_path / "no-georef.tif", d2, bands, None)
    out = tmp_path / "scores.tif"
    assert _predict(reference, bare, out) == 1
    error = capsys.readouterr().err
    assert "no-georef.tif" in error and "no georeferencing" in error
    assert not out.exists()
