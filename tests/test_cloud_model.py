"""The cloud model: size, trained weights, accuracy on held-out human masks, metrics, zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the cloud model is ground-side and needs torch")

from onboard.models import zoo  # noqa: E402
from onboard.models.cloud import dataset  # noqa: E402
from onboard.models.cloud.evaluate import (  # noqa: E402
    labelled_npz,
    load_model,
    predict_torch,
)
from onboard.models.cloud.metrics import binary_scores, boa, scores  # noqa: E402
from onboard.models.cloud.model import build, count_parameters, macs_per_pixel  # noqa: E402
from onboard.models.cloud.train import loss  # noqa: E402

# Measured on the committed weights (4-band 0.4.0, 6-band 0.3.0) minus a margin (results.md): the
# crop is part of the UKIS scene, which both versions hold out whole. The gate is deterministic
# (torch on fixed tiles): 4-band 0.3 measured 0.935 there and fails its bound.
CROP_MIN_BOA = {4: 0.86, 6: 0.85}  # measured 0.896 and 0.882
GATE_MIN_BOA = {4: 0.94, 6: 0.90}  # measured 0.943 and 0.922


@pytest.mark.parametrize("bands", [4, 6])
def test_small_enough_to_fly(bands):
    model = build(bands)
    assert count_parameters(model) <= 100_000
    assert macs_per_pixel(model) <= 2000
    out = model(torch.zeros(1, bands, 64, 96))
    assert out.shape == (1, 3, 64, 96)


@pytest.mark.parametrize("bands", [4, 6])
def test_trained_weights_load_and_are_small(bands):
    entry = zoo.get(f"cloud-{bands}band")
    assert entry.weights.exists(), entry.weights
    assert entry.weights.stat().st_size < 500_000
    model = entry.build()
    model.load_state_dict(torch.load(entry.weights, weights_only=True))


@pytest.mark.parametrize("bands", [4, 6])
def test_heldout_crop_boa(test_data, bands):
    # tests/data/ukis_6band_crop.npz is img[:128, :128] of the UKIS scene, held out whole.
    crop = labelled_npz(test_data / "ukis_6band_crop.npz")
    raw = np.load(test_data / "ukis_6band_crop.npz")["msk"][..., 0]
    assert np.array_equal(crop.labels == 2, raw == 0) and np.array_equal(crop.labels == 1, raw == 4)
    pred = predict_torch(load_model(bands), crop.image[:bands])
    assert scores(pred, crop.labels)["cloud_boa"] >= CROP_MIN_BOA[bands]


def test_labelled_npz_refuses_what_does_not_fit(test_data, tmp_path):
    crop = np.load(test_data / "ukis_6band_crop.npz")
    path = tmp_path / "four.npz"
    np.savez(path, img=crop["img"][..., :4], msk=crop["msk"])
    assert labelled_npz(path).image.shape == (4, 128, 128)
    np.savez(path, img=crop["img"][:64], msk=crop["msk"])
    with pytest.raises(ValueError, match="four.npz.*do not fit"):
        labelled_npz(path)


@pytest.mark.slow
@pytest.mark.parametrize("bands", [4, 6])
def test_gate_set_through_zoo(shared_data, bands):
    """The gate's tiles: >= 64 from >= 3 scenes, none a training or calibration scene, and the
    committed weights score there as results.md says."""
    entry = zoo.get(f"cloud-{bands}band")
    batches = entry.validation_batches(shared_data)
    names = entry.extra["gate_scenes"]()
    assert len(batches) == len(names) >= 3 and sum(len(x) for x, _ in batches) >= 64
    trained = {s.name for s in dataset.distillation_scenes(shared_data)}
    assert not trained & {n.split(" ")[0] for n in names}
    model = entry.build()
    model.load_state_dict(torch.load(entry.weights, weights_only=True))
    with torch.no_grad():
        outputs = [model(torch.from_numpy(x)).numpy() for x, _ in batches]
    assert entry.metric(outputs, [y for _, y in batches]) >= GATE_MIN_BOA[bands]


def test_distillation_never_touches_a_heldout_scene(shared_data):
    scenes = dataset.distillation_scenes(shared_data)
    assert not any(s.human for s in scenes)  # UKIS, the human-masked scene, is held out whole
    cities = {s.name.split("-")[1] for s in scenes if s.name.startswith("oscd")}
    assert len(cities) == len(dataset.oscd_cities(shared_data)) - len(dataset.OSCD_HELDOUT)
    assert len(dataset.OSCD_HELDOUT) >= 3 and not set(dataset.OSCD_HELDOUT) & cities
    ukis = dataset.ukis_scene(shared_data).image
    for scene in scenes:  # no training image is (a crop of) the UKIS scene
        assert scene.image.shape[1:] != ukis.shape[1:] or not np.allclose(scene.image, ukis)


def test_ukis_labels_remapped(shared_data):
    ukis = dataset.ukis_scene(shared_data)
    raw = np.load(shared_data / dataset.UKIS_FILE)["msk"][..., 0]
    assert np.array_equal(ukis.labels == 2, raw == 0)
    assert np.array_equal(ukis.labels == 1, raw == 4)
    assert np.array_equal(ukis.labels == 0, (raw == 1) | (raw == 3))


def test_binary_scores_by_hand():
    pred = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    s = binary_scores(pred, truth)
    # tp 2, fn 1, fp 1, tn 4: producer's accuracy 2/3 and 4/5.
    assert s["boa"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert s["f1"] == pytest.approx(4 / 6)
    assert s["iou"] == pytest.approx(2 / 4)


def test_scores_ignore_and_teacher_labels():
    labels = np.array([[1, 3, 2, 255], [0, 1, 3, 2]], np.uint8)
    pred = np.array([[1, 2, 2, 1], [0, 0, 0, 0]], np.uint8)
    s = scores(pred, labels)
    # Cloud on 7 labelled pixels: tp 1, fn 1, fp 0, tn 5.
    assert s["cloud_pixels"] == 7
    assert s["cloud_boa"] == pytest.approx((1 / 2 + 1) / 2)
    # Shadow only where labels know it (3 = clear-or-shadow is left out): 5 pixels, tp 1, fn 1.
    assert s["shadow_pixels"] == 5
    assert s["shadow_f1"] == pytest.approx(2 / 3)
    assert "shadow_f1" not in scores(pred, np.where(labels == 2, 3, labels))


def test_boa_accepts_logits_and_classes():
    labels = [np.array([[[1, 0], [0, 255]]], np.uint8)]
    logits = np.zeros((1, 3, 2, 2), np.float32)
    logits[0, 1, 0, 0] = 5.0
    assert boa([logits], labels) == 1.0
    assert boa([np.zeros((1, 2, 2), np.uint8)], labels) == 0.5


def test_loss_marginalises_teacher_labels():
    logits = torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    p = torch.softmax(logits, 1)[0, :, 0, 0]
    got = loss(logits, torch.tensor([[[3]]]))
    assert float(got) == pytest.approx(float(-torch.log(p[0] + p[2])), rel=1e-5)
    assert float(loss(logits, torch.tensor([[[1]]]))) == pytest.approx(float(-torch.log(p[1])))
    assert float(loss(logits, torch.tensor([[[255]]]))) == 0.0


def test_normalise_lever_z_scores_the_input_and_is_off_by_default():
    torch.manual_seed(0)
    plain = build(4)
    assert not plain.normalise
    mean, std = [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 2.0, 1.0]
    scored = build(4, input_mean=mean, input_std=std)
    scored.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(1, 4, 32, 32)
    z = (x - torch.tensor(mean).reshape(1, 4, 1, 1)) / torch.tensor(std).reshape(1, 4, 1, 1)
    with torch.no_grad():
        assert torch.allclose(scored(x), plain(z), atol=1e-5)
        assert not torch.allclose(scored(x), plain(x), atol=1e-3)


def test_soft_loss_is_the_hard_loss_on_one_hot_targets_and_follows_the_teacher():
    from onboard.models.cloud.train import soft_loss

    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]).T.reshape(1, 3, 1, 2)
    labels = torch.tensor([[[1, 2]]])
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    assert float(soft_loss(logits, labels, one_hot)) == pytest.approx(float(loss(logits, labels)))
    # Against a teacher unsure between clear and cloud, the loss is lowest where the student
    # is unsure too, not where it copies the argmax.
    teacher = torch.tensor([0.45, 0.55, 0.0]).reshape(1, 3, 1, 1)
    unsure = torch.log(torch.tensor([0.45, 0.55, 1e-6])).reshape(1, 3, 1, 1)
    sure = torch.log(torch.tensor([0.01, 0.99 - 1e-6, 1e-6])).reshape(1, 3, 1, 1)
    one = torch.tensor([[[1]]])
    assert float(soft_loss(unsure, one, teacher)) < float(soft_loss(sure, one, teacher))
    assert float(soft_loss(sure, torch.tensor([[[255]]]), teacher)) == 0.0


def test_soft_batches_carry_the_teachers_probabilities(shared_data):
    """Every view of a teacher scene keeps its probabilities aligned with its labels (the
    argmax), through crops, turns, flips, pooling and repeats."""
    scenes = [dataset.s2cloudless_distilled(shared_data),
              dataset.oscd_distilled("saclay_w", 1, shared_data)]
    fine = {"oscd-saclay_w-1": dataset.oscd_csmask("saclay_w", 1, shared_data)[0]}
    sampler = dataset.TileSampler(scenes, 4, tile=64, fine=fine, finer=(2,))
    assert all(v.soft is not None and v.soft.shape[1:] == v.labels.shape
               for v in sampler.teacher)
    x, y, p = sampler.soft_batch(12)
    assert p.shape == (12, 3, 64, 64) and np.allclose(p.sum(1), 1.0, atol=0.02)
    sure = (y != dataset.IGNORE) & (p.max(1) > 0.9)
    assert sure.mean() > 0.5 and (p.argmax(1)[sure] == y[sure]).all()
    # The hard batches are unchanged by the soft path: same seed, same tiles.
    again = dataset.TileSampler(scenes, 4, tile=64, fine=fine, finer=(2,))
    hx, hy = again.batch(12)
    assert np.array_equal(hx, x) and np.array_equal(hy, y)


@pytest.mark.parametrize("name,bands", [("cloud-4band", 4), ("cloud-6band", 6)])
def test_zoo_entries_agree_with_the_shipped_bundles(name, bands):
    """What the compiler would write for the entry is what the flight bundles declare."""
    from onboard.runtime.bundle import Bundle

    entry = zoo.get(name)
    assert len(entry.bands) == bands and entry.card is not None and entry.card.exists()
    found = sorted((Path(entry.weights).parent).glob(f"{name}-*.onboard"))
    # The loop below checks nothing unless the shipped bundles are there to read.
    shipped = {f"{name}-{variant}.onboard" for variant in ("fp32-ort", "int8-ort", "int8-ov")}
    names = {bundle.name for bundle in found}
    assert shipped <= names, f"shipped bundles missing: {sorted(shipped - names)}"
    for bundle in found:
        manifest = Bundle.open(bundle).manifest
        assert manifest.task == entry.task and manifest.version == entry.version, bundle.name
        assert manifest.input.bands == entry.bands and manifest.input.scale == entry.input_scale
        assert manifest.input.offset == entry.input_offset
        assert manifest.input.tile_size == entry.tile_size
        assert manifest.output.kind == entry.output_kind
        assert manifest.output.classes == entry.classes


def test_the_one_exporter_matches_torch(tmp_path, test_data):
    # compile.export is the exporter of the shipped bundles, and of the published numbers.
    ort = pytest.importorskip("onnxruntime")
    from onboard.compile.export import export_onnx

    model = load_model(6)
    crop = np.load(test_data / "ukis_6band_crop.npz")["img"].transpose(2, 0, 1)[None]
    x = np.ascontiguousarray(crop, np.float32)
    path = export_onnx(model, torch.from_numpy(x[:, :, :64, :64]), tmp_path / "cloud.onnx",
                       dynamic_size=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-3
    assert {n.op_type for n in __import__("onnx").load(str(path)).graph.node} <= {
        "Conv", "Relu", "Add", "Concat", "Resize", "AveragePool", "Constant"}
    import onboard.models.change.model as change_module
    import onboard.models.cloud.model as model_module

    assert not hasattr(model_module, "export_onnx")
    assert not hasattr(change_module, "export_onnx")


def test_teacher_labels_from_probability():
    prob = np.zeros((300, 300), np.float32)
    prob[20:60, 20:60] = 0.9  # a cloud
    prob[150, 150] = 1.0  # a bright speck: averaged away
    prob[250:290, 250:290] = 0.4  # uncertain
    labels = dataset.labels_from_probability(prob)
    assert labels[40, 40] == dataset.CLOUD
    assert labels[150, 150] == dataset.CLEAR or labels[150, 150] == dataset.NOT_CLOUD
    assert labels[270, 270] == dataset.IGNORE
    # Near the cloud a shadow may fall: clear or shadow; beyond SHADOW_REACH_PX it is clear.
    assert labels[100, 40] == dataset.NOT_CLOUD
    far = dataset.labels_from_probability(np.pad(prob[:100, :100], ((0, 200), (0, 200))))
    assert far[299, 299] == dataset.CLEAR
    valid = np.ones_like(prob, bool)
    valid[0, 0] = False
    assert dataset.labels_from_probability(prob, valid)[0, 0] == dataset.IGNORE


def test_csmask_teacher_labels():
    prob = np.zeros((3, 4, 4), np.float32)
    prob[0] = 1.0
    prob[:, 0, 0] = (0.1, 0.8, 0.1)  # sure cloud
    prob[:, 0, 1] = (0.1, 0.3, 0.6)  # shadow, just sure enough
    prob[:, 0, 2] = (0.45, 0.1, 0.45)  # unsure
    valid = np.ones((4, 4), bool)
    valid[3, 3] = False
    labels = dataset.csmask_labels(prob, valid)
    assert labels[0, 0] == dataset.CLOUD and labels[0, 1] == dataset.SHADOW
    assert labels[0, 2] == dataset.IGNORE and labels[3, 3] == dataset.IGNORE
    assert labels[2, 2] == dataset.CLEAR


def test_sensor_augment_changes_what_a_sensor_would(test_data):
    crop = labelled_npz(test_data / "ukis_6band_crop.npz").image
    rng = np.random.default_rng(0)
    plain = dataset.SensorAugment.none()(crop, rng)
    # 0.2's augmentation is a gain per band: band ratios per pixel stay put.
    ratio = plain / np.maximum(crop, 1e-6)
    assert np.allclose(ratio, ratio[:, :1, :1], rtol=1e-4)
    strong = dataset.SensorAugment(haze_p=1.0, coarse_p=1.0)
    x = strong(crop, rng)
    assert x.shape == crop.shape and x.dtype == np.float32 and np.isfinite(x).all()
    # Resampled from a 2x coarser grid: 2 x 2 blocks equal up to the noise.
    assert np.abs(x[:, 0::2, 0::2] - x[:, 1::2, 1::2]).mean() < 0.02
    assert np.abs(crop[:, 0::2, 0::2] - crop[:, 1::2, 1::2]).mean() > 0.005


def test_sampler_tiles_at_several_pixel_sizes(shared_data):
    scenes = [dataset.s2cloudless_distilled(shared_data),
              dataset.oscd_distilled("saclay_w", 1, shared_data)]
    fine = {"oscd-saclay_w-1": dataset.oscd_csmask("saclay_w", 1, shared_data)[0]}
    sampler = dataset.TileSampler(scenes, 4, tile=64, augment=dataset.SensorAugment(),
                                  fine=fine, cloudy_share=0.5)
    names = [s.name for s in sampler.teacher]
    assert {"oscd-saclay_w-1", "oscd-saclay_w-1/fine", "oscd-saclay_w-1/2",
            "s2cloudless-13band", "s2cloudless-13band/2"} <= set(names)
    cloudy = sum(p for s, p in zip(sampler.teacher, sampler.teacher_p, strict=True)
                 if s.name.startswith("s2cloudless"))
    assert cloudy == pytest.approx(0.5)
    x, y = sampler.batch(6)
    assert x.shape == (6, 4, 64, 64) and x.dtype == np.float32
    assert y.shape == (6, 64, 64) and set(np.unique(y)) <= {0, 1, 2, 255}


def test_sampler_refuses_test_scenes():
    """No path feeds UKIS (or any human-labelled) pixels into training: the sampler refuses them
    whatever their labels, and the 0.2 recipe's options are gone from the command line."""
    from onboard.models.cloud.train import main
    from onboard.runtime.errors import OnboardError

    image, labels = np.zeros((6, 64, 64), np.float32), np.zeros((64, 64), np.uint8)
    teacher = dataset.LabelledScene("oscd-abudhabi-1", image, labels, 30.0, human=False)
    assert len(dataset.TileSampler([teacher], 4, tile=64).teacher) >= 1
    for scene in (dataset.LabelledScene("ukis", image, labels, 30.0, human=True),
                  dataset.LabelledScene("ukis@60m", image, labels, 60.0, human=False),
                  dataset.LabelledScene("landsat7", image, labels, 30.0, human=True)):
        with pytest.raises(OnboardError, match=f"never training data: {scene.name}"):
            dataset.TileSampler([teacher, scene], 4, tile=64)
    for removed in (["--recipe", "human"], ["--tune-rows", "96"], ["--human-share", "0.5"]):
        with pytest.raises(SystemExit):
            main(["--bands", "4", *removed])


def test_sampler_views_each_scene_at_other_pixel_sizes_unless_told_not_to():
    """By default a 30 m scene is also seen at 60 m (and a 10 m one at 20 and 30 m), labels
    pooled with it; ``pixel_sizes=False`` (train --one-pixel-size, a measured lever) keeps only
    the scene's own grid."""
    rng = np.random.default_rng(0)
    image = rng.random((6, 256, 256)).astype(np.float32)
    labels = (rng.random((256, 256)) < 0.3).astype(np.uint8) * dataset.CLOUD
    views = {}
    for gsd in (30.0, 10.0):
        scene = dataset.LabelledScene("oscd-abudhabi-1", image, labels, gsd, human=False)
        views[gsd] = {(v.gsd_m, v.labels.shape) for v in
                      dataset.TileSampler([scene], 4, tile=64).teacher}
        only = dataset.TileSampler([scene], 4, tile=64, pixel_sizes=False).teacher
        assert [(v.gsd_m, v.labels.shape) for v in only] == [(gsd, (256, 256))]
    assert views[30.0] == {(30.0, (256, 256)), (60.0, (128, 128))}
    assert views[10.0] == {(10.0, (256, 256)), (20.0, (128, 128)), (30.0, (85, 85))}


def test_sampler_sees_a_coarse_scene_finer_when_told():
    """``finer`` (train --finer): a scene coarser than 30 m (the 73 m 13-band one) is also seen
    on 2x and 3x finer grids, bilinear, its labels repeated; a 30 m scene is not."""
    rng = np.random.default_rng(0)
    image = rng.random((6, 64, 64)).astype(np.float32)
    labels = (rng.random((64, 64)) < 0.3).astype(np.uint8) * dataset.CLOUD
    coarse = dataset.LabelledScene("s2cloudless-13band", image, labels, 73.0, human=False)
    views = {v.name: v for v in dataset.TileSampler([coarse], 4, tile=32, finer=(2, 3)).teacher}
    assert set(views) == {"s2cloudless-13band", "s2cloudless-13band/x2",
                          "s2cloudless-13band/x3", "s2cloudless-13band/2"}
    x3 = views["s2cloudless-13band/x3"]
    assert x3.gsd_m == pytest.approx(73.0 / 3) and x3.image.shape == (6, 192, 192)
    assert np.array_equal(x3.labels[1::3, 1::3], labels)
    # Bilinear with pixel centres kept: the centre of each 3 x 3 block is the coarse pixel.
    assert np.allclose(x3.image[:, 1::3, 1::3], image, atol=1e-6)
    assert not np.allclose(x3.image[:, 0::3, 0::3], image, atol=1e-3)
    thirty = dataset.LabelledScene("oscd-abudhabi-1", image, labels, 30.0, human=False)
    assert {v.gsd_m for v in dataset.TileSampler([thirty], 4, tile=32, finer=(2, 3)).teacher} \
        == {30.0, 60.0}


def test_thirteen_band_scene_pixel_size(shared_data):
    """The 13-band scene is sentinelhub-py's Betsiboka request (bbox 0.35 x 0.57 degrees at 512 x
    856 px): about 73 m a pixel, so the teacher's smoothing disk shrinks to one pixel there."""
    scene = dataset.s2cloudless_scene(shared_data)
    assert scene.image.shape[1:] == (856, 512) and scene.gsd_m == dataset.S2C_GSD_M
    km_per_degree_lon = 111.32 * np.cos(np.radians(15.865))
    assert 0.35 * km_per_degree_lon * 1000 / 512 == pytest.approx(scene.gsd_m, rel=0.01)
    assert 0.57 * 110.6 * 1000 / 856 == pytest.approx(scene.gsd_m, rel=0.01)
    speck = np.zeros((64, 64))
    speck[32, 32] = 1.0  # one bright pixel: averaged away at either pixel size
    assert (dataset.labels_from_probability(speck) == dataset.CLOUD).sum() == 0
    assert (dataset.labels_from_probability(speck, gsd_m=73.0) == dataset.CLOUD).sum() == 0
    block = np.zeros((64, 64))
    block[30:35, 30:35] = 1.0  # a 5-pixel cloud: a speck at 10 m, 365 m of cloud at 73 m
    assert (dataset.labels_from_probability(block) == dataset.CLOUD).sum() < 10
    assert (dataset.labels_from_probability(block, gsd_m=73.0) == dataset.CLOUD).sum() >= 20


def test_missing_data_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="ukis_sentinel2_6band.npz"):
        dataset.ukis_scene(tmp_path)
    with pytest.raises(ValueError, match="oscd"):
        dataset.oscd_cities(tmp_path)


def test_calibration_tiles_from_training_split(shared_data):
    entry = zoo.get("cloud-6band")
    tiles = entry.calibration_tiles(shared_data, 4)
    assert tiles.shape == (4, 6, 128, 128) and tiles.dtype == np.float32
    assert np.isfinite(tiles).all()
    # Even tiles come from the 13-band training scene: found there, and not in UKIS.
    image = dataset.s2cloudless_scene(shared_data).image
    corner = tiles[0, :, 0, 0]
    assert np.any(np.all(image.transpose(1, 2, 0) == corner, axis=2))
    ukis = dataset.ukis_scene(shared_data).image
    for tile in tiles:
        assert not np.any(np.all(ukis.transpose(1, 2, 0) == tile[:, 0, 0], axis=2))


def test_synthetic_clouds_label_what_they_composite(shared_data):
    from onboard.models.cloud.synthetic import SyntheticClouds, fractal_noise

    rng = np.random.default_rng(0)
    noise = fractal_noise(64, rng, beta=2.5)
    assert noise.shape == (64, 64) and abs(noise.mean()) < 1e-4 and noise.std() == pytest.approx(1)
    clouds = SyntheticClouds.from_scene(dataset.s2cloudless_distilled(shared_data))
    # Thick-cloud spectra from the 13-band scene: bright, SWIR falling (water droplets absorb).
    assert clouds.spectra[:, 0].min() >= 0.35
    assert np.median(clouds.spectra[:, 5] / clouds.spectra[:, 0]) < 0.8
    ground = dataset.oscd_distilled("saclay_w", 1, shared_data)  # clear by the teacher
    x0 = ground.image[:, :128, :128].copy()
    y0 = ground.labels[:128, :128].copy()
    y0[:8] = dataset.IGNORE  # as if the teacher had been unsure there
    seen = {dataset.CLOUD: 0, dataset.SHADOW: 0}
    for seed in range(12):
        x, y = clouds(x0, y0, np.random.default_rng(seed))
        assert x.shape == x0.shape and x.dtype == np.float32 and np.isfinite(x).all()
        assert set(np.unique(y)) <= {dataset.CLEAR, dataset.CLOUD, dataset.SHADOW,
                                     dataset.NOT_CLOUD, dataset.IGNORE}
        cloud, shadow = y == dataset.CLOUD, y == dataset.SHADOW
        if cloud.sum() > 50:
            # At least cloud_alpha of a >= 0.28-blue cloud over a ~0.1 ground: brighter.
            assert (x[0][cloud] - x0[0][cloud]).mean() > 0.06
        if shadow.sum() > 50:
            assert (x[3][shadow] / np.maximum(x0[3][shadow], 1e-3)).mean() < 0.85
        # What stays clear is nearly untouched; what the teacher left out stays out.
        clear = y == dataset.CLEAR
        assert np.abs(x[:, clear] - x0[:, clear]).mean() < 0.02
        assert (y[(y0 == dataset.IGNORE) & ~cloud] == dataset.IGNORE).all()
        for value in seen:
            seen[value] += int((y == value).sum())
    assert seen[dataset.CLOUD] > 0 and seen[dataset.SHADOW] > 0
