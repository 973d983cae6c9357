"""Super-resolution: the shipped ×2 and sharpening bundles in the flight runtime, on real data.

The bundles are checked against their torch models on a real crop (the bundled Hong Kong
sample); tiled runs against one whole-image run (PSNR within 0.05 dB against the truth, Wald's
protocol); the held-out gain over bicubic and detail injection on the shared data (skipped
without it); ``onboard predict`` for both, streamed over several tiles against one
whole-image run (georeferencing at the new pixel size, the folder's finest grid); the
``superres`` product kind with its STAC Item; the ``[superres]`` section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pystac.validation import validate_dict
from stac_pydantic import Item as PydanticItem

from onboard.models.superres import dataset, metrics
from onboard.models.superres.evaluate import bundle_path, load_model
from onboard.runtime.cli import main as cli
from onboard.runtime.config import load_config
from onboard.runtime.downlink.products import ProductConfig, ProductMaker, write_geotiff
from onboard.runtime.downlink.stac import make_item
from onboard.runtime.engines import open_engine
from onboard.runtime.scores import TileScore
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdScene
from onboard.runtime.stages.superres import LazySuperResolver, SuperResConfig, SuperResolver
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong" / "imgs_1"
X2_BANDS = ("B02", "B03", "B04", "B08")
SHARPEN_BANDS = ("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12")


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    """The sample's ten 10 m and 20 m bands on its 10 m grid (20 m nearest), DN float32."""
    scene = OscdScene(SAMPLE, SHARPEN_BANDS)
    return scene.read(Window(0, 0, scene.height, scene.width)).pixels.astype(np.float32)


def _engine(task: str, precision: str):
    return open_engine(bundle_path(task, precision), "onnxruntime", threads=2)


def _torch(task: str, x: np.ndarray) -> np.ndarray:
    torch.set_num_threads(2)
    with torch.no_grad():
        return load_model(task)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("task", ["x2", "sharpen"])
def test_bundles_match_their_torch_model_on_a_real_crop(task, sample):
    x = (sample[:4] if task == "x2" else sample)[None, :, :128, :128] * 1e-4
    reference = _torch(task, x)
    for precision in ("fp32", "int8"):
        engine = _engine(task, precision)
        try:
            assert engine.manifest.task == "superres"
            assert engine.output_spec.kind == "values"
            assert engine.output_spec.scale_factor == (2 if task == "x2" else 1)
            out = engine.run(np.ascontiguousarray(x, np.float32))
        finally:
            engine.close()
        assert out.shape == reference.shape
        if precision == "fp32":
            assert np.abs(out - reference).max() < 1e-4  # 1 DN
        else:
            # INT8 against fp32 on the same crop, as PSNR at peak 10000 DN.
            assert metrics.psnr(out * 1e4, reference * 1e4, 1e4) > 50.0


@pytest.mark.parametrize("task", ["x2", "sharpen"])
def test_int8_graph_keeps_the_skip_and_the_output_in_float(task):
    """The QDQ graph ends in a float Sub of skip and residual: no QuantizeLinear on the output,
    none on the raw input (see models/superres/model.py)."""
    from onboard.runtime.bundle import Bundle

    bundle = Bundle.open(bundle_path(task, "int8"))
    graph = onnx.load_from_string(bundle.read(bundle.manifest.engines["onnxruntime"])).graph
    producers = {out: node for node in graph.node for out in node.output}
    assert producers[graph.output[0].name].op_type == "Sub"
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == graph.input[0].name
                   for n in graph.node)
    if task == "x2":
        assert any(n.op_type == "DepthToSpace" for n in graph.node)
    else:
        # The window fit (Mul, Div and Sqrt on covariances) and the share of its detail in the
        # skip read float tensors: only the body's nodes read dequantised ones, and outside it
        # only the residual's scaling into the last Sub (the residual is the body's output).
        dequantised = {out for n in graph.node if n.op_type == "DequantizeLinear"
                       for out in n.output}
        readers = [n for n in graph.node if set(n.input) & dequantised]
        outside = [n for n in readers if not n.name.startswith("/body/")]
        last = producers[graph.output[0].name]
        assert len(readers) > 6 and len(outside) == 1, [n.name for n in outside]
        assert outside[0].op_type == "Div" and outside[0].output[0] in last.input
        assert any(n.op_type == "Sqrt" for n in graph.node)  # the fit is in the graph


def _psnr_mean(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(metrics.psnr_bands(estimate, truth, 1e4)))


@pytest.mark.parametrize("task", ["x2", "sharpen"])
def test_tiled_run_equals_a_whole_image_run(task, sample):
    """Wald's protocol on the sample: the streamed, tiled run (64-pixel tiles here, many seams)
    scores the same PSNR against the truth as one whole-image run, within 0.05 dB."""
    from onboard.models.superres.dataset import Scene
    from onboard.runtime.frame import Frame

    scene = Scene("sample", sample[:4], sample[4:, ::2, ::2])
    x, truth = (dataset.x2_pair if task == "x2" else dataset.sharpen_pair)(scene)
    engine = _engine(task, "int8")
    try:
        whole = engine.run(np.ascontiguousarray(x[None] * 1e-4))[0] * 1e4
        resolver = SuperResolver(engine, overlap=32)
        resolver.tile = 64  # the bundle's graph takes any size: force many tiles and seams
        bands = X2_BANDS if task == "x2" else SHARPEN_BANDS
        frame = Frame(np.rint(x).astype(np.uint16), bands, 10.0)
        tiled = resolver.upsample(frame).pixels.astype(np.float32)
    finally:
        engine.close()
    whole_psnr, tiled_psnr = _psnr_mean(whole, truth), _psnr_mean(tiled, truth)
    assert abs(whole_psnr - tiled_psnr) < 0.05, (whole_psnr, tiled_psnr)


def test_heldout_gain_over_bicubic_and_detail_injection(shared_data):
    """Malmö (held out): ×2 and sharpening by the INT8 bundles against PIL bicubic and
    detail injection, measured here. The bounds are what the shipped models reach, below the
    issue's goals (×2 +1.5 dB, sharpening +8 dB and above detail injection on every band;
    see models/superres/results.md): on Malmö detail injection still wins on B05 (by 2 dB)
    and on B06, B07 and B8A (by up to 0.3 dB)."""
    scene = dataset.load(shared_data, dataset.MALMO)
    x, truth = dataset.x2_pair(scene)
    engine = _engine("x2", "int8")
    ours = engine.run(np.ascontiguousarray(x[None] * 1e-4))[0] * 1e4
    engine.close()
    gain = _psnr_mean(ours, truth) - _psnr_mean(metrics.resize(x, 2), truth)
    assert gain > 1.0, gain
    x, truth = dataset.sharpen_pair(scene)
    coarse = dataset.area_down(truth)
    engine = _engine("sharpen", "int8")
    ours = engine.run(np.ascontiguousarray(x[None] * 1e-4))[0] * 1e4
    engine.close()
    model = np.array(metrics.psnr_bands(ours, truth, 1e4))
    bicubic = np.array(metrics.psnr_bands(metrics.resize(coarse, 2), truth, 1e4))
    injected = np.array(metrics.psnr_bands(metrics.detail_injection(coarse, x[:4]), truth, 1e4))
    assert (model - bicubic).mean() > 4.0, model - bicubic  # 0.1 reached 3.2
    # The SWIR bands, where the linear injection of visible texture fails, by a wide margin;
    # the red edge and NIR bands within 2.2 dB of it (0.1 was 1.4 to 3.8 dB below).
    assert (model[4:] > injected[4:] + 4.0).all(), (model, injected)
    assert (model[:4] > injected[:4] - 2.2).all(), (model, injected)


def _whole_image_run(task: str, dn: np.ndarray, bands: tuple[str, ...]) -> np.ndarray:
    """The INT8 bundle's engine once on the whole array, no tiles, with the runtime's own DN
    conversions: what a streamed run has to reproduce."""
    from onboard.runtime.frame import Frame

    engine = _engine(task, "int8")
    try:
        return SuperResolver(engine).whole_image(Frame(dn, bands, 20.0)).astype(np.float32)
    finally:
        engine.close()


def _read(path: Path) -> tuple[np.ndarray, GeoTiffScene]:
    with GeoTiffScene(path) as tif:
        return tif.read_pixels(Window(0, 0, tif.height, tif.width)).astype(np.float32), tif


def test_predict_writes_a_georeferenced_x2_geotiff(tmp_path, sample, capsys):
    """Wald's protocol on the sample: its 10 m bands averaged to 20 m, as a GeoTIFF at 20 m.
    ``onboard predict`` streams it in 64-pixel tiles (3 x 3, overlap 32, so six seams cross
    it) and writes the ×2 image on the original 10 m grid, within 1 DN of one engine run on
    the whole array, at the same PSNR against the truth (0.05 dB), and above bicubic by more
    than a nearest-neighbour or bicubic model could be. At the bundle's own tile (128), the
    whole 256² sample streams in 3 x 3 tiles, again within 1 DN of the whole-image run."""
    from onboard.runtime.georef import Georef

    georef = OscdScene(SAMPLE, X2_BANDS).georef
    truth = sample[:4]
    dn = np.rint(dataset.area_down(truth)).astype(np.uint16)
    src = tmp_path / "rgbn20.tif"
    write_geotiff(src, dn, ["blue", "green", "red", "nir"],
                  Georef(georef.crs, georef.transform.scaled(0.5)))
    out = tmp_path / "x2.tif"
    assert cli(["predict", str(bundle_path("x2", "int8")), str(src), "--out", str(out),
                "--bands", "blue,green,red,nir", "--tile", "64"]) == 0
    assert "tiles 9/9" in capsys.readouterr().err
    streamed, sr = _read(out)
    assert streamed.shape == (4, 256, 256) and sr.bands == ("blue", "green", "red", "nir")
    t, t0 = sr.georef.transform, georef.transform
    assert (t.c, t.f) == (t0.c, t0.f)
    assert t.a == pytest.approx(t0.a) and t.e == pytest.approx(t0.e)  # back on the 10 m grid
    whole = _whole_image_run("x2", dn, X2_BANDS)
    assert np.abs(streamed - whole).max() <= 1.0
    psnr = _psnr_mean(streamed, truth)
    assert abs(psnr - _psnr_mean(whole, truth)) < 0.05
    assert psnr - _psnr_mean(metrics.resize(dn.astype(np.float32), 2), truth) > 1.0  # 1.96 here
    # The flight default: the bundle's tile, on the 256² sample itself.
    src = tmp_path / "rgbn.tif"
    full = np.rint(truth).astype(np.uint16)
    write_geotiff(src, full, ["blue", "green", "red", "nir"], georef)
    assert cli(["predict", str(bundle_path("x2", "int8")), str(src), "--out", str(out),
                "--bands", "blue,green,red,nir"]) == 0
    assert "tiles 9/9" in capsys.readouterr().err
    streamed, _ = _read(out)
    assert streamed.shape == (4, 512, 512)
    assert np.abs(streamed - _whole_image_run("x2", full, X2_BANDS)).max() <= 1.0


def test_predict_sharpens_a_band_folder_on_its_finest_grid(tmp_path, sample, capsys):
    """Wald's protocol on the sample as an OSCD-style folder: the 10 m bands averaged to 20 m,
    the 20 m bands to 40 m, one GeoTIFF per band at its own resolution (the ten bands, no 60 m
    ones). ``onboard predict`` in 64-pixel tiles (5 x 5; the overlap grows to 48, twice the
    context the bundle states) writes the six sharpened bands on the folder's finest grid,
    within 1 DN of one engine run on the whole array, at the same PSNR against the original
    20 m bands (0.05 dB), well above bicubic. The sample's own folder (13 bands, 10 m) gives
    the six bands on its 10 m grid."""
    from onboard.models.superres.dataset import nearest_up
    from onboard.runtime.georef import Georef

    scene = OscdScene(SAMPLE, SHARPEN_BANDS)
    georef = scene.georef
    truth = sample[4:, ::2, ::2]  # the 20 m bands at 20 m
    fine = np.rint(dataset.area_down(sample[:4])).astype(np.uint16)
    coarse = np.rint(dataset.area_down(truth)).astype(np.uint16)
    folder = tmp_path / "wald"
    folder.mkdir()
    grid20 = Georef(georef.crs, georef.transform.scaled(0.5))
    for band, pixels in zip(X2_BANDS, fine, strict=True):
        write_geotiff(folder / f"wald_{band}.tif", pixels[None], [band], grid20)
    for band, pixels in zip(SHARPEN_BANDS[4:], coarse, strict=True):
        write_geotiff(folder / f"wald_{band}.tif", pixels[None], [band],
                      Georef(georef.crs, georef.transform.scaled(0.25)))
    out = tmp_path / "sharp.tif"
    assert cli(["predict", str(bundle_path("sharpen", "int8")), str(folder), "--out", str(out),
                "--tile", "64"]) == 0
    assert "tiles 25/25" in capsys.readouterr().err
    streamed, sr = _read(out)
    assert streamed.shape == (6, 128, 128)
    assert sr.georef == grid20 and sr.bands == SHARPEN_BANDS[4:]
    whole = _whole_image_run("sharpen", np.concatenate([fine, nearest_up(coarse)]),
                             SHARPEN_BANDS)
    assert np.abs(streamed - whole).max() <= 1.0
    psnr = _psnr_mean(streamed, truth)
    assert abs(psnr - _psnr_mean(whole, truth)) < 0.05
    assert psnr - _psnr_mean(metrics.resize(coarse.astype(np.float32), 2), truth) > 3.0  # 5.3
    # The sample's own folder: every band file, the six sharpened on its 10 m grid.
    assert cli(["predict", str(bundle_path("sharpen", "int8")), str(SAMPLE), "--out",
                str(out)]) == 0
    streamed, sr = _read(out)
    assert streamed.shape == (6, scene.height, scene.width) and sr.georef == georef
    assert sr.bands == SHARPEN_BANDS[4:]


def test_predict_tile_is_for_superres_bundles_and_keeps_the_context(tmp_path, capsys):
    """``--tile`` picks the tile of a super-resolution bundle, whose graph takes any size; a
    classifier runs at its own tile, and a tile no wider than the overlap the bundle's context
    needs would leave seams, so both are refused before anything is written."""
    cloud = Path(__file__).resolve().parents[1] / "models" / "cloud" / \
        "cloud-4band-int8-ort.onboard"
    out = tmp_path / "out.tif"
    assert cli(["predict", str(cloud), str(SAMPLE), "--out", str(out), "--tile", "64"]) == 1
    assert "--tile is for super-resolution bundles" in capsys.readouterr().err
    assert cli(["predict", str(bundle_path("sharpen", "int8")), str(SAMPLE), "--out", str(out),
                "--tile", "48"]) == 1
    assert "wider than the overlap (48 pixels)" in capsys.readouterr().err
    assert not out.exists()


def test_superres_product_kind_with_its_stac_item(tmp_path):
    config = SuperResConfig(bundle=bundle_path("x2", "int8"), threads=2)
    lazy = LazySuperResolver(config)
    assert not lazy.opened  # nothing loads until a superres product is made
    maker = ProductMaker(ProductConfig(kinds=("full", "superres")))
    scene = OscdScene(SAMPLE, X2_BANDS)
    core = Window(64, 128, 64, 64)
    frame = scene.read(core)
    estimate = maker.estimate_bytes("superres", frame)
    product = lazy.make_product(maker, scene, core)
    assert lazy.opened
    lazy.close()
    assert product.kind == "superres" and product.shape == (128, 128)
    assert product.metadata["bands"] == list(X2_BANDS) and product.metadata["scale_factor"] == 2
    assert product.metadata["bundle"] == "superres-x2@0.1.0"  # what made it, from its manifest
    assert 0.3 < product.size / estimate < 3.0, (product.size, estimate)
    t, t0 = product.georef.transform, frame.georef.transform
    assert (t.c, t.f) == pytest.approx((t0.c, t0.f))
    assert t.a == pytest.approx(t0.a / 2)
    # After one product the size model has measured the kind.
    assert maker.sizes.made["superres"] == 1
    path = product.write(tmp_path / "p.tif")
    with GeoTiffScene(path) as tif:
        assert (tif.count, tif.height, tif.width) == (4, 128, 128)
    score = TileScore("hongkong/64_128", "hongkong", (64, 128, 64, 64))
    item = make_item(product, score, item_id="hongkong-64_128-superres", href="p.tif")
    # The core Item schema ships in pystac (the extension schemas would need the network;
    # tests/test_stac.py checks those for every kind's fields offline).
    validate_dict({**item, "stac_extensions": []})
    PydanticItem.model_validate(item)
    assert item["properties"]["proj:shape"] == [128, 128]
    assert item["properties"]["onboard:bundles"] == ["superres-x2@0.1.0"]


def test_superres_is_a_config_section_not_a_stage(tmp_path):
    from onboard.runtime.stages import registered_stages

    path = tmp_path / "onboard.toml"
    path.write_text(f'[superres]\nbundle = "{bundle_path("x2", "int8")}"\nbatch = 2\n'
                    '[products]\nkinds = ["thumbnail", "superres"]\n')
    config = load_config(path)
    assert isinstance(config.section("superres"), SuperResConfig)
    assert config.section("superres").batch == 2
    assert "superres" in config.section("products").kinds
    assert "superres" not in {spec.name for spec in registered_stages()}
    assert "superres" not in ProductConfig().kinds  # only when a config asks for it


def test_guided_sharpening_reads_exactly_the_context_its_bundle_states(sample):
    """The fp32 bundle, on a real crop: a change to one input pixel moves outputs up to the
    stated context away and none beyond it, so a resolver whose overlap and halo cover the
    context stitches tiles that agree with a whole-image run."""
    from onboard.models.superres import SHARPEN_CONTEXT

    engine = _engine("sharpen", "fp32")
    try:
        assert engine.manifest.extra["superres"]["context"] == SHARPEN_CONTEXT
        resolver = SuperResolver(engine, overlap=8, halo=4)
        assert resolver.overlap >= 2 * SHARPEN_CONTEXT and resolver.halo >= SHARPEN_CONTEXT
        x = np.ascontiguousarray(sample[None, :, :128, :128] * 1e-4)
        poked = x.copy()
        poked[0, :, 64, 64] += 0.05  # 500 DN in every band at one pixel
        moved = np.abs(engine.run(poked) - engine.run(x)).max(axis=(0, 1))
    finally:
        engine.close()
    rows, cols = np.nonzero(moved > 0)  # outside the reach the same float ops run on the same data
    reach = int(max(np.abs(rows - 64).max(), np.abs(cols - 64).max()))
    assert reach <= SHARPEN_CONTEXT, reach
    assert reach >= SHARPEN_CONTEXT - 2, reach  # stated tightly, not padded


def test_guided_sharpening_of_flat_and_saturated_tiles_is_finite():
    """A cloud deck (every band one value) gives no fit to noise: the output is the 20 m
    value itself; a saturated block beside texture stays finite, the texture sharpened."""
    engine = _engine("sharpen", "int8")
    try:
        flat = np.full((1, 10, 256, 256), 0.6, np.float32)
        out = engine.run(flat)
        assert np.isfinite(out).all()
        inner = out[:, :, 32:-32, 32:-32]  # away from the convolutions' zero padding
        # Within 3 INT8 output steps (1.7e-3 each): the integer kernels differ by CPU. On the
        # AMD EPYC of session 10, B8A came out 3 steps (52 DN) off; earlier machines, at most 1.
        assert np.abs(inner.mean(axis=(2, 3)) - 0.6).max() < 0.006
        assert inner.std(axis=(2, 3)).max() < 0.0005  # 5 DN: INT8 steps, no invented texture
        rng = np.random.default_rng(0)
        mixed = (0.1 + 0.05 * rng.random((1, 10, 256, 256))).astype(np.float32)
        mixed[:, :, :128] = 6.5535  # uint16 saturation, as reflectance
        out = engine.run(mixed)
        assert np.isfinite(out).all()
        assert np.abs(out[:, :, 160:] - mixed[:, 4:, 160:]).mean() < 0.05
    finally:
        engine.close()


def test_new_capacity_starts_from_the_old_function(sample):
    """Training rounds that add capacity start where the previous model ended: 0.1's
    sharpening weights in the guided model (its new inputs at zero), and the ×2 weights in a
    deeper body (identity convolutions after ReLUs), give the same output on a real crop."""
    from onboard.models.superres import HERE
    from onboard.models.superres.model import Sharpen20, SuperRes2x
    from onboard.models.superres.train import WEIGHTS

    x = torch.from_numpy(np.ascontiguousarray(sample[None, :, :96, :96] * 1e-4))
    old = Sharpen20(guided=False, skip="smooth3")
    old.load_state_dict(torch.load(HERE / "weights_sharpen_0.1.pt", weights_only=True))
    grown = Sharpen20(skip="smooth3")
    grown.load_unguided(old.state_dict())
    shallow = SuperRes2x()
    shallow.load_state_dict(torch.load(WEIGHTS["x2"], weights_only=True))
    deep = SuperRes2x(depth=shallow.body_depth + 3)
    deep.load_shallower(shallow.state_dict())
    with torch.no_grad():
        assert torch.equal(grown(x), old(x))
        assert torch.equal(deep(x[:, :4]), shallow(x[:, :4]))
        # and the new capacity is there to train: the guided body reads 16 channels
        assert grown.body.features[0].in_channels == 16


def test_the_sharpening_skip_is_bicubic_of_the_coarse_grid(sample):
    """``bicubic_on_pairs`` on a 2 x 2 nearest-resampled real crop equals PIL's bicubic of the
    coarse samples (the baseline the issue names) away from the edges, at either phase of the
    blocks; the 3 x 3 mean that 0.1 and 0.2 used is far from it."""
    from onboard.models.superres import metrics
    from onboard.models.superres.dataset import area_down, nearest_up
    from onboard.models.superres.model import _smooth3, bicubic_on_pairs

    coarse = area_down(sample[4:, :128, :128])
    pairs = nearest_up(coarse)
    pil = metrics.resize(coarse, 2)
    ours = bicubic_on_pairs(torch.from_numpy(pairs[None]))[0].numpy()
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(ours - pil)[inner].max() < 0.01  # DN
    shifted = bicubic_on_pairs(torch.from_numpy(np.ascontiguousarray(pairs[None, :, 1:, 1:])))
    assert np.abs(shifted[0].numpy()[:, 3:-4, 3:-4] - ours[:, 4:-4, 4:-4]).max() < 0.01
    mean3 = _smooth3(torch.from_numpy(pairs[None]))[0].numpy()
    assert np.abs(mean3 - pil)[inner].mean() > 10 * np.abs(ours - pil)[inner].mean() + 1.0
