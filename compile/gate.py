"""The accuracy gate and the compile report.

After every step the model's own metric (``ZooModel.metric``) is measured on the model's
validation batches with the engine of that step. The drop is measured from the fp32 torch
baseline. A step whose model is carried forward must stay within ``max_drop``; a pruned model
that is then fine-tuned is judged after its fine-tune (pruning alone is expected to lose
accuracy; the fine-tune is what recovers it), but its numbers are still reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from onboard.runtime.errors import AccuracyGateError, CompileError

Metric = Callable[[list[np.ndarray], list[np.ndarray]], float]
# A zoo entry that names its gate scenes (extra["gate_scenes"]) gates on at least this much data
# no step trained or calibrated on: two tiles cannot see a regression.
MIN_GATE_TILES = 64
MIN_GATE_SCENES = 3


def evaluate(run: Callable[[np.ndarray], np.ndarray],
             batches: list[tuple[np.ndarray, np.ndarray]], metric: Metric) -> float:
    """``metric`` of ``run`` over every validation batch."""
    outputs, labels = [], []
    for x, y in batches:
        outputs.append(np.asarray(run(x)))
        labels.append(y)
    value = float(metric(outputs, labels))
    if not math.isfinite(value):
        raise CompileError(f"the model's metric returned {value} on the validation set")
    return value


def check_max_drop(max_drop: float | None) -> float | None:
    """``max_drop`` as a float, or a clear error for a negative, NaN or infinite budget."""
    if max_drop is None:
        return None
    try:
        value = float(max_drop)
    except (TypeError, ValueError) as error:
        raise CompileError(f"--max-drop must be a number, got {max_drop!r}") from error
    if not math.isfinite(value) or value < 0:
        raise CompileError(
            f"--max-drop must be a finite number >= 0 (an absolute drop of the model's metric, "
            f"e.g. 0.01 for one point of a 0-1 metric), got {max_drop!r}"
        )
    return value


@dataclass
class StepResult:
    """One compile step, measured."""

    step: str  # "fp32", "pruned", "fine-tuned", "onnx-fp32", "int8-qdq", ...
    engine: str  # the engine that ran it: "torch", "onnxruntime", "openvino"
    precision: str
    params: int
    macs: int  # per tile (batch of 1)
    size_bytes: int
    latency_ms: float  # median, one tile, on this machine
    metric: float
    gated: bool = True
    drop: float = 0.0  # from the fp32 baseline; positive = worse
    step_drop: float = 0.0  # from the previous step
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    latency_min_ms: float = 0.0  # fastest run, same conditions


class Gate:
    """Collects step results and enforces ``max_drop`` (absolute, in the metric's units)."""

    def __init__(self, metric_name: str, max_drop: float | None = None) -> None:
        self.metric_name = metric_name or "metric"
        self.max_drop = check_max_drop(max_drop)
        self.steps: list[StepResult] = []
        self.failed: str | None = None

    @property
    def baseline(self) -> float:
        if not self.steps:
            raise CompileError("the gate has no baseline: the fp32 step was not measured")
        return self.steps[0].metric

    def add(self, result: StepResult) -> StepResult:
        """Record ``result``; raises :class:`AccuracyGateError` if it is gated and over budget."""
        if self.steps:
            result.drop = self.baseline - result.metric
            result.step_drop = self.steps[-1].metric - result.metric
        self.steps.append(result)
        if (result.gated and self.max_drop is not None
                and result.drop > self.max_drop + 1e-12):
            self.failed = result.step
            raise AccuracyGateError(
                f"accuracy gate failed at step {result.step!r} ({result.engine}, "
                f"{result.precision}): {self.metric_name} {result.metric:.4f} is "
                f"{result.drop:.4f} below the fp32 model's {self.baseline:.4f} "
                f"(this step lost {result.step_drop:.4f}); --max-drop allows {self.max_drop:g}",
                step=result.step, report=self.as_dict(),
            )
        return result

    def as_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric_name,
            "max_drop": self.max_drop,
            "passed": self.failed is None,
            "failed_step": self.failed,
            "steps": [asdict(s) for s in self.steps],
        }


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} G"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page (what a human reads before approving an uplink)."""
    gate = report["gate"]
    metric = gate["metric"]
    lines = [
        f"# Compile report: {report['model']} → {report['target']} {report['precision']}",
        "",
        f"- result: **{'passed' if gate['passed'] else 'FAILED at ' + str(gate['failed_step'])}**",
        f"- metric: {metric} on {report.get('validation', {}).get('tiles', '?')} validation tiles;"
        f" max drop: {gate['max_drop'] if gate['max_drop'] is not None else 'not set'}",
        f"- prune ratio: {report['options'].get('prune')}; fine-tune epochs: "
        f"{report['options'].get('finetune_epochs')}",
        f"- latency: median (and minimum) of {report['options'].get('latency_repeats')} runs, one "
        f"{report.get('tile', '?')} tile, {report['options'].get('threads')} threads, "
        f"{report.get('machine', '')}",
        "",
        f"| step | engine | precision | params | MACs/tile | size MB | latency ms (min) | {metric} "
        "| drop | step drop | gated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in gate["steps"]:
        lines.append(
            f"| {s['step']} | {s['engine']} | {s['precision']} | {_count(s['params'])} | "
            f"{_count(s['macs'])} | {_mb(s['size_bytes'])} | {s['latency_ms']:.2f} "
            f"({s.get('latency_min_ms', 0.0):.2f}) | "
            f"{s['metric']:.4f} | {s['drop']:+.4f} | {s['step_drop']:+.4f} | "
            f"{'yes' if s['gated'] else 'no'} |"
        )
    notes = [f"- {s['step']}: {s['notes']}" for s in gate["steps"] if s["notes"]]
    for s in gate["steps"]:
        level = s.get("extra", {}).get("graph_optimization")
        if level:
            timings = ", ".join(f"{k} {v:.2f} ms" for k, v in
                                s["extra"].get("graph_optimization_ms", {}).items())
            notes.append(f"- {s['step']}: ONNX Runtime graph optimisation `{level}` "
                         f"(measured here: {timings})")
    if notes:
        lines += ["", "Notes:", *notes]
    if report.get("bundle"):
        b = report["bundle"]
        lines += ["", f"Bundle: `{b.get('path')}`, {_mb(b.get('size_bytes', 0))} MB, engines "
                  f"{b.get('engines')}"]
        if b.get("verified_metric") is not None:
            lines.append(f"Verified by reopening the bundle with the flight runtime: {metric} "
                         f"{b['verified_metric']:.4f}")
    if report.get("error"):
        lines += ["", f"Error: {report['error']}"]
    lines += ["", "Toolchain: " + ", ".join(f"{k} {v}" for k, v in report["toolchain"].items())]
    return "\n".join(lines) + "\n"
