"""The reference store: geographic keys, last K clear references, eviction, idempotent commits,
and the previous state intact after a SIGKILL at any point of a commit."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import tifffile

from onboard.runtime.errors import ConfigError, StorageError
from onboard.runtime.georef import CRS, Affine, Georef, read_georef
from onboard.runtime.store.reference import (
    FORMAT,
    LADDER_STEP,
    MANIFEST,
    REGION_EDGE,
    CellKeys,
    ReferenceStore,
    bytes_for_area,
    bytes_per_place,
    ladder_rung,
)

UTM = CRS.from_epsg(32650)
DIM = 16
T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)


def _cells(rows: int, cols: int, cell: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (cols, rows) of a frame's rows × cols cells."""
    r, c = np.mgrid[0:rows, 0:cols]
    return (c.ravel() * cell + cell / 2).astype(float), (r.ravel() * cell + cell / 2).astype(float)


def _utm_frame(east_cells: int, north_cells: int, shift_px: tuple[float, float] = (0, 0)
               ) -> Georef:
    """A 10 m frame whose cell centres sit on place centres, shifted by ``shift_px`` (x, y)."""
    west = east_cells * 320.0 + shift_px[0] * 10
    north = north_cells * 320.0 - shift_px[1] * 10
    return Georef(UTM, Affine.from_origin(west, north, 10.0, 10.0))


def _codes(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).integers(-127, 128, (n, dim)).astype(np.int8)


def _store(path: Path, **options) -> ReferenceStore:
    return ReferenceStore(path, dim=options.pop("dim", DIM), model="test", **options)


def _commit(store: ReferenceStore, scene: str, georef: Georef, rows: int, cols: int,
            seed: int, when: datetime, clear: np.ndarray | None = None):
    keys = store.keys(georef, *_cells(rows, cols))
    store.stage(scene, when, keys, _codes(len(keys), seed, store.dim),
                np.ones(len(keys), bool) if clear is None else clear)
    return store.commit(scene), keys


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(1, 0), (0, -2), (3, 3), (-3, 2), (7, -5), (-15, 15)])
def test_keys_do_not_move_when_the_pixel_grid_shifts_by_a_few_pixels(tmp_path, shift):
    store = _store(tmp_path / "s")
    reference = store.keys(_utm_frame(1000, 7000), *_cells(20, 30))
    shifted = store.keys(_utm_frame(1000, 7000, shift), *_cells(20, 30))
    assert np.array_equal(shifted.packed(), reference.packed())
    assert len(store.grids) == 1
    # Half a cell is where the centre rule must move to the neighbouring place.
    half = store.keys(_utm_frame(1000, 7000, (16, 0)), *_cells(20, 30))
    assert np.array_equal(half.gx, reference.gx + 1)


@pytest.mark.parametrize(("phase", "shift", "offset"), [
    (16, -2, -2), (16, 15, 15), (16, 17, -15), (1, -2, 30), (1, 2, 2), (31, 2, -30)])
def test_cells_keyed_to_one_place_lie_up_to_almost_a_cell_apart(tmp_path, phase, shift, offset):
    """What a key compares (the module docstring's bound): pass 1's cell centres sit ``phase``
    px into their places, pass 2 is the same grid ``shift`` px east. A place's key is a
    function of the ground alone, but the cells two passes put on it are ``shift`` mod 32 px
    apart, as r or r − 32: with centres mid-place at most half a cell; with centres 1 px inside
    a place's edge, a 2 px shift pairs cells 30 px apart."""
    store = _store(tmp_path / "s")
    first = _utm_frame(1000, 7000, (phase - 16, 0))
    second = _utm_frame(1000, 7000, (phase - 16 + shift, 0))
    cols, rows = _cells(4, 12)
    a, b = store.keys(first, cols, rows), store.keys(second, cols, rows)
    # The same ground has the same key whichever pass keys it.
    same_ground = store.keys(first, cols + shift, rows)
    assert np.array_equal(b.packed(), same_ground.packed())
    # Pair the cells of each place both passes keyed; their ground distance in pixels.
    where = {key: i for i, key in enumerate(a.packed().tolist())}
    pairs = [(where[key], j) for j, key in enumerate(b.packed().tolist()) if key in where]
    assert len(pairs) >= 4 * 11
    x1 = first.transform.c + 10.0 * cols
    x2 = second.transform.c + 10.0 * cols
    offsets = {round((x2[j] - x1[i]) / 10.0, 6) for i, j in pairs}
    assert offsets == {offset}
    assert abs(offset) < 32 and (offset - shift) % 32 == 0


def test_the_two_native_grids_of_hongkong_share_their_places(sample_pass, tmp_path):
    """Hongkong's second date is 693 × 538 px at a 0.4 % coarser pixel than the first's
    695 × 540: the same places, without resampling."""
    georefs = []
    for folder in ("imgs_1", "imgs_2"):
        with tifffile.TiffFile(sample_pass / folder / "hongkong_B02.tif") as tif:
            page = tif.pages[0]
            georefs.append(read_georef({t.code: t.value for t in page.tags.values()}))
    assert georefs[0].transform.a != georefs[1].transform.a
    store = _store(tmp_path / "s")
    first = store.keys(georefs[0], *_cells(8, 8))
    # The second date's cells that cover the same ground as the first's: same pixel offsets
    # scaled by the pixel size ratio.
    ratio = georefs[0].transform.a / georefs[1].transform.a
    cols, rows = _cells(8, 8)
    second = store.keys(georefs[1], cols * ratio, rows * ratio)
    assert len(store.grids) == 1
    assert np.array_equal(first.packed(), second.packed())
    # Without scaling (cell by cell of the coarser grid) the drift across 8 cells stays
    # inside a place.
    drifted = store.keys(georefs[1], cols, rows)
    assert (drifted.packed() == first.packed()).mean() >= 0.9


def test_grids_per_resolution_and_crs(tmp_path):
    store = _store(tmp_path / "s")
    store.keys(_utm_frame(0, 7000), *_cells(2, 2))
    coarse = Georef(UTM, Affine.from_origin(0, 7000 * 320.0, 20.0, 20.0))
    other_zone = Georef(CRS.from_epsg(32651), Affine.from_origin(0, 7000 * 320.0, 10.0, 10.0))
    assert store.keys(coarse, *_cells(2, 2)).grid[0] == 1
    assert store.keys(other_zone, *_cells(2, 2)).grid[0] == 2
    assert [g.crs for g in store.grids] == ["EPSG:32650", "EPSG:32650", "EPSG:32651"]
    # Sentinel-2's 10 m in UTM is rung 0: cells of exactly 320 m.
    assert store.grids[0].cell_x == store.grids[0].cell_y == 320.0


def _places(store: ReferenceStore, keys: CellKeys) -> list[tuple]:
    """What the keys name in any store: CRS, rungs and cell indices (the grid id is the
    store's own handle)."""
    grids = [store.grids[int(g)] for g in keys.grid]
    return [(g.crs, g.cell_x, g.cell_y, int(x), int(y))
            for g, x, y in zip(grids, keys.gx, keys.gy, strict=True)]


def _oscd_georefs(root: Path) -> dict[str, list[Georef]]:
    """Both dates' 10 m (B02) georeferencing of every OSCD city under ``root``."""
    cities = {}
    for city in sorted(p for p in root.iterdir() if (p / "imgs_1").is_dir()):
        cities[city.name] = []
        for folder in ("imgs_1", "imgs_2"):
            with tifffile.TiffFile(next((city / folder).glob("*_B02.tif"))) as tif:
                page = tif.pages[0]
                cities[city.name].append(read_georef({t.code: t.value
                                                      for t in page.tags.values()}))
    return cities


def test_a_frames_keys_do_not_depend_on_what_the_store_saw_before(shared_data, tmp_path):
    """The keys of one frame in a fresh store, and in a store that first met every OSCD
    city's both dates (all 4326 grids, in two orders) and a UTM frame: the same places. The
    grids Abu Dhabi and Rio met depended on the cities seen before them under format 1."""
    cities = _oscd_georefs(shared_data / "oscd")
    assert len(cities) == 18
    cols, rows = _cells(6, 6)
    for city in ("abudhabi", "rio", "saclay_w"):
        for date in (0, 1):
            frame = cities[city][date]
            fresh = _store(tmp_path / f"fresh-{city}-{date}")
            expected = _places(fresh, fresh.keys(frame, cols, rows))
            for order in (sorted(cities), sorted(cities, reverse=True)):
                seasoned = _store(tmp_path / f"seasoned-{city}-{date}-{order[0]}")
                seasoned.keys(_utm_frame(1000, 7000), *_cells(2, 2))
                for other in order:
                    for georef in cities[other]:
                        seasoned.keys(georef, *_cells(2, 2))
                assert _places(seasoned, seasoned.keys(frame, cols, rows)) == expected
    # And the grid, on disk and back, is still the one a fresh store computes.
    store = _store(tmp_path / "committed")
    _commit(store, "rio-1", cities["rio"][0], 6, 6, seed=1, when=T0)
    reopened = _store(tmp_path / "committed")
    fresh = _store(tmp_path / "fresh-rio")
    assert _places(reopened, reopened.keys(cities["rio"][0], cols, rows)) == \
        _places(fresh, fresh.keys(cities["rio"][0], cols, rows))


def test_every_oscd_citys_two_dates_fall_on_one_rung(shared_data, tmp_path):
    """Each city's two native 10 m grids share their places' grid: one rung per axis."""
    store = _store(tmp_path / "s")
    for city, (first, second) in _oscd_georefs(shared_data / "oscd").items():
        assert first.crs == second.crs, city
        one, two = store.grid_for(first), store.grid_for(second)
        assert one == two, (city, first.transform, second.transform)
    # Cells of a 4326 grid are about 32 px of the frame: within half a step.
    for city, (first, _) in _oscd_georefs(shared_data / "oscd").items():
        grid = store.grid_for(first)
        assert abs(grid.cell_x / (32 * abs(first.transform.a)) - 1) <= LADDER_STEP / 2, city


def test_frames_either_side_of_a_rung_boundary_meet_different_grids(tmp_path):
    store = _store(tmp_path / "s")
    boundary = 10.0 * (1 + LADDER_STEP) ** 0.5  # between rung 0 (10 m) and rung 1
    below = Georef(UTM, Affine.from_origin(0, 0, boundary * 0.999, boundary * 0.999))
    above = Georef(UTM, Affine.from_origin(0, 0, boundary * 1.001, boundary * 1.001))
    assert ladder_rung(boundary * 0.999, False) == 0 and ladder_rung(boundary * 1.001, False) == 1
    assert store.grid_for(below).cell_x == 320.0
    assert store.grid_for(above).cell_x == pytest.approx(320.0 * (1 + LADDER_STEP), rel=1e-12)
    assert store.grid_for(below) != store.grid_for(above)
    # Within a rung, every pixel size meets the same grid, whichever came first.
    inside = [Georef(UTM, Affine.from_origin(0, 0, p, p)) for p in (9.8, 10.0, 10.2)]
    assert len({store.grid_for(g) for g in inside}) == 1


# -- what a place holds ----------------------------------------------------------------------------


def test_a_place_seen_for_the_first_time_is_new(tmp_path):
    store = _store(tmp_path / "s")
    keys = store.keys(_utm_frame(1000, 7000), *_cells(4, 4))
    memory = store.lookup(keys)
    assert not memory.known.any() and not memory.present.any()
    _commit(store, "a", _utm_frame(1000, 7000), 4, 4, seed=1, when=T0)
    assert store.lookup(keys).known.all()
    # Beside it, still new.
    beside = store.keys(_utm_frame(1004, 7000), *_cells(4, 4))
    assert not store.lookup(beside).known.any()


def test_the_last_k_clear_references_newest_first_even_out_of_order(tmp_path):
    store = _store(tmp_path / "s", k=3)
    frame = _utm_frame(1000, 7000)
    for day in (0, 1, 2, 3, 4):
        _commit(store, f"day{day}", frame, 3, 3, seed=day, when=T0 + timedelta(days=day))
    # A late-arriving older scene does not displace newer references.
    _, keys = _commit(store, "day-late", frame, 3, 3, seed=99, when=T0 + timedelta(hours=12))
    reopened = _store(tmp_path / "s", k=3)
    memory = reopened.lookup(keys)
    assert memory.present.all()
    names = [[reopened.scene_of(s) for s in row] for row in memory.seq]
    assert all(row == ["day4", "day3", "day2"] for row in names)
    assert np.array_equal(memory.codes[:, 0], _codes(9, 4))


def test_only_clear_cells_become_references_and_cloud_never_overwrites(tmp_path):
    store = _store(tmp_path / "s")
    frame = _utm_frame(1000, 7000)
    clear = np.arange(16) % 2 == 0
    _, keys = _commit(store, "clear-half", frame, 4, 4, seed=1, when=T0, clear=clear)
    memory = store.lookup(keys)
    assert np.array_equal(memory.known, clear)
    before = memory.codes.copy()
    # A fully cloudy pass: it refreshes "last seen" and changes no reference.
    result, _ = _commit(store, "cloudy", frame, 4, 4, seed=2, when=T0 + timedelta(days=5),
                        clear=np.zeros(16, bool))
    assert result.committed and result.references_added == 0 and result.places_added == 0
    after = _store(tmp_path / "s").lookup(keys)
    assert np.array_equal(after.codes, before) and np.array_equal(after.known, clear)


def test_a_scene_commits_once_and_never_meets_its_own_references(tmp_path):
    store = _store(tmp_path / "s")
    frame = _utm_frame(1000, 7000)
    first, keys = _commit(store, "scene", frame, 4, 4, seed=1, when=T0)
    assert first.committed and first.references_added == 16
    places, size = store.places, store.nbytes
    # Retried (a replay, a restart after a crash past the commit): nothing changes.
    again, _ = _commit(_store(tmp_path / "s"), "scene", frame, 4, 4, seed=1, when=T0)
    reopened = _store(tmp_path / "s")
    assert not again.committed
    assert reopened.places == places and reopened.nbytes == size
    assert (reopened.lookup(keys).present.sum(axis=1) == 1).all()
    # Its own references are not a memory to compare the retried scene with.
    assert not reopened.lookup(keys, exclude_scene="scene").known.any()
    assert reopened.lookup(keys, exclude_scene="another").known.all()


def test_an_unfinished_acquisition_can_be_discarded(tmp_path):
    store = _store(tmp_path / "s")
    keys = store.keys(_utm_frame(1000, 7000), *_cells(2, 2))
    store.stage("half-done", T0, keys, _codes(4, 1), np.ones(4, bool))
    store.discard("half-done")
    assert store.commit("half-done").references_added == 0
    assert not store.lookup(keys).known.any()


# -- bounded --------------------------------------------------------------------------------------


def test_eviction_drops_the_least_recently_observed_region_first(tmp_path):
    per_region = 1024 * bytes_per_place(DIM, 3) + 2048  # one 32 x 32-cell area, with margins
    store = _store(tmp_path / "s", budget_bytes=int(2.5 * per_region))
    # Three areas of 32 x 32 places, each inside its own region (64 x 64 places).
    areas = {name: _utm_frame(16 * REGION_EDGE * (i + 1), 110 * REGION_EDGE)
             for i, name in enumerate("abc")}
    keys = {}
    for day, name in enumerate("ab"):
        _, keys[name] = _commit(store, f"{name}0", areas[name], 32, 32, seed=day,
                                when=T0 + timedelta(days=day))
    # a is observed again (under cloud): b is now the least recently observed.
    _commit(store, "a1", areas["a"], 32, 32, seed=5, when=T0 + timedelta(days=2),
            clear=np.zeros(1024, bool))
    result, keys["c"] = _commit(store, "c0", areas["c"], 32, 32, seed=6,
                                when=T0 + timedelta(days=3))
    assert result.evicted_regions == 1 and result.evicted_places == 1024
    reopened = _store(tmp_path / "s", budget_bytes=int(2.5 * per_region))
    assert reopened.nbytes <= reopened.budget_bytes
    assert reopened.lookup(keys["a"]).known.all()
    assert not reopened.lookup(keys["b"]).known.any()  # evicted: new again
    assert reopened.lookup(keys["c"]).known.all()


def test_a_commit_larger_than_the_budget_keeps_what_fits(tmp_path):
    store = _store(tmp_path / "s", budget_bytes=300 * bytes_per_place(DIM, 3))
    result, keys = _commit(store, "big", _utm_frame(1000, 7000), 32, 32, seed=1, when=T0)
    assert result.evicted_places > 0
    assert store.nbytes <= store.budget_bytes
    assert 0 < store.lookup(keys).known.sum() == store.places < 1024


def test_the_shipped_store_figures(tmp_path):
    """The figures README, the model card and the module docstring give for the shipped change
    bundles at the stage's default K: 402 bytes per place and 3.93 GB for 1000 × 1000 km."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.stages.change import ChangeConfig

    repo = Path(__file__).resolve().parents[1]
    k = ChangeConfig(bundle=Path("unused.onboard")).k
    dims = {Bundle.open(p).manifest.output.channels
            for p in sorted((repo / "models" / "change").glob("change-*.onboard"))}
    assert (dims, k) == ({128}, 3)
    assert bytes_per_place(128, 3) == 2 + 4 + 3 * (128 + 4) == 402
    area = bytes_for_area(1000, 1000, dim=128, k=3)
    assert round(area / 1e9, 2) == 3.93
    assert 9_765_625 * 402 < area < 9_765_625 * 402 * 1.001  # (10⁶ m / 320 m)² places
    assert round(bytes_for_area(1000, 1000, dim=128, k=1) / 1e9, 2) == 1.35
    # What a store of the shipped layout measures on disk, per place, beside the formula.
    store = _store(tmp_path / "s", dim=128, k=3)
    _commit(store, "a", _utm_frame(1000, 7000), 64, 64, seed=1, when=T0)
    stats = store.stats()
    assert stats["places"] == 4096 and stats["bytes_per_place"] == 402
    assert 402 <= stats["bytes_per_place_measured"] < 403
    texts = {name: (repo / name).read_text(encoding="utf-8")
             for name in ("README.md", "models/change/card.md")}
    for name, text in texts.items():
        assert "402 B per place" in text and "3.93 GB" in text, name
    docstring = (repo / "runtime" / "store" / "reference.py").read_text(encoding="utf-8")
    assert "402 bytes per place" in docstring and "3.93 GB at D = 128, K = 3" in docstring


def test_bytes_per_place_and_a_1000_km_area_of_interest(tmp_path):
    store = _store(tmp_path / "s", dim=32, k=3)
    _commit(store, "a", _utm_frame(1000, 7000), 64, 64, seed=1, when=T0)
    # 2 (index) + 4 (last seen) + 3 × (32 code bytes + 4 commit number)
    assert bytes_per_place(32, 3) == 114
    stats = store.stats()
    assert stats["places"] == 4096
    assert stats["bytes_per_place"] <= stats["bytes_per_place_measured"] < 115
    # (1000 km / 320 m)² = 9.77 M places.
    assert 1.10e9 < bytes_for_area(1000, 1000, dim=32, k=3) < 1.13e9
    assert 2.0e9 < bytes_for_area(1000, 1000, dim=64, k=3) < 2.1e9


# -- damage and refusal ----------------------------------------------------------------------------


def test_a_damaged_segment_is_a_storage_error_naming_it(tmp_path):
    store = _store(tmp_path / "s")
    _, keys = _commit(store, "a", _utm_frame(1000, 7000), 4, 4, seed=1, when=T0)
    segment = next((tmp_path / "s").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x40
    segment.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=segment.name) as caught:
        _store(tmp_path / "s").lookup(keys)
    assert "damaged" in str(caught.value)
    with pytest.raises(StorageError, match=segment.name):
        _store(tmp_path / "s").verify()
    segment.write_bytes(bytes(data[:100]))
    with pytest.raises(StorageError, match="bytes"):
        _store(tmp_path / "s").lookup(keys)


def test_a_damaged_manifest_is_a_storage_error_naming_it(tmp_path):
    _commit(_store(tmp_path / "s"), "a", _utm_frame(1000, 7000), 4, 4, seed=1, when=T0)
    manifest = tmp_path / "s" / MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(StorageError, match=MANIFEST):
        _store(tmp_path / "s")
    manifest.write_text(json.dumps({"format": FORMAT, "dim": DIM}))
    with pytest.raises(StorageError, match="malformed"):
        _store(tmp_path / "s")


def test_a_store_of_format_1_is_refused_naming_its_manifest(tmp_path):
    """Format 1 founded grids from the first frames it met: its places are not format 2's."""
    _commit(_store(tmp_path / "s"), "a", _utm_frame(1000, 7000), 2, 2, seed=1, when=T0)
    manifest = tmp_path / "s" / MANIFEST
    old = json.loads(manifest.read_text())
    old["format"] = "onboard-reference/1"
    del old["ladder"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(StorageError, match=f"{MANIFEST}.*format 1") as caught:
        _store(tmp_path / "s")
    assert "remove the store folder" in str(caught.value)
    # A store keyed on another ladder (a changed step) is refused as well.
    old["format"], old["ladder"] = FORMAT, {"step": 0.02, "projected_anchor": 10.0,
                                            "geographic_anchor": 10 / 111320}
    manifest.write_text(json.dumps(old))
    with pytest.raises(StorageError, match="ladder"):
        _store(tmp_path / "s")


def test_a_store_of_another_model_or_layout_is_refused(tmp_path):
    _commit(_store(tmp_path / "s"), "a", _utm_frame(1000, 7000), 2, 2, seed=1, when=T0)
    with pytest.raises(ConfigError, match="another model"):
        ReferenceStore(tmp_path / "s", dim=DIM, model="other")
    with pytest.raises(ConfigError, match="K=5"):
        ReferenceStore(tmp_path / "s", dim=DIM, k=5, model="test")


# -- crash safety ----------------------------------------------------------------------------------

KILL_DIM = 64
AREAS = 3


def _kill_scene(store: ReferenceStore, index: int) -> None:
    """Scene ``index`` of a deterministic sequence over three areas (regions), ~90 % clear."""
    area = index % AREAS
    georef = _utm_frame(1000 + 40 * area, 7000 + 40 * area, (index % 5, -(index % 3)))
    keys = store.keys(georef, *_cells(48, 48))
    rng = np.random.default_rng(index)
    store.stage(f"scene-{index}", T0 + timedelta(hours=index), keys,
                _codes(len(keys), index, KILL_DIM), rng.random(len(keys)) < 0.9)
    store.commit(f"scene-{index}")


def _same_state(a: ReferenceStore, b: ReferenceStore) -> None:
    assert a.sequence == b.sequence
    assert list(a.committed) == list(b.committed)
    assert a.regions.keys() == b.regions.keys()
    for region in a.regions:
        sa, sb = a._segment(region), b._segment(region)
        for name in ("local", "last_seen", "seq", "codes"):
            assert np.array_equal(getattr(sa, name), getattr(sb, name)), (region, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks its writer")
def test_sigkill_mid_commit_leaves_the_previous_state_readable(tmp_path):
    """56 writers SIGKILLed at random moments while committing scene after scene; after each
    kill the store opens, holds exactly the scenes committed before the kill (a prefix of the
    sequence), equal place by place to a store that committed that prefix undisturbed, with
    no file of the half-done commit left."""
    path = tmp_path / "store"
    options = {"dim": KILL_DIM, "k": 3, "budget_bytes": 2**20}  # eviction happens too
    shadow = _store(tmp_path / "shadow", **options)
    chooser = random.Random(10)
    interrupted = 0
    for _ in range(56):
        pid = os.fork()
        if pid == 0:  # the writer: commit the next scenes until killed
            try:
                store = _store(path, **options)
                index = store.sequence
                while True:
                    _kill_scene(store, index)
                    index += 1
            finally:
                os._exit(1)
        time.sleep(chooser.uniform(0.005, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = [p.name for p in path.iterdir()] if path.exists() else []
        manifest = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() \
            else {"regions": {}}
        named = {e["file"] for e in manifest["regions"].values()} | {MANIFEST}
        interrupted += any(name not in named for name in leftovers)
        store = _store(path, **options)
        assert sorted(p.name for p in path.iterdir()) == sorted(
            {e["file"] for e in store.regions.values()} | ({MANIFEST} if store.sequence else
                                                           set()))
        while shadow.sequence < store.sequence:
            _kill_scene(shadow, shadow.sequence)
        assert list(store.committed) == [f"scene-{i}" for i in range(store.sequence)]
        _same_state(store, shadow)
        assert store.verify() == store.places
    assert shadow.sequence >= 40  # the writers got somewhere
    assert interrupted >= 10  # and many kills landed inside a commit
