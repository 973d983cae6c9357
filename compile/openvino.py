"""OpenVINO IR from the ONNX graph: fp32, fp16 (compressed weights) and INT8 with NNCF.

INT8 uses NNCF's post-training quantisation on the OpenVINO model, calibrated on the model's
own training tiles. With an accuracy budget (``--max-drop``) it uses
``nncf.quantize_with_accuracy_control``, which keeps the layers that hurt the metric most in
floating point until the drop on the validation set is within budget.

Myriad X (Movidius, as flown on Φ-Sat-1) is not supported by this OpenVINO: its MYRIAD plugin
was removed after the 2022.3 LTS release. For a Myriad target, convert the ONNX graph of the
bundle with OpenVINO 2022.3 LTS (``mo --input_model model.onnx --data_type FP16``); Myriad runs
FP16 only, so an INT8 IR does not apply there.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onboard.compile.quantize import node_prefixes
from onboard.runtime.errors import CompileError


def to_ir(onnx_path: Path, xml_path: Path, fp16: bool = False) -> Path:
    """Convert an ONNX graph to IR (``.xml`` + ``.bin``); ``fp16`` halves the weights on disk.

    On CPU an fp16 IR is decompressed to fp32 at load time (or run in bf16 if the precision
    hint allows); it saves uplink bytes, and on GPU/VPU it is the native precision.
    """
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml_path), compress_to_fp16=fp16)
    return xml_path


def _items(tiles: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(tiles[i:i + 1], dtype=np.float32) for i in range(len(tiles))]


def quantize_nncf(onnx_path: Path, xml_path: Path, tiles: np.ndarray,
                  validation: list[tuple[np.ndarray, np.ndarray]] | None = None,
                  metric: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None,
                  max_drop: float | None = None, seed: int = 0,
                  only_prefix: str | list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """INT8 IR of ``onnx_path`` written to ``xml_path``; returns (path, details).

    With ``validation``, ``metric`` and ``max_drop`` given, quantisation is accuracy-controlled
    (absolute drop of ``metric`` on ``validation`` at most ``max_drop``). ``only_prefix`` (the
    zoo entry's ``extra["int8_only_prefix"]``, ONNX node names as for
    :func:`quantize.quantize_qdq`) quantises only the convolutions named under it; NNCF's
    ignored scope keeps every other convolution float.
    """
    import nncf
    import openvino as ov

    _nncf_logs_to_stderr()
    if tiles.ndim != 4 or len(tiles) == 0:
        raise CompileError(f"calibration tiles must be a non-empty NCHW array, got {tiles.shape}")
    model = ov.convert_model(str(onnx_path))
    calibration = nncf.Dataset(_items(tiles))
    subset = len(tiles)  # all tiles: deterministic and the set is small
    details: dict[str, Any] = {"method": "nncf.quantize", "calibration_tiles": len(tiles)}
    ignored = _float_convolutions(model, only_prefix, onnx_path)
    scope = nncf.IgnoredScope(names=ignored) if ignored else None
    if ignored:
        details["float_convolutions"] = ignored
    if validation is not None and metric is not None and max_drop is not None:
        def validate(compiled: Any, data: Any) -> float:
            output = compiled.output(0)
            outs, labels = [], []
            for x, y in data:
                outs.append(np.array(compiled({0: x})[output]))
                labels.append(y)
            return float(metric(outs, labels))

        # NNCF's progress bars print to stdout, which is for the command's result.
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize_with_accuracy_control(
                model, calibration, nncf.Dataset(list(validation)), validation_fn=validate,
                max_drop=float(max_drop), drop_type=nncf.DropType.ABSOLUTE, subset_size=subset,
                ignored_scope=scope,
            )
        details["method"] = "nncf.quantize_with_accuracy_control"
        details["max_drop"] = float(max_drop)
    else:
        with contextlib.redirect_stdout(sys.stderr):
            quantized = nncf.quantize(model, calibration, subset_size=subset,
                                      ignored_scope=scope)
    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    return xml_path, details


def _float_convolutions(model: Any, only_prefix: str | list[str] | None,
                        onnx_path: Path) -> list[str]:
    """The OpenVINO names of the convolutions outside ``only_prefix`` (ONNX node names: the
    converter names a convolution ``<onnx name>/WithoutBiases``). Some convolution must be
    named under the prefixes (they may name other nodes too), so a renamed export fails here
    rather than leaving everything float."""
    if only_prefix is None:
        return []
    prefixes = node_prefixes(only_prefix)
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() == "Convolution"]
    kept = [name for name in convolutions if name.startswith(prefixes)]
    if not kept:
        raise CompileError(f"{onnx_path}: no convolution is named under {list(prefixes)}; "
                           "the model's int8_only_prefix does not fit its graph")
    return [name for name in convolutions if not name.startswith(prefixes)]


def _nncf_logs_to_stderr() -> None:
    """NNCF logs to stdout; stdout is for the command's result (the report), progress is stderr."""
    import logging

    for handler in logging.getLogger("nncf").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def ir_files(xml_path: Path) -> list[Path]:
    xml_path = Path(xml_path)
    return [xml_path, xml_path.with_suffix(".bin")]
