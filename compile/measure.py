"""What a compile step costs: parameters, multiply-accumulates, bytes on disk and latency.

MACs of an exported model are counted from its ONNX graph (convolutions, transposed
convolutions, Gemm and MatMul, which carry all but a rounding error of a CNN's arithmetic), so
the same count applies to the ONNX Runtime, QDQ and OpenVINO versions of one network. The torch
steps use torch-pruning's own counter, which agrees with the graph count for plain conv nets.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def torch_params_macs(model: Any, example: Any) -> tuple[int, int]:
    """(parameters, MACs per ``example`` batch) of a torch module."""
    import torch
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(params), int(macs)


def torch_size_bytes(model: Any) -> int:
    """Bytes of the module's state_dict as ``torch.save`` writes it (what a checkpoint costs)."""
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def onnx_params(path: Path) -> int:
    """Elements of every floating-point or integer weight initializer (scales and zero points of
    a QDQ graph are scalars or per-channel vectors and count too, as they are part of the model)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(t).size for t in model.graph.initializer))


def _shape(value_info: Any) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    if not dims:
        return None
    return [d.dim_value if d.HasField("dim_value") else 1 for d in dims]


def onnx_macs(path: Path, batch: int = 1, input_shape: tuple[int, ...] | None = None) -> int:
    """MACs for a batch of ``batch`` through the ONNX graph at ``path``.

    ``input_shape`` (N, C, H, W) fixes dynamic dimensions (a graph with dynamic height and
    width has no MAC count until the tile is known); otherwise a dynamic dimension counts as 1.
    The total is per sample, scaled by ``batch``.
    """
    import onnx

    model = onnx.load(str(path))
    if input_shape is not None:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        for dim, value in zip(dims, (1, *input_shape[1:]), strict=True):
            dim.Clear()
            dim.dim_value = int(value)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        shape = _shape(vi)
        if shape is not None:
            shapes[vi.name] = shape
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    # A QDQ graph feeds weights through DequantizeLinear: the weight's shape is its input's.
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    total = 0
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            weight = shapes.get(node.input[1])
            if weight is None:
                continue
            if node.op_type == "Conv":
                out = shapes.get(node.output[0])
                if out is None:
                    continue
                # Each output element costs (Cin / groups) * kernel area MACs.
                total += int(np.prod(out[1:])) * int(np.prod(weight[1:]))
            else:
                inp = shapes.get(node.input[0])
                if inp is None:
                    continue
                # Each input element is spread over (Cout / groups) * kernel area outputs.
                total += int(np.prod(inp[1:])) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if a is None or b is None:
                continue
            rows = int(np.prod(a[:-1])) if node.op_type == "MatMul" else 1
            total += rows * int(np.prod(b))
    return total * batch


def files_size_bytes(*paths: Path) -> int:
    return int(sum(Path(p).stat().st_size for p in paths))


def latency_ms(run: Callable[[np.ndarray], Any], batch: np.ndarray, repeats: int = 20,
               warmup: int = 3) -> float:
    """Median wall time of ``run(batch)`` in milliseconds over ``repeats`` runs after
    ``warmup`` runs (first runs pay for allocation and kernel selection)."""
    return latency_stats(run, batch, repeats, warmup)[0]


def latency_stats(run: Callable[[np.ndarray], Any], batch: np.ndarray, repeats: int = 20,
                  warmup: int = 3) -> tuple[float, float]:
    """(median, minimum) wall time in milliseconds. On a shared machine the minimum is the
    better estimate of the model's own cost; the median is what a pass would see."""
    for _ in range(warmup):
        run(batch)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run(batch)
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times)), float(min(times))


def latency_stats_alternating(factories: dict[str, Callable[[], Callable[[np.ndarray], Any]]],
                              batch: np.ndarray, repeats: int = 20, warmup: int = 3,
                              block: int = 10) -> dict[str, tuple[float, float]]:
    """(median, minimum) ms of the runner each factory makes, timed in alternating blocks of
    ``block`` runs so that a change in the shared machine's load falls on all of them alike:
    only ratios within one call are compared.

    Each block gets a fresh runner and only one is alive at a time: an idle ONNX Runtime
    session's threads keep spinning and slowed another session's runs 3x on 2 cores (measured),
    which made interleaved timings say more about the order than about the models. A runner
    that is the bound method of an object with ``close()`` (a flight engine's ``run``) is
    closed after its block.
    """
    times: dict[str, list[float]] = {name: [] for name in factories}
    rounds = max(1, -(-max(1, repeats) // block))
    for _ in range(rounds):
        for name, make in factories.items():
            run = make()
            for _ in range(warmup):
                run(batch)
            for _ in range(block):
                start = time.perf_counter()
                run(batch)
                times[name].append((time.perf_counter() - start) * 1000.0)
            close = getattr(getattr(run, "__self__", None), "close", None)
            if close is not None:
                close()
            del run
    return {name: (float(statistics.median(t)), float(min(t))) for name, t in times.items()}
