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

import numpy as np

from onboard.runtime.errors import CompileError

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


def quantize_qdq(fp32_path: Path, out_path: Path, tiles: np.ndarray,
                 target: str = "onnxruntime", only_prefix: str | None = None) -> Path:
    """Write the INT8 QDQ version of ``fp32_path`` for ``target`` to ``out_path``.

    ``only_prefix`` (a zoo entry's ``extra["int8_only_prefix"]``) quantises only the nodes whose
    names start with it and leaves the rest float: arithmetic that must keep its precision (a
    least-squares fit, a radiometric skip) is named outside it by the model."""
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
    excluded = [] if only_prefix is None else [
        node.name for node in graph.node if not node.name.startswith(only_prefix)]
    if only_prefix is not None and len(excluded) == len(graph.node):
        raise CompileError(f"{fp32_path}: no node is named under {only_prefix!r}; "
                           "nothing would be quantised")
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
    return out_path


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
