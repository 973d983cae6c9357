"""Run a compile step's model on numpy batches with the engine that step targets.

Every step is judged on the engine that will really execute it: torch for the torch steps,
ONNX Runtime for ONNX graphs (fp32 and QDQ int8), OpenVINO for IR. Each runner is a callable
``(x: float32 NCHW) -> float32 output``; nothing here is a stand-in for an engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def torch_runner(model: Any, threads: int = 2) -> Runner:
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return out.detach().cpu().numpy()

    return run


def ort_runner(path: Path, threads: int = 2, graph_optimization: str = "all") -> Runner:
    """ONNX Runtime on CPU, with the graph optimisation the flight engine would use."""
    from onboard.runtime.engines.onnxruntime import cpu_session

    session = cpu_session(path, threads, graph_optimization)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def ov_runner(xml: Path, threads: int = 2, precision_hint: str = "f32") -> Runner:
    """OpenVINO on CPU. The precision hint is explicit because this CPU would otherwise run an
    fp32 IR in bf16 and the measured metric would not be the fp32 model's."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(xml), "CPU", {
        "INFERENCE_PRECISION_HINT": precision_hint,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    })
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def run(x: np.ndarray) -> np.ndarray:
        result = request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(result[output])

    return run
