"""The compiler, step by step and end to end, on a small real cloud model.

The model is a small U-Net-like conv net (with a skip connection, so pruning has to follow a
concatenation) trained here for a few seconds on the committed UKIS crop (real Sentinel-2
reflectance with human cloud / clear / shadow masks). Rows 0-95 train it, rows 96-127 (all
three classes) validate it. Nothing stands in for an engine: every step runs torch, ONNX
Runtime or OpenVINO for real.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
onnx = pytest.importorskip("onnx")
pytest.importorskip("openvino")

from torch import nn  # noqa: E402

from onboard.compile import (  # noqa: E402
    CompileOptions,
    compile_model,
    export,
    gate,
    load_model,
    measure,
    openvino,
    prune,
    quantize,
    runners,
)
from onboard.models.cloud.dataset import ukis_labels  # noqa: E402
from onboard.models.zoo import ZooModel  # noqa: E402
from onboard.runtime.cli import main  # noqa: E402
from onboard.runtime.errors import (  # noqa: E402
    AccuracyGateError,
    CompileError,
)

DATA = Path(__file__).resolve().parent / "data"
BANDS = ["blue", "green", "red", "nir", "swir16", "swir22"]
TILE = 32
CLEAR, CLOUD, SHADOW, IGNORE = 0, 1, 2, 255


class TinyCloudNet(nn.Module):
    """Encoder, a stride-2 stage, nearest upsampling and a skip concatenation, then a 1x1 head."""

    def __init__(self, bands: int = 6, classes: int = 3, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.enc = block(bands, width)
        self.down = nn.Sequential(block(width, 2 * width, 2), block(2 * width, 2 * width))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = block(3 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        return self.head(self.dec(torch.cat([e, self.up(self.down(e))], 1)))


class NarrowCloudNet(TinyCloudNet):
    def __init__(self) -> None:
        super().__init__(width=8)


def _scene(root: Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(Path(root) / "ukis_6band_crop.npz")
    image = np.ascontiguousarray(data["img"].transpose(2, 0, 1), dtype=np.float32)
    return image, ukis_labels(data["msk"][..., 0]).astype(np.int64)


def _train_tiles(root: Path) -> tuple[np.ndarray, np.ndarray]:
    image, labels = _scene(root)
    xs, ys = [], []
    for r in range(0, 96 - TILE + 1, 16):
        for c in range(0, 128 - TILE + 1, 16):
            xs.append(image[:, r:r + TILE, c:c + TILE])
            ys.append(labels[r:r + TILE, c:c + TILE])
    return np.stack(xs), np.stack(ys)


def train_batches(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    x, y = _train_tiles(root)
    # Flips double the few tiles; fixed order so that fine-tuning is reproducible.
    x = np.concatenate([x, x[..., ::-1]])
    y = np.concatenate([y, y[..., ::-1]])
    return [(np.ascontiguousarray(x[i:i + 14]), np.ascontiguousarray(y[i:i + 14]))
            for i in range(0, len(x), 14)]


def validation_batches(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    image, labels = _scene(root)
    xs = [image[:, 96:128, c:c + TILE] for c in range(0, 128, TILE)]
    ys = [labels[96:128, c:c + TILE] for c in range(0, 128, TILE)]
    return [(np.stack(xs[:2]), np.stack(ys[:2])), (np.stack(xs[2:]), np.stack(ys[2:]))]


def calibration_tiles(root: Path, n: int) -> np.ndarray:
    return _train_tiles(root)[0][:n]


def boa(outputs: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Balanced overall accuracy: mean recall over the classes present."""
    pred = np.concatenate([o.argmax(1).ravel() for o in outputs])
    true = np.concatenate([np.asarray(y).ravel() for y in labels])
    keep = true != IGNORE
    pred, true = pred[keep], true[keep]
    recalls = [float((pred[true == k] == k).mean()) for k in np.unique(true)]
    return float(np.mean(recalls))


def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, labels.long(), ignore_index=IGNORE)


_CACHE: dict[str, Path] = {}


def _trained_weights() -> Path:
    """Train TinyCloudNet once per test session (a few seconds on 2 cores)."""
    if "weights" not in _CACHE:
        torch.manual_seed(0)
        torch.set_num_threads(2)
        model = TinyCloudNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        batches = train_batches(DATA)
        for _ in range(12):
            model.train()
            for x, y in batches:
                optimizer.zero_grad()
                loss(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
                optimizer.step()
        model.eval()
        folder = Path(tempfile.mkdtemp(prefix="onboard-test-compile-"))
        torch.save(model.state_dict(), folder / "tiny.pt")
        _CACHE["weights"] = folder / "tiny.pt"
    return _CACHE["weights"]


def tiny_zoo() -> ZooModel:
    """The zoo description of the test model (importable as ``test_compile:tiny_zoo``)."""
    return ZooModel(
        name="tiny-cloud-test", task="cloud", version="0.0.1", build=TinyCloudNet,
        weights=_trained_weights(), bands=list(BANDS), input_scale=[1.0] * 6,
        input_offset=[0.0] * 6, tile_size=TILE, gsd_m=30.0, output_kind="classes",
        classes={CLEAR: "clear", CLOUD: "cloud", SHADOW: "shadow"}, metric_name="boa",
        train_batches=train_batches, validation_batches=validation_batches,
        calibration_tiles=calibration_tiles, loss=loss, metric=boa,
        extra={"finetune_epochs": 6, "finetune_lr": 1e-2},
    )


def four_band_calibration_zoo() -> ZooModel:
    """The same model whose calibration data wrongly carries only 4 bands."""
    zoo = tiny_zoo()
    zoo.calibration_tiles = lambda root, n: calibration_tiles(root, n)[:, :4]
    return zoo


@pytest.fixture(scope="module")
def zoo() -> ZooModel:
    return tiny_zoo()


@pytest.fixture(scope="module")
def trained(zoo: ZooModel) -> nn.Module:
    return load_model(zoo.build, zoo.weights)


@pytest.fixture(scope="module")
def validation() -> list[tuple[np.ndarray, np.ndarray]]:
    return validation_batches(DATA)


@pytest.fixture(scope="module")
def onnx_fp32(trained: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tile = torch.from_numpy(validation_batches(DATA)[0][0][:1])
    return export.export_onnx(copy.deepcopy(trained), tile,
                              tmp_path_factory.mktemp("onnx") / "model.onnx")


def _metric(run: runners.Runner, validation: list) -> float:
    return gate.evaluate(run, validation, boa)


# --- steps -------------------------------------------------------------------------------------

def test_trained_model_is_better_than_chance(trained: nn.Module, validation: list) -> None:
    assert _metric(runners.torch_runner(trained), validation) > 0.6


def test_prune_removes_channels_and_keeps_the_classifier(trained: nn.Module) -> None:
    model = copy.deepcopy(trained)
    example = torch.from_numpy(validation_batches(DATA)[0][0][:1])
    params_before, macs_before = measure.torch_params_macs(model, example)
    prune.prune_channels(model, example, 0.5)
    params_after, macs_after = measure.torch_params_macs(model, example)
    assert model.enc[0].out_channels == 8 and model.down[1][0].out_channels == 16
    assert model.dec[0].in_channels == 8 + 16  # the concatenation followed the pruning
    assert model.head.out_channels == 3 and model.head.in_channels == 8
    assert params_after < 0.4 * params_before and macs_after < 0.4 * macs_before
    assert model(example).shape == (1, 3, TILE, TILE)


def test_fine_tune_recovers_pruned_accuracy(trained: nn.Module, validation: list) -> None:
    model = copy.deepcopy(trained)
    example = torch.from_numpy(validation[0][0][:1])
    prune.prune_channels(model, example, 0.75)
    pruned = _metric(runners.torch_runner(model), validation)
    prune.fine_tune(model, lambda: train_batches(DATA), loss, epochs=4, lr=3e-3)
    tuned = _metric(runners.torch_runner(model), validation)
    assert tuned >= pruned


def test_prune_round_to_keeps_channel_multiples(trained: nn.Module) -> None:
    model = copy.deepcopy(trained)
    example = torch.from_numpy(validation_batches(DATA)[0][0][:1])
    prune.prune_channels(model, example, 0.6, round_to=8)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)][:-1]
    assert widths and all(w % 8 == 0 for w in widths)
    assert sum(widths) < 16 + 32 + 32 + 16  # something was pruned


def test_prune_ratio_out_of_range(trained: nn.Module) -> None:
    example = torch.from_numpy(validation_batches(DATA)[0][0][:1])
    with pytest.raises(CompileError, match="prune"):
        prune.prune_channels(copy.deepcopy(trained), example, 1.0)


def test_onnx_export_matches_torch(trained: nn.Module, onnx_fp32: Path,
                                   validation: list) -> None:
    x = np.concatenate([x for x, _ in validation])  # 4 tiles: the batch axis is dynamic
    expected = runners.torch_runner(trained)(x)
    got = runners.ort_runner(onnx_fp32)(x)
    assert got.shape == expected.shape == (4, 3, TILE, TILE)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    model = onnx.load(str(onnx_fp32))
    assert model.opset_import[0].version == export.OPSET
    assert {n.op_type for n in model.graph.node} >= {"Conv", "Concat"}
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded


def test_onnx_export_with_free_tile_size(trained: nn.Module, tmp_path: Path) -> None:
    tile = torch.from_numpy(calibration_tiles(DATA, 1))
    path = export.export_onnx(copy.deepcopy(trained), tile, tmp_path / "d.onnx",
                              dynamic_size=True)
    run = runners.ort_runner(path)
    x = _train_tiles(DATA)[0][:1]
    wide = np.concatenate([x, x], axis=3)  # 32 x 64
    np.testing.assert_allclose(run(wide), runners.torch_runner(trained)(wide), atol=1e-4,
                               rtol=1e-4)
    assert measure.onnx_macs(path, input_shape=(1, 6, 64, 64)) == \
        4 * measure.onnx_macs(path, input_shape=(1, 6, 32, 32))


def test_onnx_macs_count_matches_the_architecture(onnx_fp32: Path) -> None:
    hw, half = TILE * TILE, (TILE // 2) ** 2
    expected = (hw * 16 * 6 * 9 + half * 32 * 16 * 9 + half * 32 * 32 * 9
                + hw * 16 * 48 * 9 + hw * 3 * 16)
    assert measure.onnx_macs(onnx_fp32) == expected
    assert measure.onnx_macs(onnx_fp32, batch=4) == 4 * expected


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_ort_qdq_int8_graph(onnx_fp32: Path, tmp_path: Path, validation: list) -> None:
    tiles = calibration_tiles(DATA, 16)
    path = quantize.quantize_qdq(onnx_fp32, tmp_path / "q.onnx", tiles, "onnxruntime")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = _initializers(model)
    activation_zps = [inits[n.input[2]] for n in model.graph.node
                      if n.op_type == "QuantizeLinear"]
    assert activation_zps and all(zp.dtype == np.uint8 for zp in activation_zps)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    weight_dq = [n for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights]
    assert len(weight_dq) == 5
    for node in weight_dq:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.dtype == np.int8
        assert scale.shape == (weight.shape[0],)  # one scale per output channel
    fp32 = _metric(runners.ort_runner(onnx_fp32), validation)
    int8 = _metric(runners.ort_runner(path), validation)
    assert abs(fp32 - int8) < 0.1
    assert measure.onnx_macs(path) == measure.onnx_macs(onnx_fp32)


def _int8_readers(path: Path) -> set[str]:
    """Names of the nodes (other than QuantizeLinear) that read a dequantised tensor."""
    nodes = onnx.load(str(path)).graph.node
    dequantised = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in nodes if n.op_type != "QuantizeLinear"
            and set(n.input) & dequantised}


def test_qdq_only_prefix_leaves_the_rest_float(onnx_fp32: Path, tmp_path: Path) -> None:
    """``extra["int8_only_prefix"]``: only the named nodes read dequantised tensors; a prefix
    that names no node is refused (nothing would be quantised)."""
    convs = [n.name for n in onnx.load(str(onnx_fp32)).graph.node if n.op_type == "Conv"]
    tiles = calibration_tiles(DATA, 4)
    everything = quantize.quantize_qdq(onnx_fp32, tmp_path / "a.onnx", tiles, "onnxruntime")
    assert set(convs) <= _int8_readers(everything)
    only_first = quantize.quantize_qdq(onnx_fp32, tmp_path / "p.onnx", tiles, "onnxruntime",
                                       only_prefix=convs[0])
    # The first convolution reads INT8 (its output's consumer reads it dequantised); every
    # other convolution reads float.
    assert _int8_readers(only_first) & set(convs) == {convs[0]}
    with pytest.raises(CompileError, match="no node is named under"):
        quantize.quantize_qdq(onnx_fp32, tmp_path / "n.onnx", tiles, "onnxruntime",
                              only_prefix="/nowhere/")
    # A list: the nodes under any of them; one that names nothing is refused all the same.
    first_and_last = quantize.quantize_qdq(onnx_fp32, tmp_path / "l.onnx", tiles,
                                           "onnxruntime", only_prefix=[convs[0], convs[-1]])
    assert _int8_readers(first_and_last) & set(convs) == {convs[0], convs[-1]}
    with pytest.raises(CompileError, match="'/nowhere/'"):
        quantize.quantize_qdq(onnx_fp32, tmp_path / "m.onnx", tiles, "onnxruntime",
                              only_prefix=[convs[0], "/nowhere/"])


def test_int8_weights_elsewhere_keeps_float_activations(onnx_fp32: Path, tmp_path: Path
                                                       ) -> None:
    """``extra["int8_weights_elsewhere"]``: the convolutions left float read float activations
    but store INT8 weights, so the graph has INT8's size and runs as close to fp32 as the
    weights' rounding allows."""
    import onnxruntime as ort

    convs = [n.name for n in onnx.load(str(onnx_fp32)).graph.node if n.op_type == "Conv"]
    tiles = calibration_tiles(DATA, 4)
    plain = quantize.quantize_qdq(onnx_fp32, tmp_path / "p.onnx", tiles, "onnxruntime",
                                  only_prefix=convs[0])
    path = quantize.quantize_qdq(onnx_fp32, tmp_path / "w.onnx", tiles, "onnxruntime",
                                 only_prefix=convs[0], int8_weights_elsewhere=True)
    nodes = {n.name: n for n in onnx.load(str(path)).graph.node}
    dequantised = {o for n in nodes.values() if n.op_type == "DequantizeLinear" for o in n.output}
    for name in convs[1:]:
        assert nodes[name].input[0] not in dequantised, name  # float activations
        assert nodes[name].input[1] in dequantised, name  # INT8 weights
    assert path.stat().st_size < 0.5 * plain.stat().st_size
    outputs = []
    for model in (onnx_fp32, path):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: tiles})[0])
    assert outputs[0].shape == outputs[1].shape
    assert (outputs[0].argmax(1) == outputs[1].argmax(1)).mean() > 0.98
    assert not np.array_equal(outputs[0], outputs[1])  # it did round something


def test_tensorrt_qdq_is_symmetric_int8(onnx_fp32: Path, tmp_path: Path) -> None:
    path = quantize.quantize_qdq(onnx_fp32, tmp_path / "t.onnx", calibration_tiles(DATA, 16),
                                 "tensorrt")
    model = onnx.load(str(path))
    inits = _initializers(model)
    zps = [inits[n.input[2]] for n in model.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    # Biases are int32 (scale = input scale x weight scale); everything else symmetric int8.
    int8 = [zp for zp in zps if zp.dtype != np.int32]
    assert int8 and all(zp.dtype == np.int8 and not zp.any() for zp in int8)
    assert all(not zp.any() for zp in zps)
    out = runners.ort_runner(path)(calibration_tiles(DATA, 2))
    assert out.shape == (2, 3, TILE, TILE)


def test_nncf_int8_ir_runs_in_openvino(onnx_fp32: Path, tmp_path: Path,
                                       validation: list) -> None:
    import openvino as ov

    xml, details = openvino.quantize_nncf(onnx_fp32, tmp_path / "m.xml",
                                          calibration_tiles(DATA, 16))
    assert details["method"] == "nncf.quantize"
    ops = {op.get_type_name() for op in ov.Core().read_model(str(xml)).get_ops()}
    assert "FakeQuantize" in ops
    int8 = _metric(runners.ov_runner(xml), validation)
    fp32 = _metric(runners.ort_runner(onnx_fp32), validation)
    assert abs(fp32 - int8) < 0.1


def test_nncf_int8_keeps_convolutions_outside_only_prefix_float(onnx_fp32: Path,
                                                                tmp_path: Path) -> None:
    """``extra["int8_only_prefix"]`` reaches NNCF as an ignored scope: only the convolutions
    named under it read quantised inputs; a prefix that names no convolution is refused."""
    import openvino as ov

    convs = [n.name for n in onnx.load(str(onnx_fp32)).graph.node if n.op_type == "Conv"]
    tiles = calibration_tiles(DATA, 8)

    def fed_by(xml: Path) -> dict[str, str]:
        """Each convolution's ONNX name and what feeds its input."""
        return {op.get_friendly_name().removesuffix("/WithoutBiases"):
                op.input_value(0).get_node().get_type_name()
                for op in ov.Core().read_model(str(xml)).get_ops()
                if op.get_type_name() == "Convolution"}

    def quantised(fed: dict[str, str]) -> set[str]:
        return {name for name, producer in fed.items() if producer == "FakeQuantize"}

    everything = fed_by(openvino.quantize_nncf(onnx_fp32, tmp_path / "a.xml", tiles)[0])
    assert set(everything) == set(convs) and len(quantised(everything)) >= 3
    xml, details = openvino.quantize_nncf(onnx_fp32, tmp_path / "m.xml", tiles,
                                          only_prefix=[convs[0]])
    assert quantised(fed_by(xml)) == {convs[0]}
    assert details["float_convolutions"] == [f"{name}/WithoutBiases" for name in convs[1:]]
    with pytest.raises(CompileError, match="int8_only_prefix does not fit"):
        openvino.quantize_nncf(onnx_fp32, tmp_path / "x.xml", tiles[:2],
                               only_prefix=["/nowhere/"])


def test_openvino_fp32_ir_matches_onnx(onnx_fp32: Path, tmp_path: Path,
                                       validation: list) -> None:
    xml = openvino.to_ir(onnx_fp32, tmp_path / "f.xml")
    x = validation[0][0]
    np.testing.assert_allclose(runners.ov_runner(xml)(x), runners.ort_runner(onnx_fp32)(x),
                               atol=1e-4, rtol=1e-4)
    xml16 = openvino.to_ir(onnx_fp32, tmp_path / "h.xml", fp16=True)
    assert (measure.files_size_bytes(*openvino.ir_files(xml16))
            < measure.files_size_bytes(*openvino.ir_files(xml)))


# --- the gate ----------------------------------------------------------------------------------

def _step(name: str, metric: float, gated: bool = True) -> gate.StepResult:
    return gate.StepResult(name, "torch", "fp32", 1, 1, 1, 1.0, metric, gated=gated)


def test_gate_names_the_step_that_lost_accuracy() -> None:
    g = gate.Gate("boa", max_drop=0.01)
    g.add(_step("fp32", 0.90))
    g.add(_step("pruned", 0.70, gated=False))  # recovered by its fine-tune
    g.add(_step("fine-tuned", 0.895))
    with pytest.raises(AccuracyGateError, match="int8-qdq") as error:
        g.add(_step("int8-qdq", 0.87))
    assert error.value.step == "int8-qdq"
    assert error.value.report["failed_step"] == "int8-qdq"
    assert error.value.report["steps"][-1]["step_drop"] == pytest.approx(0.025)


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"), "lots"])
def test_nonsense_max_drop_is_refused(bad: object) -> None:
    with pytest.raises(CompileError, match="max-drop"):
        gate.check_max_drop(bad)


# --- the command -------------------------------------------------------------------------------

def _compile(tmp_path: Path, *args: str, name: str = "b.onboard") -> tuple[int, Path]:
    out = tmp_path / name
    rc = main(["compile", "test_compile:tiny_zoo", "--data", str(DATA), "--out", str(out),
               "--latency-repeats", "2", "--calibration-tiles", "16", *args])
    return rc, out


def _report(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}.report.json").read_text())


def test_cli_onnxruntime_int8_pruned_bundle_runs(tmp_path: Path, validation: list) -> None:
    bundle_mod = pytest.importorskip("onboard.runtime.bundle")
    engines_mod = pytest.importorskip("onboard.runtime.engines")
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--precision", "int8",
                       "--prune", "0.5", "--max-drop", "0.2")
    assert rc == 0
    report = _report(out)
    steps = [s["step"] for s in report["gate"]["steps"]]
    assert steps == ["fp32", "pruned", "fine-tuned", "onnx-fp32", "int8-qdq"]
    by_step = {s["step"]: s for s in report["gate"]["steps"]}
    assert by_step["fine-tuned"]["params"] < by_step["fp32"]["params"]
    assert by_step["int8-qdq"]["size_bytes"] < by_step["onnx-fp32"]["size_bytes"]
    assert set(report["toolchain"]) >= {"torch", "onnx", "onnxruntime", "openvino", "nncf",
                                        "torch_pruning"}
    bundle = bundle_mod.Bundle.open(out)
    assert bundle.manifest.engines == {"onnxruntime": "model.onnx"}
    assert bundle.manifest.input.bands == BANDS
    # Both graph optimisations were timed and the flight engine opens with the one chosen.
    chosen = bundle.manifest.extra["onnxruntime"]
    assert chosen["graph_optimization"] == by_step["int8-qdq"]["extra"]["graph_optimization"]
    assert set(chosen["measured_ms"]) == {"all", "extended"}
    engine = engines_mod.open_engine(bundle, "onnxruntime", "cpu", threads=2, precision="int8")
    assert engine.describe()["graph_optimization"] == chosen["graph_optimization"]
    assert boa([engine.run(x) for x, _ in validation], [y for _, y in validation]) \
        == pytest.approx(by_step["int8-qdq"]["metric"])
    assert (out.parent / f"{out.name}.report.md").read_text().startswith("# Compile report")


def test_cli_openvino_int8_bundle_runs(tmp_path: Path, validation: list) -> None:
    bundle_mod = pytest.importorskip("onboard.runtime.bundle")
    engines_mod = pytest.importorskip("onboard.runtime.engines")
    rc, out = _compile(tmp_path, "--target", "openvino", "--precision", "int8")
    assert rc == 0
    bundle = bundle_mod.Bundle.open(out)
    assert bundle.manifest.engines == {"openvino": "model.xml"}
    assert bundle.manifest.precision == "int8"
    engine = engines_mod.open_engine(bundle, "openvino", "cpu", threads=2, precision="int8")
    assert engine.run(validation[0][0]).shape == (2, 3, TILE, TILE)
    assert _report(out)["gate"]["steps"][-1]["step"] == "ir-int8-nncf"


def test_cli_tensorrt_int8_ships_qdq_onnx_and_manifest(tmp_path: Path) -> None:
    bundle_mod = pytest.importorskip("onboard.runtime.bundle")
    rc, out = _compile(tmp_path, "--target", "tensorrt", "--precision", "int8")
    assert rc == 0
    bundle = bundle_mod.Bundle.open(out)
    assert bundle.manifest.engines == {"tensorrt": "model.qdq.onnx"}
    trt = bundle.manifest.extra["tensorrt"]
    assert trt["build_on_target"] and "INT8" in trt["builder_flags"]
    assert trt["profile"]["opt"] == [1, 6, TILE, TILE]


def test_same_inputs_give_the_same_metrics(zoo: ZooModel, tmp_path: Path) -> None:
    pytest.importorskip("onboard.runtime.bundle")
    options = dict(target="onnxruntime", precision="int8", prune=0.5, finetune_epochs=1,
                   data_root=DATA, calibration_tiles=8, latency_repeats=1, verify=False)
    first = compile_model(zoo, tmp_path / "a.onboard", CompileOptions(**options))
    second = compile_model(zoo, tmp_path / "b.onboard", CompileOptions(**options))
    assert [s.metric for s in first.steps] == [s.metric for s in second.steps]
    assert [s.params for s in first.steps] == [s.params for s in second.steps]


def test_cli_gate_failure_exits_non_zero_and_names_the_step(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # 90 % of the channels removed and no fine-tune: the pruned model is what would ship, and
    # it cannot keep the fp32 accuracy within 0.01.
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--prune", "0.9",
                       "--finetune-epochs", "0", "--max-drop", "0.01")
    assert rc == 1
    assert "accuracy gate failed at step 'pruned'" in capsys.readouterr().err
    assert not out.exists()
    report = _report(out)
    assert report["gate"]["failed_step"] == "pruned" and not report["gate"]["passed"]
    assert report["gate"]["steps"][-1]["drop"] > 0.01


def test_cli_max_size_refuses_an_oversized_bundle(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onboard.runtime.bundle")
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--max-size", "0.001",
                       "--no-verify")
    assert rc == 1
    assert "uplink budget of 0.001 MB" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--target", "edgetpu"], "unknown target 'edgetpu'"),
    (["--target", "openvino", "--precision", "int4"], "unknown precision 'int4'"),
    (["--target", "openvino", "--max-drop", "-1"], "max-drop must be a finite number >= 0"),
    (["--target", "openvino", "--prune", "1.5"], "prune must be a ratio in"),
])
def test_cli_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                         message: str) -> None:
    rc, _ = _compile(tmp_path, *args)
    assert rc == 1
    assert message in capsys.readouterr().err


def test_checkpoint_that_does_not_match_its_class(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    ck = tmp_path / "narrow.pt"
    torch.save(NarrowCloudNet().state_dict(), ck)
    rc, _ = _compile(tmp_path, "--target", "onnxruntime", "--checkpoint", str(ck),
                     "--model-class", "test_compile:TinyCloudNet")
    assert rc == 1
    err = capsys.readouterr().err
    assert f"{ck}: checkpoint does not match model class test_compile.TinyCloudNet" in err
    assert "size mismatch" in err
    # The user's own checkpoint with its own class is accepted.
    with pytest.raises(CompileError, match="not found"):
        load_model(NarrowCloudNet, tmp_path / "missing.pt")
    assert load_model(NarrowCloudNet, ck).enc[0].out_channels == 8


def test_calibration_data_with_the_wrong_bands(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.onboard"
    rc = main(["compile", "test_compile:four_band_calibration_zoo", "--data", str(DATA),
               "--target", "onnxruntime", "--out", str(out)])
    assert rc == 1
    assert "calibration data from" in (err := capsys.readouterr().err)
    assert "has 4 bands, but tiny-cloud-test takes 6 (blue, green, red, nir" in err


def test_unknown_zoo_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["compile", "no-such-model", "--target", "onnxruntime",
               "--out", str(tmp_path / "x.onboard")])
    assert rc == 1
    assert "no zoo model 'no-such-model'" in capsys.readouterr().err


def test_fp16_for_onnxruntime_without_converter_is_a_clear_error(onnx_fp32: Path,
                                                                  tmp_path: Path) -> None:
    try:
        import onnxconverter_common  # noqa: F401
    except ImportError:
        with pytest.raises(CompileError, match="onnxconverter-common"):
            quantize.convert_fp16(onnx_fp32, tmp_path / "h.onnx")
    else:
        path = quantize.convert_fp16(onnx_fp32, tmp_path / "h.onnx")
        assert runners.ort_runner(path)(calibration_tiles(DATA, 1)).shape == (1, 3, TILE, TILE)


def test_cli_user_checkpoint_with_its_own_class(tmp_path: Path) -> None:
    bundle_mod = pytest.importorskip("onboard.runtime.bundle")
    torch.manual_seed(1)
    ck = tmp_path / "narrow.pt"
    torch.save(NarrowCloudNet().state_dict(), ck)
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--checkpoint", str(ck),
                       "--model-class", "test_compile:NarrowCloudNet", "--bundle-version", "9.9")
    assert rc == 0
    report = _report(out)
    assert report["model_class"] == "test_compile:NarrowCloudNet"
    assert report["gate"]["steps"][0]["params"] < 10_000  # the narrow net, not the zoo's
    assert bundle_mod.Bundle.open(out).manifest.version == "9.9"


@pytest.mark.slow
def test_cli_real_cloud_zoo_model_to_openvino_int8(tmp_path: Path, shared_data: Path) -> None:
    """The zoo's real cloud model, its own held-out data and metric, INT8 OpenVINO."""
    bundle_mod = pytest.importorskip("onboard.runtime.bundle")
    from onboard.models import zoo

    try:
        entry = zoo.get("cloud-4band")
    except KeyError:
        pytest.skip("the cloud zoo model is not registered")
    if not Path(entry.weights).exists():
        pytest.skip(f"{entry.weights} not trained yet")
    out = tmp_path / "cloud.onboard"
    rc = main(["compile", "cloud-4band", "--data", str(shared_data), "--target", "openvino",
               "--precision", "int8", "--max-drop", "0.02", "--max-size", "5",
               "--calibration-tiles", "16", "--latency-repeats", "2", "--out", str(out)])
    assert rc == 0
    report = _report(out)
    assert [s["step"] for s in report["gate"]["steps"]] == ["fp32", "onnx-fp32", "ir-int8-nncf"]
    assert report["gate"]["steps"][-1]["drop"] <= 0.02
    bundle = bundle_mod.Bundle.open(out)
    assert bundle.manifest.input.bands == ["blue", "green", "red", "nir"]
    assert bundle.manifest.input.scale == [1e-4] * 4
    assert report["bundle"]["verified_metric"] == pytest.approx(
        report["gate"]["steps"][-1]["metric"], abs=5e-3)


def test_compile_on_a_lean_install_names_the_compile_extra(tmp_path: Path) -> None:
    # The flight install has no torch: the command must say what to install, not trace back.
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "from onboard.runtime.cli import main\n"
            f"raise SystemExit(main(['compile', 'cloud-4band', '--target', 'onnxruntime', "
            f"'--out', {str(tmp_path / 'x.onboard')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    assert "[compile] extra" in result.stderr and "torch" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.onboard").exists()


def test_gate_set_must_be_large_enough_and_is_named_in_the_manifest() -> None:
    from onboard.compile.gate import MIN_GATE_SCENES, MIN_GATE_TILES
    from onboard.compile.pipeline import check_gate_set, gate_extra

    entry = _gate_entry(["a", "b", "c"])
    third = -(-MIN_GATE_TILES // 3)
    enough = [_gate_batch(third)] * 3  # one batch per named scene
    check_gate_set(entry, enough)
    with pytest.raises(CompileError, match=f"{3 * (third - 1)} tiles from 3 scenes"):
        check_gate_set(entry, [_gate_batch(third - 1)] * 3)
    entry.extra["gate_scenes"] = lambda: ["a", "b"]
    with pytest.raises(CompileError, match=f"from {MIN_GATE_SCENES} scenes"):
        check_gate_set(entry, [_gate_batch(MIN_GATE_TILES)] * 2)
    got = gate_extra(entry, {"validation_tiles": 70, "boa": 0.9, "boa_fp32": 0.91})
    assert got == {"gate": {"scenes": ["a", "b"], "tiles": 70, "metric": "boa", "fp32": 0.91,
                            "final": 0.9}}
    entry.extra.pop("gate_scenes")
    check_gate_set(entry, [_gate_batch(1)])  # entries that name no gate scenes are not held to it
    assert gate_extra(entry, {"validation_tiles": 1}) == {}


def _gate_entry(scenes: list[str]) -> ZooModel:
    return ZooModel(name="tiny", task="cloud", version="0", build=lambda: None,
                    weights=Path("w.pt"), bands=["blue"], input_scale=[1.0],
                    input_offset=[0.0], tile_size=16, gsd_m=10.0, output_kind="classes",
                    metric_name="boa", extra={"gate_scenes": scenes})


def _gate_batch(tiles: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((tiles, 4, 16, 16), np.float32), np.zeros((tiles, 16, 16), np.uint8)


def test_gate_set_needs_a_tile_from_every_named_scene() -> None:
    """Enough tiles and enough names are not enough: each named scene has its own batch (the
    manifest's gate.scenes says what the gate saw) and gives at least one tile."""
    from onboard.compile.gate import MIN_GATE_TILES
    from onboard.compile.pipeline import check_gate_set

    entry = _gate_entry(["a", "b", "c"])
    with pytest.raises(CompileError, match="no validation tile: b, c;"):
        check_gate_set(entry, [_gate_batch(MIN_GATE_TILES), _gate_batch(0), _gate_batch(0)])
    with pytest.raises(CompileError, match="no validation tile: b;"):
        check_gate_set(entry, [_gate_batch(MIN_GATE_TILES), _gate_batch(0), _gate_batch(1)])
    for batches in ([_gate_batch(MIN_GATE_TILES)], [_gate_batch(MIN_GATE_TILES // 4)] * 4):
        with pytest.raises(CompileError, match=f"{len(batches)} validation batches for 3 named"):
            check_gate_set(entry, batches)
    check_gate_set(entry, [_gate_batch(MIN_GATE_TILES - 2), _gate_batch(1), _gate_batch(1)])


def test_cli_sign_signs_the_bundle_it_writes_and_the_report_names_the_key(
        tmp_path: Path, validation: list, capsys: pytest.CaptureFixture) -> None:
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.bundle.signature import SigningKey, TrustPolicy
    from onboard.runtime.config import config_from_dict
    from onboard.runtime.engines import open_engine
    from onboard.runtime.errors import BundleSignatureError

    key = SigningKey.generate("ground-2027")
    private, public = key.save(tmp_path / "keys")
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--sign", str(private))
    assert rc == 0
    printed = capsys.readouterr().out  # the command prints the markdown report
    assert f"by key `ground-2027` (id {key.key_id})" in printed
    report = _report(out)
    assert report["signature"]["key_id"] == key.key_id
    assert report["signature"]["key_name"] == "ground-2027"
    bundle = Bundle.open(out)
    assert report["signature"]["manifest_sha256"] == bundle.manifest_sha256
    assert report["bundle"]["size_bytes"] == out.stat().st_size  # measured signed
    # A board whose [signatures] section trusts the key loads it and runs it as compiled ...
    config = config_from_dict({"signatures": {"trusted_keys": [str(public)]}})
    policy = TrustPolicy.from_config(config.section("signatures"))
    engine = open_engine(out, "onnxruntime", threads=1, trust=policy)
    try:
        assert engine.signature.status == "verified"
        assert engine.signature.key_id == key.key_id
        assert boa([engine.run(x) for x, _ in validation], [y for _, y in validation]) \
            == pytest.approx(report["bundle"]["verified_metric"])
    finally:
        engine.close()
    # ... one trusting another key (the project's test key) refuses it, naming the signer.
    test_key = Path(__file__).resolve().parents[1] / "keys" / "onboard-test.ed25519.pub"
    with pytest.raises(BundleSignatureError, match=key.key_id):
        open_engine(out, "onnxruntime", threads=1, trust=[test_key])


def test_cli_sign_with_a_public_key_fails_before_compiling(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from onboard.runtime.bundle.signature import SigningKey

    _, public = SigningKey.generate("half").save(tmp_path)
    rc, out = _compile(tmp_path, "--target", "onnxruntime", "--sign", str(public))
    assert rc == 1
    err = capsys.readouterr().err
    assert "not an unencrypted PEM private key" in err and "[compile] loading" not in err
    assert not out.exists() and not (out.parent / f"{out.name}.report.json").exists()
