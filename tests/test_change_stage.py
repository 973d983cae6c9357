"""The change stage through the pipeline on the bundled Hong Kong sample: date 1 is new, date 2
is scored against its clear cells; the stage's scores are the change model's own scoring rule;
``onboard predict --reference`` writes the score raster."""

from __future__ import annotations

import json
import subprocess
import warnings
from datetime import datetime
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile

from onboard.runtime import pipeline
from onboard.runtime.bundle import Bundle, InputSpec, Manifest, OutputSpec, write_bundle
from onboard.runtime.bundle.container import _write_archive
from onboard.runtime.bundle.signature import TrustPolicy
from onboard.runtime.config import ConfigWarning, config_from_dict, load_config
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import BundleSignatureError, ConfigError
from onboard.runtime.georef import read_georef
from onboard.runtime.pipeline import SAMPLE_CONFIG
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.stages.change import (
    NO_CLOUD_WARNING,
    NO_SCORE,
    ChangeParams,
    change_raster,
)
from onboard.runtime.store.reference import LADDER_STEP, ReferenceStore
from onboard.runtime.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
CHANGE = REPO / "models" / "change" / "change-13band-int8-ort.onboard"
CHANGE_GOLDEN = REPO / "models" / "change" / "change-13band-fp32-ort.onboard"


def _sections(sample: Path, *, cloud: bool = True, change: Path = CHANGE, tile: int = 32,
              halo: int = 16, **change_options) -> dict:
    data = {"source": {"kind": "oscd", "paths": [str(sample)]},
            "tiling": {"tile": tile, "halo": halo}, "buffer": {"batch": 16},
            "change": {"bundle": str(change), "threads": 1, "batch": 16, **change_options}}
    if cloud:
        data["cloud"] = {"bundle": str(CLOUD), "threads": 1, "batch": 16,
                         "gate": {"max_cloud_fraction": 0.6, "action": "demote"}}
    return data


def _toml(value: object) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


@pytest.fixture(scope="module")
def sample_run(sample_pass, tmp_path_factory):
    """``onboard.runtime.pipeline.run`` on a config with both [cloud] and [change]."""
    folder = tmp_path_factory.mktemp("change-run")
    lines = []
    for name, table in _sections(sample_pass, golden=str(CHANGE_GOLDEN)).items():
        flat = {k: v for k, v in table.items() if not isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in flat.items()]
        for sub, inner in ((k, v) for k, v in table.items() if isinstance(v, dict)):
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {_toml(v)}" for k, v in inner.items()]
    lines += ["[[passes]]", "start = 2016-09-28T12:00:00Z", "duration_s = 60",
              "bitrate_bps = 38400", "[[passes]]", "start = 2018-03-24T12:00:00Z",
              "duration_s = 60", "bitrate_bps = 38400"]
    config = folder / "onboard.toml"
    config.write_text("\n".join(lines) + "\n")
    out = folder / "out"
    return pipeline.run(config, out), out


def test_date_1_is_new_and_date_2_is_scored_against_its_clear_cells(sample_run):
    result, _ = sample_run
    first, second = result.acquisitions
    assert all("change" not in s.values for s in first.scores)  # new: no fake score
    new = [s.values["change_new_cells"] for s in first.scores]
    assert sum(new) >= 30  # hazy date 1: some cells are not clear enough to keep
    assert sum(new) < len(first.scores)
    scored = [s for s in second.scores if "change" in s.values]
    # Date 2 scores exactly the cells date 1 kept as references that are clear on date 2 too
    # (one cell per tile here; the tiles of both dates are on one grid).
    kept = {s.tile_id.split("/")[1] for s in first.scores if s.values["change_new_cells"] == 1}
    clear_again = {s.tile_id.split("/")[1] for s in second.scores
                   if s.values.get("clear_fraction", 0.0) >= 0.95}
    assert {s.tile_id.split("/")[1] for s in scored} == kept & clear_again
    assert len(scored) >= 20
    assert all(0.0 <= s.values["change"] <= 1.0 for s in scored)
    assert len({round(s.values["change"], 3) for s in scored}) > 10  # a ranking, not a constant
    # The other clear cells of date 2 are new places: cloud never made them references.
    assert all(s.values["change_new_cells"] == 1 for s in second.scores if s not in scored
               and s.values["clear_fraction"] >= 0.95)


def test_cloudy_cells_are_neither_scored_nor_kept(sample_run):
    result, out = sample_run
    first = result.acquisitions[0]
    manifest = Bundle.open(CHANGE).manifest
    store = ReferenceStore(out / "state" / "reference", dim=manifest.output.channels, k=3,
                           model=f"{manifest.name}@{manifest.version}")
    assert store.places == sum(s.values["change_new_cells"] for s in first.scores) + sum(
        s.values["change_new_cells"] for s in result.acquisitions[1].scores)
    masks = {tile: np.frombuffer(imagecodecs.zstd_decode(blob["cloud"]), np.uint8)
             for tile, blob in first.layers.items()}
    for score in first.scores:
        mask = masks.get(score.tile_id)
        if mask is None:
            continue
        clear = (mask == 0).mean()
        assert (score.values["change_new_cells"] == 1) == (clear >= 0.95), score.tile_id


def test_the_change_layer_and_the_plan_carry_the_score(sample_run):
    result, out = sample_run
    second = result.acquisitions[1]
    for score in second.scores:
        layer = second.layers.get(score.tile_id, {}).get("change")
        if layer is None:
            continue
        values = np.unique(np.frombuffer(imagecodecs.zstd_decode(layer), np.uint8))
        if "change" in score.values:
            assert values.tolist() == [round(254 * score.values["change"])]
        else:
            assert values.tolist() == [NO_SCORE]
    rows = [json.loads(line) for line in (out / "plan-1.jsonl").read_text().splitlines()]
    assert any("change 0." in r["value_reason"] or "change 1." in r["value_reason"]
               for r in rows)
    telemetry = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    commits = [r for r in telemetry if r["event"] == "reference_commit"]
    assert [c["acquisition"][:17] for c in commits] == ["hongkong-20160927",
                                                        "hongkong-20180323"]
    assert all(c["committed"] for c in commits)


def test_a_rerun_acquisition_commits_once_and_stays_new(sample_pass, tmp_path):
    config = config_from_dict(_sections(sample_pass))
    telemetry = Telemetry()
    scorer = pipeline.Pipeline(config, telemetry, tmp_path / "state")
    try:
        first = next(iter(pipeline.iter_acquisitions(scorer.source, telemetry, [])))
        once = scorer.score(first)
        places = scorer.stages[1].store.places
        again = scorer.score(first)  # a retried scene: its own references are not a memory
        assert scorer.stages[1].store.places == places
        assert all("change" not in s.values for s in again.scores)
        assert [s.values["change_new_cells"] for s in again.scores] == \
            [s.values["change_new_cells"] for s in once.scores]
    finally:
        scorer.close()


def test_the_stages_scores_are_the_change_models_own_scoring(sample_pass):
    """One 256-px window per date, no halo: the stage's per-cell scores equal the model
    package's reference implementation (run_tiled latents, int8 memory, calibration)."""
    scoring = pytest.importorskip("onboard.models.change.scoring")
    dataset = pytest.importorskip("onboard.models.change.dataset")
    engine = open_engine(CHANGE, threads=1, batch_size=4)
    try:
        bands = list(engine.input_spec.bands)
        before = OscdScene(sample_pass / "imgs_1", tuple(bands))
        after = OscdScene(sample_pass / "imgs_2", tuple(bands), grid=before.grid)
        raster = change_raster(engine, before, after, tile=256, min_clear_fraction=0.95)

        def latents(scene: OscdScene) -> np.ndarray:
            from onboard.runtime.windows import Window

            h, w = scene.height // 32 * 32, scene.width // 32 * 32
            x = engine.input_spec.normalise(scene.read(Window(0, 0, h, w)).pixels)
            return dataset.run_tiled(
                lambda batch: engine.run_named({"input": batch})["latent"], x)

        z1, z2 = latents(before), latents(after)
        change = engine.manifest.extra["change"]
        expected = scoring.memory_score(z2, [scoring.quantise(z1, change["latent_scale"])],
                                        change)
    finally:
        engine.close()
    assert raster.scores.shape == expected.shape == (8, 8)
    assert raster.scored == 64
    np.testing.assert_allclose(raster.scores, expected, atol=1e-5)
    # One pixel per cell of the input, on the input's own grid (date 2 read on date 1's).
    assert raster.georef.crs == before.georef.crs
    assert raster.georef.transform == before.georef.transform.scaled(1 / 32)


def _tiny_encoder(path: Path, dim: int = 8) -> Path:
    """A real encoder with no context: one 32 × 32, stride-32 convolution (random weights), so
    each cell's latent depends on its own pixels only."""
    onnx = pytest.importorskip("onnx", reason="onnx builds the test encoder")
    from onnx import TensorProto, helper, numpy_helper

    weights = (np.random.default_rng(0).standard_normal((dim, 4, 32, 32)) / 32).astype(
        np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["latent"], kernel_shape=[32, 32],
                          strides=[32, 32])], "tiny-encoder",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, "h", "w"])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["n", dim, "hc", "wc"])],
        [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    manifest = _encoder_manifest(dim, {"distance": "cosine", "latent_scale": 0.002,
                                       "calibration": {"a": 10.0, "b": -2.0}, "cell_size": 32})
    return write_bundle(path, manifest, {"model.onnx": model.SerializeToString()})


def _encoder_manifest(dim: int, change: dict[str, object]) -> Manifest:
    """A 4-band change encoder's manifest: a ``dim``-long latent per cell, ``change`` its
    ``extra.change`` block."""
    return Manifest(
        name="tiny-encoder", version="0.0.1", task="change",
        inputs=[InputSpec(bands=["blue", "green", "red", "nir"], scale=[1e-4] * 4,
                          offset=[0.0] * 4, tile_size=32, gsd_m=10.0, name="input")],
        outputs=[OutputSpec(kind="vector", channels=dim, cell_size=32, name="latent")],
        precision="fp32", engines={"onnxruntime": "model.onnx"}, extra={"change": change})


@pytest.mark.filterwarnings("ignore::onboard.runtime.config.ConfigWarning")  # no [cloud]
def test_cell_codes_do_not_depend_on_tile_size_or_halo(sample_pass, tmp_path):
    """With an encoder of no context, every tiling must store the same code for each place:
    the windows' cell grid is the cores', whatever the halo and the edge tiles' shift."""
    bundle = _tiny_encoder(tmp_path / "tiny.onboard")
    stores = []
    for tile, halo in ((32, 16), (64, 32), (96, 0)):
        config = config_from_dict(_sections(sample_pass, cloud=False, change=bundle, tile=tile,
                                            halo=halo))
        telemetry = Telemetry()
        scorer = pipeline.Pipeline(config, telemetry, tmp_path / f"state-{tile}")
        try:
            first = next(iter(pipeline.iter_acquisitions(scorer.source, telemetry, [])))
            scorer.score(first)
            stores.append(scorer.stages[0].store)
        finally:
            scorer.close()
    reference = stores[0]
    keys = reference.keys(OscdScene(sample_pass / "imgs_1", ("B02",)).georef,
                          *np.mgrid[0:8, 0:8][::-1].reshape(2, -1) * 32 + 16)
    codes = reference.lookup(keys).codes[:, 0]
    assert reference.places == 64 and np.abs(codes).max() > 10
    for store in stores[1:]:
        assert np.array_equal(store.lookup(keys).codes[:, 0], codes)


def test_tiles_that_are_not_whole_cells_are_refused(sample_pass, tmp_path):
    config = config_from_dict(_sections(sample_pass, tile=48))
    with pytest.raises(ConfigError, match="multiple of 32"):
        pipeline.Pipeline(config, Telemetry(), tmp_path / "state")


def test_a_cloud_bundle_is_not_a_change_bundle(sample_pass, tmp_path):
    config = config_from_dict(_sections(sample_pass, change=CLOUD))
    with pytest.raises(ConfigError, match="change bundle"):
        pipeline.Pipeline(config, Telemetry(), tmp_path / "state")


def _params(**change: object) -> ChangeParams:
    block = {"distance": "l2", "latent_scale": 0.5, "calibration": {"a": 1.0, "b": 0.0},
             "cell_size": 32, **change}
    return ChangeParams.from_manifest(_encoder_manifest(32, block), "test.onboard")


def test_a_cells_distance_is_its_most_changed_sub_cell():
    """16 sub-cells of 2 features each (feature-major): the stage's distance is the largest
    sub-cell's, the model package's rule agrees on random codes, and cosine cannot split."""
    params = _params(subcells=16)
    codes = np.zeros((2, 32), np.int8)
    reference = np.zeros((2, 1, 32), np.int8)
    codes[0, [3, 16 + 3]] = (6, 8)  # sub-cell 3 moved by (6, 8): L2 10
    codes[0, [5, 16 + 7]] = (6, 6)  # sub-cells 5 and 7 moved by 6 each
    codes[1, :16] = 4  # the first feature of every sub-cell of the second cell moved by 4
    present = np.ones((2, 1), bool)
    distance = params.min_distance(codes, reference, present)
    # Whole-cell L2 would be sqrt(100 + 72) = 13.1 and sqrt(16 * 16) = 16; the sub-cell rule:
    np.testing.assert_allclose(distance, [10 * 0.5, 4 * 0.5])
    scoring = pytest.importorskip("onboard.models.change.scoring")
    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (50, 32)).astype(np.int8)
    reference = rng.integers(-127, 128, (50, 1, 32)).astype(np.int8)
    ours = params.min_distance(codes, reference, np.ones((50, 1), bool))
    theirs = scoring.cell_distance(scoring.dequantise(codes, 0.5),
                                   scoring.dequantise(reference[:, 0], 0.5), axis=1,
                                   subcells=16)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    with pytest.raises(ConfigError, match="subcells"):
        _params(distance="cosine", subcells=16)
    with pytest.raises(ConfigError, match="subcells"):
        _params(subcells=0)


def test_onboard_predict_reference_writes_the_score_raster(sample_pass, tmp_path):
    out = tmp_path / "scores.tif"
    result = subprocess.run(
        ["onboard", "predict", str(CHANGE), "--reference", str(sample_pass / "imgs_1"),
         str(sample_pass / "imgs_2"), "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "cells_scored: 64" in result.stdout
    with tifffile.TiffFile(out) as tif:
        scores = tif.asarray()
        page = tif.pages[0]
        georef = read_georef({t.code: t.value for t in page.tags.values()})
    assert scores.dtype == np.float32 and scores.shape == (8, 8)
    assert np.isfinite(scores).all() and 0 <= scores.min() <= scores.max() <= 1
    pixel = OscdScene(sample_pass / "imgs_1", ("B02",)).georef.transform.a
    assert georef.transform.a == pytest.approx(32 * pixel, rel=LADDER_STEP / 2)
    assert str(georef.crs) == "EPSG:4326"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


# -- signed bundles, config warnings -----------------------------------------------------------


def test_the_sample_config_with_change_verifies_the_signed_change_bundle(tmp_path):
    """The default sample config ([signatures] requires the project's test key) with a
    [change] stage added loads and runs: the shipped change bundle is signed by that key, and
    an unsigned copy of it is refused by the same config."""
    assert TrustPolicy.from_config(load_config(SAMPLE_CONFIG).section("signatures")).required
    change = {"bundle": str(CHANGE), "golden": str(CHANGE_GOLDEN), "threads": 1, "batch": 16}
    result = pipeline.run(SAMPLE_CONFIG, tmp_path / "out", overrides={"change": change})
    assert not result.fatal
    assert any("change" in s.values for s in result.acquisitions[1].scores)
    events = [json.loads(line) for line in
              (tmp_path / "out" / "telemetry.jsonl").read_text().splitlines()]
    opened = {e["path"]: e for e in events if e["event"] == "engine_open"}
    assert (opened[str(CHANGE)]["signature"], opened[str(CHANGE)]["key_name"]) == \
        ("verified", "onboard-test")
    assert not opened[str(CHANGE)]["golden"]
    assert not any(e["event"] in ("bundle_refused", "bundle_unsigned", "config_warning")
                   for e in events)
    # Without its signature the same bundle does not load under the sample's [signatures].
    bundle = Bundle.open(CHANGE)
    unsigned = _write_archive(tmp_path / "unsigned.onboard", bundle.manifest_bytes, None,
                              {name: bundle.read(name) for name in bundle.members})
    config = load_config(SAMPLE_CONFIG, {"change": {"bundle": str(unsigned), "threads": 1}})
    with pytest.raises(BundleSignatureError, match="unsigned.onboard"):
        pipeline.Pipeline(config, Telemetry(), tmp_path / "state")


def test_change_without_cloud_warns_at_load_and_in_telemetry(sample_pass, tmp_path):
    """Without [cloud] every valid cell counts as clear and becomes a reference: the config
    says so when it loads (a ConfigWarning) and the run says so in its telemetry."""
    with pytest.warns(ConfigWarning, match=r"\[change\] without \[cloud\]"):
        config = config_from_dict(_sections(sample_pass, cloud=False))
    assert config.warnings == [NO_CLOUD_WARNING]
    telemetry = Telemetry()
    pipeline.Pipeline(config, telemetry, tmp_path / "state").close()
    warned = [e for e in telemetry.events if e["event"] == "config_warning"]
    assert [e["message"] for e in warned] == [NO_CLOUD_WARNING]
    assert json.loads(json.dumps(warned[0]))["message"] == NO_CLOUD_WARNING  # a JSON line
    # A file config names itself in the warning; with [cloud] there is none.
    path = tmp_path / "onboard.toml"
    path.write_text(f'[source]\nkind = "oscd"\npaths = ["{sample_pass}"]\n'
                    f'[change]\nbundle = "{CHANGE}"\n')
    with pytest.warns(ConfigWarning, match=str(path)):
        load_config(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        assert config_from_dict(_sections(sample_pass)).warnings == []
    # `onboard run` shows it as one line on stderr.
    result = subprocess.run(["onboard", "run", str(path), "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"onboard run: warning: {path}: {NO_CLOUD_WARNING}" in result.stderr.splitlines()


# -- the memory of K references --------------------------------------------------------------


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_min_distance_over_three_references_with_empty_slots(distance):
    """K = 3 with every pattern of filled slots (newest first, gaps where a scene's own
    references are left out, none at all): the minimum over the filled references equals a
    direct numpy computation; the shipped bundle's scale and sub-cells for L2."""
    shipped = ChangeParams.from_manifest(Bundle.open(CHANGE).manifest, str(CHANGE))
    assert (shipped.distance, shipped.subcells) == ("l2", 16)
    params = shipped if distance == "l2" else ChangeParams(
        "cosine", shipped.latent_scale, shipped.a, shipped.b, 32)
    rng = np.random.default_rng(7)
    patterns = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], bool)
    present = np.repeat(patterns, 5, axis=0)  # 8 patterns × 5 cells
    n, dim = len(present), 128
    codes = rng.integers(-127, 128, (n, dim)).astype(np.int8)
    references = rng.integers(-127, 128, (n, 3, dim)).astype(np.int8)
    references[::5, 1] = codes[::5]  # a reference identical to the cell, filled or not
    ours = params.min_distance(codes, references, present)

    expected = np.full(n, np.nan)
    for i in range(n):
        q = codes[i].astype(np.float64) * params.latent_scale
        found = []
        for j in np.flatnonzero(present[i]):
            r = references[i, j].astype(np.float64) * params.latent_scale
            if distance == "l2":  # feature-major: element f * 16 + s is feature f of sub-cell s
                per_subcell = np.sqrt(((q - r).reshape(dim // 16, 16) ** 2).sum(axis=0))
                found.append(per_subcell.max())
            else:
                found.append(1 - q @ r / (np.linalg.norm(q) * np.linalg.norm(r)))
        if found:
            expected[i] = min(found)
    assert np.isnan(ours[~present.any(axis=1)]).all()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    # The identical reference counts only where its slot is filled: then the minimum is 0.
    identical = np.arange(0, n, 5)[present[::5, 1]]
    np.testing.assert_allclose(ours[identical], 0.0, atol=1e-6)
    assert (ours[np.arange(0, n, 5)[~present[::5, 1] & present[::5].any(axis=1)]] > 0.1).all()


def _geotiff_from(folder: Path, out: Path, acquired: datetime, grid: object = None) -> Path:
    """A 13-band GeoTIFF of an OSCD band folder (on ``grid``, default its own), dated
    ``acquired``."""
    from onboard.runtime.downlink.products import write_geotiff
    from onboard.runtime.windows import Window

    scene = OscdScene(folder, grid=grid)
    frame = scene.read(Window(0, 0, scene.height, scene.width))
    return write_geotiff(out, frame.pixels, list(frame.bands), scene.georef, acquired=acquired,
                         source_id=str(folder))


def test_a_view_seen_again_scores_at_the_identical_view_floor(sample_pass, tmp_path):
    """d1, d2, then d1 again (the same pixels, a later date) through the pipeline with
    [cloud] and [change] at K = 3: d1 again finds its identical view among the place's two
    references and scores exactly the floor, sigmoid(b), in every cell d1 kept; d2 does not."""
    before = OscdScene(sample_pass / "imgs_1", ("B02",))
    d1 = _geotiff_from(sample_pass / "imgs_1", tmp_path / "d1.tif", datetime(2016, 9, 27))
    d2 = _geotiff_from(sample_pass / "imgs_2", tmp_path / "d2.tif", datetime(2018, 3, 23),
                       grid=before.grid)
    again = _geotiff_from(sample_pass / "imgs_1", tmp_path / "d1again.tif",
                          datetime(2019, 1, 1))
    sections = _sections(sample_pass)
    sections["source"] = {"kind": "geotiff", "paths": [str(d1), str(d2), str(again)]}
    config = config_from_dict(sections)
    telemetry = Telemetry()
    scorer = pipeline.Pipeline(config, telemetry, tmp_path / "state")
    try:
        results = [scorer.score(a) for a in
                   pipeline.iter_acquisitions(scorer.source, telemetry, [])]
        params = scorer.stages[1].params
        store = scorer.stages[1].store
    finally:
        scorer.close()
    first, second, third = results
    assert [r.acquisition.split("-")[0] for r in results] == ["d1", "d2", "d1again"]
    floor = float(params.score(np.zeros(1, np.float32))[0])
    assert floor == pytest.approx(1 / (1 + np.exp(-params.b)), rel=1e-6) and floor < 0.1
    kept = {s.tile_id.split("/")[1] for s in first.scores if s.values["change_new_cells"] == 1}
    assert len(kept) >= 20
    scored = {s.tile_id.split("/")[1]: s.values["change"] for s in third.scores
              if "change" in s.values}
    assert set(scored) == kept  # the same pixels: the same clear cells, each with a reference
    np.testing.assert_allclose(list(scored.values()), floor, rtol=1e-5)
    assert sum(s.values["change_new_cells"] for s in third.scores) == 0
    changed = [s.values["change"] for s in second.scores if "change" in s.values]
    assert len(changed) >= 20 and min(changed) > floor and np.mean(changed) > 2 * floor
    # d1 again met one or two filled slots of three (d1's, and d2's where d2 was clear); now
    # each place holds one reference per clear observation, d1 again's the newest.
    manifest = Bundle.open(CHANGE).manifest
    reopened = ReferenceStore(tmp_path / "state" / "reference", dim=manifest.output.channels,
                              k=3, model=f"{manifest.name}@{manifest.version}")
    assert reopened.places == store.places
    keys = reopened.keys(before.georef, *np.mgrid[0:8, 0:8][::-1].reshape(2, -1) * 32 + 16)
    memory = reopened.lookup(keys)

    def clear(result: pipeline.AcquisitionResult) -> np.ndarray:
        out = np.zeros(64, int)
        for s in result.scores:
            out[s.window[0] // 32 * 8 + s.window[1] // 32] = \
                s.values["change_new_cells"] + s.values["change_cells"]
        return out

    np.testing.assert_array_equal(memory.present.sum(axis=1),
                                  clear(first) + clear(second) + clear(third))
    both = (clear(first) == 1) & (clear(second) == 1)
    assert both.sum() >= 10 and (memory.present[both] == [True, True, True]).all()
    newest = memory.seq[both, 0]
    assert {reopened.scene_of(q) for q in newest} == {third.acquisition}


# -- a damaged reference segment -------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::onboard.runtime.config.ConfigWarning")  # no [cloud]
@pytest.mark.parametrize(("damage", "tile", "halo"),
                         [("flip", 96, 0), ("truncate", 96, 0), ("flip", 32, 16)])
def test_a_damaged_segment_makes_its_cells_new_is_reported_and_rewritten(test_data, tmp_path,
                                                                        damage, tile, halo):
    """The paris crop's 3 × 3 cells span two regions of the store (with 96 px tiles, one tile
    holds all of them). After date 1, one region's segment is damaged on disk: date 2 counts
    that region's cells as new (no score, not a fake one), telemetry names the file, the other
    region's cells are still scored, and date 2's commit writes the damaged region afresh
    while the other keeps date 1's references."""
    paris = test_data / "oscd" / "paris"
    config = config_from_dict(_sections(paris, cloud=False, tile=tile, halo=halo))
    state = tmp_path / "state"

    def run(index: int) -> tuple[pipeline.AcquisitionResult, Telemetry, ReferenceStore]:
        telemetry = Telemetry()
        scorer = pipeline.Pipeline(config, telemetry, state)
        try:
            acquisition = list(pipeline.iter_acquisitions(scorer.source, telemetry, []))[index]
            return scorer.score(acquisition), telemetry, scorer.stages[0].store
        finally:
            scorer.close()

    def cells(result: pipeline.AcquisitionResult) -> np.ndarray:
        """The change layer's value of each of the 3 × 3 cells, row by row."""
        out = np.full((3, 3), -1)
        for s in result.scores:
            blob = result.layers.get(s.tile_id, {}).get("change")
            if blob is None:
                continue
            row, col, h, w = s.window
            layer = np.frombuffer(imagecodecs.zstd_decode(blob), np.uint8).reshape(h, w)
            for r in range(h // 32):
                for c in range(w // 32):
                    out[row // 32 + r, col // 32 + c] = layer[r * 32, c * 32]
        return out.ravel()

    first, _, store = run(0)
    assert store.places == 9 == sum(s.values.get("change_new_cells", 0) for s in first.scores)
    assert len(store.regions) == 2
    georef = OscdScene(paris / "imgs_1", ("B02",)).georef
    centres = np.mgrid[0:3, 0:3][::-1].reshape(2, -1) * 32 + 16  # (cols, rows), row by row
    keys = store.keys(georef, *centres)
    region, entry = sorted(store.regions.items())[0]
    segment = state / "reference" / entry["file"]
    in_damaged = (keys.gy >> 6) == region[2]
    assert 0 < in_damaged.sum() < 9
    data = segment.read_bytes()
    if damage == "flip":
        segment.write_bytes(data[:40] + bytes([data[40] ^ 0xFF]) + data[41:])
    else:
        segment.write_bytes(data[: len(data) // 2])

    second, telemetry, store = run(1)
    assert sum(s.values.get("change_new_cells", 0) for s in second.scores) == in_damaged.sum()
    assert sum(s.values.get("change_cells", 0) for s in second.scores) == (~in_damaged).sum()
    layer = cells(second)
    assert (layer[in_damaged] == NO_SCORE).all()  # new: no score
    assert (layer[~in_damaged] < NO_SCORE).all()  # still compared with date 1
    reported = [e for e in telemetry.events if e["event"] == "reference_damaged"]
    assert reported and {e["file"] for e in reported} == {str(segment)}
    assert all(segment.name in e["message"] and e["error"] == "StorageError" for e in reported)
    # Date 2's commit wrote the region afresh: a new segment, the damaged file gone.
    rewritten = store.regions[region]["file"]
    assert rewritten != entry["file"] and not segment.exists()
    manifest = Bundle.open(CHANGE).manifest
    reopened = ReferenceStore(state / "reference", dim=manifest.output.channels, k=3,
                              model=f"{manifest.name}@{manifest.version}")
    assert reopened.verify() == 9
    slots = reopened.lookup(keys).present.sum(axis=1)
    # The damaged region holds date 2 only; the other kept date 1 beside it.
    assert slots[in_damaged].tolist() == [1] * int(in_damaged.sum())
    assert slots[~in_damaged].tolist() == [2] * int((~in_damaged).sum())
