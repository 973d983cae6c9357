"""Post-training INT8 quantisation of an ONNX graph with ONNX Runtime, calibrated on real tiles.

Two flavours of the same explicit QDQ (QuantizeLinear/DequantizeLinear) graph:

* ``onnxruntime``: uint8 activations (asymmetric) and int8 per-channel weights. ONNX Runtime's
  CPU kernels for U8 activations x S8 weights are the fast path (S8 x S8 runs several times
  slower on x86).
* ``tensorrt``: int8 activations and weights, both symmetric (zero point 0), per-channel
  weights. TensorRT only accepts symmetric int8 in explicit-quantisation graphs; it reads the
  scales from the QDQ nodes and builds its engine on the target (Jetson), so no calibration
  runs there.

Calibration is MinMax over the tiles given (the model's own training split): deterministic,
so the same tiles give the same graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onboard.runtime.errors import CompileError

if TYPE_CHECKING:
    import onnx

QUANT_TARGETS = ("onnxruntime", "tensorrt")


def _reader(tiles: np.ndarray, input_name: str, batch: int = 1):
    from onnxruntime.quantization import CalibrationDataReader

    class TileReader(CalibrationDataReader):
        """Feeds calibration tiles to ONNX Runtime's calibrator, ``batch`` at a time."""

        def __init__(self) -> None:
            self._iter: Iterator[dict[str, np.ndarray]] = iter(
                {input_name: np.ascontiguousarray(tiles[i:i + batch], dtype=np.float32)}
                for i in range(0, len(tiles), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._iter, None)

    return TileReader()


def node_prefixes(only_prefix: str | list[str]) -> tuple[str, ...]:
    """A zoo entry's ``extra["int8_only_prefix"]`` (one prefix or a list) as a tuple, the form
    ``str.startswith`` takes."""
    return (only_prefix,) if isinstance(only_prefix, str) else tuple(only_prefix)


def quantize_qdq(fp32_path: Path, out_path: Path, tiles: np.ndarray,
                 target: str = "onnxruntime",
                 only_prefix: str | list[str] | None = None,
                 int8_weights_elsewhere: bool = False) -> Path:
    """Write the INT8 QDQ version of ``fp32_path`` for ``target`` to ``out_path``.

    ``only_prefix`` (a zoo entry's ``extra["int8_only_prefix"]``, one prefix or a list)
    quantises only the nodes whose names start with one of them and leaves the rest float:
    arithmetic that must keep its precision (a least-squares fit, a radiometric skip, a
    context path whose rounding adds up) is named outside them by the model. Every prefix
    must name a node, so an export that renames nodes fails here rather than quantising
    something else. ``int8_weights_elsewhere`` (``extra["int8_weights_elsewhere"]``) stores
    the weights of the convolutions left float as INT8 too (:func:`int8_weights`): their
    activations keep float precision and the bundle INT8's size."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if target not in QUANT_TARGETS:
        raise CompileError(f"INT8 QDQ is for {QUANT_TARGETS}, not {target!r}")
    if tiles.ndim != 4 or len(tiles) == 0:
        raise CompileError(f"calibration tiles must be a non-empty NCHW array, got {tiles.shape}")
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    input_name = graph.input[0].name
    excluded: list[str] = []
    if only_prefix is not None:
        prefixes = node_prefixes(only_prefix)
        for prefix in prefixes:
            if not any(node.name.startswith(prefix) for node in graph.node):
                raise CompileError(f"{fp32_path}: no node is named under {prefix!r}; "
                                   "the model's int8_only_prefix does not fit its graph")
        excluded = [node.name for node in graph.node if not node.name.startswith(prefixes)]
    if target == "tensorrt":
        activation_type = QuantType.QInt8
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True}
    else:
        activation_type = QuantType.QUInt8
        extra = {"WeightSymmetric": True}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(fp32_path), str(out_path), _reader(tiles, input_name),
        quant_format=QuantFormat.QDQ,
        activation_type=activation_type,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=excluded,
        extra_options=extra,
    )
    if int8_weights_elsewhere and excluded:
        model = onnx.load(str(out_path))
        int8_weights(model, set(excluded))
        onnx.save(model, str(out_path))
    return out_path


def int8_weights(model: onnx.ModelProto, nodes: set[str]) -> int:
    """Store the constant weights of the float ``Conv`` nodes named in ``nodes`` as symmetric
    per-output-channel INT8 behind a ``DequantizeLinear`` (weight-only quantisation; the
    convolution still runs float). Returns how many were converted."""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    dequantizers = []
    for node in model.graph.node:
        weight = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        if node.name not in nodes or weight not in initializers or readers[weight] != 1:
            continue
        w = numpy_helper.to_array(initializers[weight]).astype(np.float32)
        peak = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127)
        model.graph.initializer.remove(initializers[weight])
        model.graph.initializer.extend([
            numpy_helper.from_array(q.astype(np.int8), f"{weight}_int8"),
            numpy_helper.from_array(scale, f"{weight}_scale"),
            numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{weight}_zero_point")])
        dequantizers.append(helper.make_node(
            "DequantizeLinear", [f"{weight}_int8", f"{weight}_scale", f"{weight}_zero_point"],
            [weight], name=f"{node.name}/weight_DequantizeLinear", axis=0))
    # They read initializers only, so at the head of the graph they are in topological order.
    for position, dq in enumerate(dequantizers):
        model.graph.node.insert(position, dq)
    return len(dequantizers)


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """ONNX fp16 (weights and activations) for ONNX Runtime, via onnxconverter-common.

    Optional: onnxconverter-common is not a dependency, because ONNX Runtime's CPU provider
    gains nothing from fp16 (it casts back to fp32); it is for GPU providers.
    """
    try:
        from onnxconverter_common import float16
    except ImportError as error:
        raise CompileError(
            "fp16 for the onnxruntime target needs onnxconverter-common, which is not installed "
            "(pip install onnxconverter-common); use --precision fp32 or int8, or --target "
            "openvino / tensorrt for fp16"
        ) from error
    import onnx

    model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return Path(out_path)
