"""Export a torch model to ONNX (opset 17, TorchScript exporter) and simplify it with onnxslim.

The tile size is fixed by the zoo entry; the batch dimension is dynamic so one graph serves
single tiles on board and batches on the ground. The TorchScript exporter (``dynamo=False``)
is used because its graphs are plain Conv/Relu/... that every target (ONNX Runtime, OpenVINO,
TensorRT 8.x on JetPack) reads; the dynamo exporter emits newer constructs older TensorRT lacks.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from onboard.runtime.errors import CompileError

INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17


def export_onnx(model: Any, example: Any, path: Path, dynamic_batch: bool = True,
                simplify: bool = True, dynamic_size: bool = False) -> Path:
    """Write ``model`` traced on ``example`` (1, C, H, W) to ``path``; returns ``path``.

    ``dynamic_size`` also leaves height and width free, for models validated on tiles other
    than their nominal tile size (fully convolutional nets).
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    axes: dict[str, dict[int, str]] = {INPUT_NAME: {}, OUTPUT_NAME: {}}
    for name in axes:
        if dynamic_batch:
            axes[name][0] = "batch"
        if dynamic_size:
            axes[name].update({2: "height", 3: "width"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={k: v for k, v in axes.items() if v} or None,
            do_constant_folding=True,
        )
    if simplify:
        import onnxslim

        slim = onnxslim.slim(str(path))
        if slim is None:
            raise CompileError(f"{path}: onnxslim could not simplify the exported graph")
        # Intermediate shape annotations are optional; with free height/width they hold long
        # symbolic expressions (a quarter of the file for a small net): uplink bytes for nothing.
        del slim.graph.value_info[:]
        onnx.save(slim, str(path))
    onnx.checker.check_model(str(path))
    return path
