"""The committed cloud bundles, through the flight runtime only (no torch): size, signature,
the gate they were compiled under, agreement between engines, accuracy on the held-out UKIS
scene against ukis-csmask measured here, and `onboard predict` on the sample pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from onboard.runtime.bundle import Bundle
from onboard.runtime.engines import open_engine
from onboard.runtime.inference import Predictor
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdPair
from onboard.runtime.windows import Window

BUNDLES = Path(__file__).resolve().parents[1] / "models" / "cloud"
TEST_PUBLIC = Path(__file__).resolve().parents[1] / "keys" / "onboard-test.ed25519.pub"
CLOUD = 1


def _bundle(bands: int, kind: str) -> Path:
    # The installed package carries the bundles too; use the installed ones where present.
    try:
        import onboard.models.cloud as cloud

        path = Path(cloud.__file__).parent / f"cloud-{bands}band-{kind}.onboard"
        if path.exists():
            return path
    except ImportError:
        pass
    return BUNDLES / f"cloud-{bands}band-{kind}.onboard"


@pytest.mark.parametrize("bands", [4, 6])
@pytest.mark.parametrize("kind", ["int8-ort", "int8-ov", "fp32-ort"])
def test_bundles_verify_and_fit_the_uplink_budget(bands, kind):
    bundle = Bundle.open(_bundle(bands, kind))
    m = bundle.manifest
    assert bundle.path.stat().st_size <= 500_000
    assert m.task == "cloud" and m.output.classes == {0: "clear", 1: "cloud", 2: "shadow"}
    assert m.input.bands == ["blue", "green", "red", "nir", "swir16", "swir22"][:bands]
    assert m.input.scale == [1e-4] * bands  # Sentinel-2 L1C DN -> TOA reflectance
    assert m.metrics["params"] <= 100_000
    assert m.metrics["boa_drop"] <= 0.01
    # Gated on the held-out scenes, not on two tiles; and named, so a reader can judge it.
    gate = m.extra["gate"]
    assert gate["metric"] == "boa" and gate["tiles"] == m.metrics["validation_tiles"] >= 64
    assert len(gate["scenes"]) >= 3 and any(s.startswith("ukis ") for s in gate["scenes"])
    assert abs(gate["final"] - m.metrics["boa"]) < 1e-9


@pytest.mark.parametrize("bands", [4, 6])
@pytest.mark.parametrize("kind", ["int8-ort", "int8-ov", "fp32-ort"])
def test_bundles_are_signed_by_the_project_test_key(bands, kind):
    from onboard.runtime.bundle.signature import TrustPolicy, verify_bundle

    verdict = verify_bundle(Bundle.open(_bundle(bands, kind)), TrustPolicy.trusting(TEST_PUBLIC))
    assert verdict.status == "verified" and verdict.key_id == "223ad9949f275860"


@pytest.mark.parametrize("bands", [4, 6])
def test_onnxruntime_and_openvino_agree_within_1e4_on_real_imagery(bands, sample_pass,
                                                                   test_data):
    pytest.importorskip("openvino", reason="OpenVINO is an optional engine")
    path = _bundle(bands, "fp32-ort")
    ort = Predictor(open_engine(path, "onnxruntime", threads=1))
    ov = Predictor(open_engine(path, "openvino", threads=1, precision="fp32"))
    frames = [OscdPair(sample_pass).before.read(Window(0, 0, 256, 256)),
              OscdPair(test_data / "oscd" / "paris").after.read(Window(0, 0, 96, 120))]
    for frame in frames:
        a = ort.run([ort.prepare(frame)])[0]
        b = ov.run([ov.prepare(frame)])[0]
        assert np.abs(a - b).max() < 1e-4
        assert np.abs(a).max() > 1.0  # real logits, not an all-zero output
    ort.engine.close()
    ov.engine.close()


@pytest.mark.parametrize("bands", [4, 6])
@pytest.mark.parametrize(("kind", "backend"), [("int8-ort", "onnxruntime"),
                                               ("int8-ov", "openvino")])
def test_int8_bundles_find_the_clouds_of_held_out_human_masks(bands, kind, backend, test_data):
    # img[:128, :128] of the UKIS scene, which version 0.3 holds out whole
    crop = np.load(test_data / "ukis_6band_crop.npz")
    reflectance = np.moveaxis(crop["img"], -1, 0)[:bands]
    truth = crop["msk"][..., 0] == 4
    if backend == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is an optional engine")
    engine = open_engine(_bundle(bands, kind), backend, threads=2)
    predictor = Predictor(engine)
    x = engine.input_spec.normalise(reflectance / 1e-4)  # as DN, like the sensor delivers
    predicted = predictor.run([x])[0].argmax(0) == CLOUD
    recall = (predicted & truth).sum() / truth.sum()
    specificity = (~predicted & ~truth).sum() / (~truth).sum()
    # measured 0.899 / 0.900 (4 bands, ORT / OpenVINO) and 0.898 / 0.894 (6 bands)
    assert (recall + specificity) / 2 > 0.86
    engine.close()


def test_predict_on_the_sample_pass_with_the_committed_bundle(tmp_path, sample_pass):
    out = tmp_path / "clouds.tif"
    result = subprocess.run(["onboard", "predict", str(_bundle(4, "int8-ort")),
                             str(sample_pass / "imgs_1"), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cloud_fraction" in result.stdout
    with GeoTiffScene(out) as mask:
        values = mask.read_pixels(Window(0, 0, 256, 256))[0]
        assert mask.georef == OscdPair(sample_pass).before.georef
    assert set(np.unique(values)) <= {0, 1, 2}
    assert out.with_suffix(".png").exists()


def _heldout_ukis(shared_data):
    """The whole UKIS scene (human masks; version 0.3 trained on none of it) as reflectance and
    our labels, through the one remapping the model's data uses."""
    from onboard.models.cloud.dataset import ukis_scene

    return ukis_scene(shared_data)


def _boa(pred: np.ndarray, labels: np.ndarray) -> float:
    from onboard.models.cloud.metrics import scores

    return scores(pred, labels)["cloud_boa"]


def _ours_and_peer(shared_data, bands):
    pytest.importorskip("ukis_csmask", reason="the peer (ukis-csmask) is not installed")
    from onboard.models.cloud.evaluate import predict_csmask, predict_engine

    scene = _heldout_ukis(shared_data)
    got = {}
    for kind in ("fp32-ort", "int8-ort"):
        engine = open_engine(_bundle(bands, kind), "onnxruntime", threads=2)
        got[kind] = _boa(predict_engine(engine, scene.image[:bands]), scene.labels)
        engine.close()
    got["peer"] = _boa(predict_csmask(scene.image, bands), scene.labels)
    return got


@pytest.mark.slow
@pytest.mark.parametrize("bands", [4, 6])
def test_int8_bundle_on_the_held_out_scene_against_the_peer(shared_data, bands):
    """Measured here, in one run: the shipped INT8 bundle keeps its fp32 accuracy on the whole
    held-out UKIS scene, and stays within reach of ukis-csmask (results.md: 4-band 0.4 0.931,
    6-band 0.3 0.919, against 0.964 / 0.959; 4-band 0.3 scored 0.918 and fails here)."""
    got = _ours_and_peer(shared_data, bands)
    assert abs(got["int8-ort"] - got["fp32-ort"]) <= 0.005
    assert got["int8-ort"] >= {4: 0.925, 6: 0.90}[bands]
    assert got["int8-ort"] >= got["peer"] - {4: 0.04, 6: 0.06}[bands]


def test_the_4band_bundle_keeps_the_hazy_sample_clear(sample_pass):
    """The bundled sample is a hazy Hong Kong crop (a city no cloud model trained on) that is
    clear by the teacher. A 4-band candidate that scored better on UKIS called 40 % and 54 %
    of it cloud (hazy sea at 10 m) and was refused (card.md); the shipped INT8 bundle calls
    1.0 % and 5.9 % (bright roofs). The INT8 graph keeps the context path's activations float,
    without which it called 7 % of the held-out hongkong-1 date cloud."""
    engine = open_engine(_bundle(4, "int8-ort"), "onnxruntime", threads=2)
    pair = OscdPair(sample_pass)
    fractions = []
    for scene in (pair.before, pair.after):
        frame = scene.read(Window(0, 0, 256, 256))
        x = frame.pixels[[scene.bands.index(b) for b in ("B02", "B03", "B04", "B08")]]
        logits = engine.run(np.ascontiguousarray(x[None] * 1e-4, np.float32))
        fractions.append(float((np.asarray(logits)[0].argmax(0) == CLOUD).mean()))
    engine.close()
    assert fractions[0] < 0.03 and fractions[1] < 0.10, fractions


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 13's goal, not met: on the held-out UKIS scene the "
                   "INT8 bundles are 0.033 (4-band 0.4) and 0.040 (6-band 0.3) cloud BOA below "
                   "ukis-csmask (results.md)")
@pytest.mark.parametrize("bands", [4, 6])
def test_int8_bundle_beats_the_peer_on_the_held_out_scene(shared_data, bands):
    got = _ours_and_peer(shared_data, bands)
    assert got["int8-ort"] >= got["peer"]


def test_predict_runs_an_openvino_only_bundle_without_backend(tmp_path, sample_pass):
    pytest.importorskip("openvino", reason="OpenVINO is an optional engine")
    out = tmp_path / "clouds.tif"
    bundle = _bundle(4, "int8-ov")
    assert set(Bundle.open(bundle).manifest.engines) == {"openvino"}
    result = subprocess.run(["onboard", "predict", str(bundle), str(sample_pass / "imgs_1"),
                             "--out", str(out), "--no-png"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with GeoTiffScene(out) as mask:
        assert set(np.unique(mask.read_pixels(Window(0, 0, 256, 256))[0])) <= {0, 1, 2}
