"""`onboard predict` and the cloud stage, with a real trained cloud model on real scenes."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import ukis_bundle

from onboard.runtime.bundle import write_bundle
from onboard.runtime.engines import open_engine
from onboard.runtime.errors import ConfigError
from onboard.runtime.inference import NODATA_CLASS, Predictor
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.stages import TileWork
from onboard.runtime.stages.cloud import CLOUD, CloudGate, CloudStage
from onboard.runtime.windows import CoreGrid, Window


@pytest.fixture(scope="module")
def cloud_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "ukis.onboard"
    return write_bundle(path, ukis_bundle.manifest(), {"model.onnx": ukis_bundle.onnx_bytes()})


@pytest.fixture(scope="module")
def predictor(cloud_bundle):
    engine = open_engine(cloud_bundle, threads=2, batch_size=4)
    yield Predictor(engine)
    engine.close()


def test_predict_cli_writes_a_georeferenced_mask_and_png(tmp_path, cloud_bundle, test_data):
    scene_dir = test_data / "oscd" / "paris" / "imgs_2"
    out = tmp_path / "mask.tif"
    telemetry = tmp_path / "t.jsonl"
    result = subprocess.run(["onboard", "predict", str(cloud_bundle), str(scene_dir), "--out",
                             str(out), "--telemetry", str(telemetry)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    source = OscdScene(scene_dir)
    with GeoTiffScene(out) as mask:
        assert (mask.height, mask.width) == (source.height, source.width)
        assert mask.georef == source.georef and mask.bands == ("class",)
        values = mask.read_pixels(Window(0, 0, mask.height, mask.width))
    assert set(np.unique(values)) <= {0, 1, 2}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [json.loads(line)["event"] for line in telemetry.read_text().splitlines()]
    assert events[0] == "engine_open" and events[-1] == "predict_done"


def test_predict_on_a_geotiff_with_named_bands_and_scale(tmp_path, cloud_bundle, test_data):
    """A reflectance GeoTIFF with anonymous bands: --bands names them, --scale 1 keeps them."""
    from onboard.runtime.downlink.products import write_geotiff

    crop = np.load(test_data / "ukis_6band_crop.npz")
    img = np.moveaxis(crop["img"], -1, 0)  # (6, 128, 128) reflectance
    scene = tmp_path / "reflectance.tif"
    write_geotiff(scene, img, ["b1", "b2", "b3", "b4", "b5", "b6"], None)
    out = tmp_path / "mask.tif"
    result = subprocess.run(
        ["onboard", "predict", str(cloud_bundle), str(scene), "--bands",
         "blue,green,red,nir,swir16,swir22", "--scale", "1", "--out", str(out), "--no-png"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with GeoTiffScene(out) as mask:
        predicted = mask.read_pixels(Window(0, 0, 128, 128))[0]
    # against the human mask: 4 = cloud; the real model must find the clouds
    truth_cloud = crop["msk"][..., 0] == 4
    agreement = np.mean((predicted == CLOUD) == truth_cloud)
    assert agreement > 0.8


def test_predict_names_a_missing_band(tmp_path, cloud_bundle, test_data):
    out = tmp_path / "mask.tif"
    crop = test_data / "oscd" / "paris" / "cm" / "paris-cm.tif"  # one band only
    result = subprocess.run(["onboard", "predict", str(cloud_bundle), str(crop), "--out",
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "band 'blue' not found" in result.stderr and "paris-cm.tif" in result.stderr
    assert not out.exists()


def test_tiling_does_not_change_the_answer_away_from_edges(predictor, shared_data):
    # A whole OSCD date (408 x 390) is four 256-pixel tiles, so the seams are really there:
    # butted tiles and overlapping ones must place every tile where it belongs and agree.
    scene = OscdScene(shared_data / "oscd" / "paris" / "imgs_2")
    totals: list[int] = []
    butted = predictor.predict_scene(scene, overlap=0,
                                     progress=lambda done, total: totals.append(total))
    overlapped = predictor.predict_scene(scene, overlap=64)
    assert butted.shape == (1, scene.height, scene.width) and totals[-1] == 4
    assert (butted != NODATA_CLASS).all() and (overlapped != NODATA_CLASS).all()
    # Context differs near seams; a misplaced or flipped tile would disagree over its area.
    assert np.mean(butted == overlapped) > 0.97
    flipped = np.flip(overlapped[0, :256, :256])
    assert np.mean(butted[0, :256, :256] == flipped) < np.mean(butted == overlapped)


def test_invalid_pixels_come_out_as_nodata(predictor, test_data):
    scene = OscdScene(test_data / "oscd" / "paris" / "imgs_2")
    frame = scene.read(Window(0, 0, 96, 120))
    frame.pixels[:, :10] = 65535  # saturated
    frame.valid = frame.pixels.max(axis=0) < 65535
    mask = predictor.to_product(predictor.run([predictor.prepare(frame)])[0], frame)[0]
    assert (mask[:10] == NODATA_CLASS).all() and (mask[10:] != NODATA_CLASS).all()


def _works(scene, tile=256, halo=16):
    grid = CoreGrid(scene.height, scene.width, tile, halo)
    for placement in grid:
        window = placement.core
        score = TileScore(f"t/{placement.index}", "t", (window.row_off, window.col_off,
                                                        window.height, window.width))
        yield TileWork(score, scene.read(placement.window),
                       placement.core.relative_to(placement.window))


def test_cloud_stage_gates_batches_of_tiles_and_says_why(cloud_bundle, shared_data):
    scene = OscdScene(shared_data / "oscd" / "paris" / "imgs_2")
    engine = open_engine(cloud_bundle, threads=2, batch_size=4)
    strict = CloudStage(engine, CloudGate(max_cloud_fraction=0.01, action="demote"))
    lenient = CloudStage(engine, CloudGate(max_cloud_fraction=0.7))
    works = list(_works(scene))
    strict_scores = [replace(s, reasons=[]) for s in strict.process(works)]
    lenient_scores = lenient.process([replace(w, score=replace(w.score, reasons=[],
                                                               decision=Decision.KEEP))
                                      for w in works])
    engine.close()
    assert all(s.decision == Decision.KEEP for s in lenient_scores)
    demoted = [s for s in strict_scores if s.decision == Decision.DEMOTE]
    assert demoted and len(demoted) < len(strict_scores)
    for work in works:
        assert work.layers["cloud"].shape == (work.core.height, work.core.width)
        v = work.score.values
        assert v["cloud_fraction"] + v["shadow_fraction"] + v["clear_fraction"] == pytest.approx(
            1.0)
        assert any("limit" in reason for reason in work.score.reasons)


def test_cloud_gate_config_is_checked():
    with pytest.raises(ConfigError):
        CloudGate(max_cloud_fraction=1.5)
    with pytest.raises(ConfigError):
        CloudGate(action="explode")


def test_stage_config_falls_back_to_the_golden_bundle(tmp_path, cloud_bundle):
    from onboard.runtime.config import load_config
    from onboard.runtime.inference import open_predictor
    from onboard.runtime.telemetry import Telemetry

    damaged = tmp_path / "primary.onboard"
    data = bytearray(cloud_bundle.read_bytes())
    data[len(data) // 2] ^= 0x01
    damaged.write_bytes(bytes(data))
    config_path = tmp_path / "onboard.toml"
    config_path.write_text(f"[cloud]\nbundle = 'primary.onboard'\ngolden = '{cloud_bundle}'\n")
    telemetry = Telemetry()
    predictor = open_predictor(load_config(config_path).section("cloud"), telemetry)
    assert predictor.engine.fallback_from == str(damaged)
    refused = [e for e in telemetry.events if e["event"] == "bundle_refused"]
    assert len(refused) == 1 and refused[0]["path"] == str(damaged)
    predictor.engine.close()


def test_the_streamed_mask_equals_the_whole_scene_prediction(tmp_path, predictor, shared_data,
                                                             monkeypatch):
    """``onboard predict`` streams a class mask (compressed pieces, never the whole raw mask):
    on a real scene whose sides are not multiples of the piece size, the file, the class
    fractions and the preview equal those of the whole-scene prediction in memory."""
    from onboard.runtime import pipeline
    from onboard.runtime.pipeline import PredictRequest
    from onboard.runtime.sources.oscd import open_scene

    scene_dir = shared_data / "oscd" / "bercy" / "imgs_1"
    monkeypatch.setattr(pipeline, "PNG_EDGE", 100)  # a preview that samples every 4th pixel
    out = tmp_path / "mask.tif"
    summary = pipeline.predict(PredictRequest(predictor.engine.bundle.path, scene_dir, out))
    whole = predictor.predict_scene(open_scene(scene_dir))[0]
    assert whole.shape == (395, 360)
    with GeoTiffScene(out) as mask:
        written = mask.read_pixels(Window(0, 0, mask.height, mask.width))[0]
    np.testing.assert_array_equal(written, whole)
    known = whole != NODATA_CLASS
    for value, name in sorted(predictor.output.classes.items()):
        assert summary[f"{name}_fraction"] == round(float((whole[known] == value).mean()), 4)
    from PIL import Image

    with Image.open(out.with_suffix(".png")) as preview:
        assert preview.size == (90, 99)  # every 4th pixel of 360 × 395
    # The preview is exactly every n-th pixel of the mask, across the pieces' edges too.
    stitcher, pieces = predictor.stream_classes(open_scene(scene_dir), block=64)
    streamed = pipeline._StreamedMask(395, 360, stitcher.block, 7)
    streamed.take(pieces)
    np.testing.assert_array_equal(streamed.preview, whole[::7, ::7])
    assert streamed.counts.sum() == whole.size
    np.testing.assert_array_equal(np.concatenate([
        np.concatenate(row, axis=1) for row in np.array_split(
            list(streamed.pieces()), -(-395 // 64))])[:395, :360], whole)
