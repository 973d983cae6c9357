"""``onboard compile``: every step from a trained torch model to a verified bundle, in one place.

fp32 torch baseline → [channel pruning → fine-tune] → ONNX fp32 → target precision
(ONNX Runtime QDQ int8 / OpenVINO IR fp32, fp16 or NNCF int8 / TensorRT symmetric QDQ) →
bundle → reopen the bundle with the flight runtime and measure again.

Each step is measured (parameters, MACs, size, latency, the model's own metric on its
validation set with the step's real engine) and passed through the accuracy gate.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import itertools
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onboard.compile import export, gate, measure, openvino, prune, quantize, runners
from onboard.models.data import default_data_root
from onboard.models.zoo import ZooModel
from onboard.runtime.errors import AccuracyGateError, CompileError, SizeBudgetError

TARGETS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")


def _progress(message: str) -> None:
    print(f"[compile] {message}", file=sys.stderr, flush=True)


@dataclass
class CompileOptions:
    """What ``onboard compile`` was asked for; validated on creation."""

    target: str
    precision: str = "fp32"
    prune: float = 0.0
    # Keep pruned channel counts multiples of this (SIMD width: 16 floats on AVX-512).
    round_to: int | None = None
    max_drop: float | None = None
    max_size_mb: float | None = None  # 1 MB = 10**6 bytes, as uplink budgets are quoted
    data_root: Path | None = None
    finetune_epochs: int | None = None  # None: the zoo entry's extra["finetune_epochs"] or 3
    finetune_lr: float | None = None  # None: the zoo entry's extra["finetune_lr"] or 1e-3
    # At most this many batches per epoch (a zoo's training iterator may be long or endless).
    finetune_steps: int | None = None
    calibration_tiles: int = 64
    seed: int = 0
    threads: int = 2
    latency_repeats: int = 20
    version: str | None = None
    verify: bool = True
    # Ed25519 private key (NAME.ed25519) that signs the bundle once every check has passed.
    sign_key: Path | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise CompileError(f"unknown target {self.target!r}; choose one of {TARGETS}")
        if self.precision not in PRECISIONS:
            raise CompileError(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if not (isinstance(self.prune, int | float) and math.isfinite(self.prune)
                and 0.0 <= self.prune < 1.0):
            raise CompileError(f"--prune must be a ratio in [0, 1), got {self.prune!r}")
        if self.round_to is not None and self.round_to < 1:
            raise CompileError(f"--round-to must be >= 1, got {self.round_to}")
        self.max_drop = gate.check_max_drop(self.max_drop)
        if self.max_size_mb is not None and not (math.isfinite(self.max_size_mb)
                                                 and self.max_size_mb > 0):
            raise CompileError(f"--max-size must be a positive size in MB, got {self.max_size_mb}")
        if self.finetune_epochs is not None and self.finetune_epochs < 0:
            raise CompileError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")
        if self.finetune_steps is not None and self.finetune_steps < 1:
            raise CompileError(f"--finetune-steps must be >= 1, got {self.finetune_steps}")
        if self.calibration_tiles < 1:
            raise CompileError(f"--calibration-tiles must be >= 1, got {self.calibration_tiles}")
        if self.threads < 1 or self.latency_repeats < 1:
            raise CompileError("--threads and --latency-repeats must be >= 1")
        if self.data_root is not None:
            self.data_root = Path(self.data_root)
        if self.sign_key is not None:
            self.sign_key = Path(self.sign_key)


@dataclass
class CompileResult:
    bundle: Path | None
    report: dict[str, Any]
    report_json: Path
    report_md: Path
    steps: list[gate.StepResult] = field(default_factory=list)


# --- inputs -----------------------------------------------------------------------------------

def resolve_model(spec: str) -> ZooModel:
    """A zoo name (``cloud-4band``) or ``pkg.module:attr`` naming a ZooModel or a callable that
    returns one (a user's own model description)."""
    from onboard.models import zoo

    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise CompileError(f"cannot import model description {spec!r}: {error}") from error
        if not isinstance(obj, ZooModel) and callable(obj):
            obj = obj()
        if not isinstance(obj, ZooModel):
            raise CompileError(f"{spec!r} is a {type(obj).__name__}, not a ZooModel")
        return obj
    try:
        return zoo.get(spec)
    except KeyError as error:
        raise CompileError(str(error.args[0])) from error


def import_class(spec: str) -> Callable[[], Any]:
    """``pkg.module:Class`` → the class (called with no arguments to build the network)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not attr:
        raise CompileError(f"--model-class must look like pkg.module:Class, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise CompileError(f"cannot import model class {spec!r}: {error}") from error


def load_model(build: Callable[[], Any], checkpoint: Path) -> Any:
    """Build the network and load ``checkpoint`` strictly; a mismatch is a clear error."""
    import torch

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CompileError(f"{checkpoint}: checkpoint not found")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise CompileError(f"{checkpoint}: not a torch checkpoint ({error})") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CompileError(f"{checkpoint}: expected a state_dict, found {type(state).__name__}")
    model = build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        raise CompileError(
            f"{checkpoint}: checkpoint does not match model class "
            f"{type(model).__module__}.{type(model).__qualname__}: {detail}"
        ) from error
    model.eval()
    return model


def _check_bands(what: str, x: np.ndarray, zoo: ZooModel, root: Path) -> None:
    if x.ndim != 4:
        raise CompileError(f"{what} from {root}: expected NCHW tiles, got shape {x.shape}")
    if x.shape[1] != len(zoo.bands):
        raise CompileError(
            f"{what} from {root} has {x.shape[1]} bands, but {zoo.name} takes "
            f"{len(zoo.bands)} ({', '.join(zoo.bands)})"
        )


def load_data(zoo: ZooModel, root: Path, n_calibration: int
              ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    if zoo.validation_batches is None or zoo.metric is None:
        raise CompileError(f"{zoo.name}: the zoo entry has no validation data or metric, so no "
                           "step can be verified")
    if zoo.calibration_tiles is None:
        raise CompileError(f"{zoo.name}: the zoo entry has no calibration tiles")
    validation = [(np.ascontiguousarray(x, dtype=np.float32), np.asarray(y))
                  for x, y in zoo.validation_batches(root)]
    if not validation:
        raise CompileError(f"{zoo.name}: validation data from {root} is empty")
    for x, _ in validation:
        _check_bands("validation data", x, zoo, root)
    tiles = np.ascontiguousarray(zoo.calibration_tiles(root, n_calibration), dtype=np.float32)
    _check_bands("calibration data", tiles, zoo, root)
    if len(tiles) == 0:
        raise CompileError(f"{zoo.name}: calibration data from {root} is empty")
    if not np.isfinite(tiles).all():
        raise CompileError(f"calibration data from {root} contains NaN or infinite values")
    return validation, tiles


def toolchain() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name, dist in (("onboard", "onboard"), ("torch", "torch"), ("onnx", "onnx"),
                       ("onnxruntime", "onnxruntime"), ("onnxslim", "onnxslim"),
                       ("openvino", "openvino"), ("nncf", "nncf"),
                       ("torch_pruning", "torch-pruning")):
        try:
            versions[name] = version(dist)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dir_size(path: Path) -> int:
    if path.is_dir():
        return int(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the pipeline -----------------------------------------------------------------------------

class _Steps:
    """Measures one step with its engine and hands it to the gate."""

    def __init__(self, zoo: ZooModel, options: CompileOptions,
                 validation: list[tuple[np.ndarray, np.ndarray]], the_gate: gate.Gate,
                 tiles: np.ndarray) -> None:
        self.zoo = zoo
        self.options = options
        self.validation = validation
        self.gate = the_gate
        size = (zoo.tile_size, zoo.tile_size)
        # Latency, MACs and the export use one tile of the model's nominal size; the
        # calibration tiles have it (validation tiles may be cut differently).
        if tiles.shape[2:] == size:
            self.tile = np.ascontiguousarray(tiles[:1])
        else:
            self.tile = np.ascontiguousarray(validation[0][0][:1])
        # Validation tiles of another size need a graph with free height and width; a zoo entry
        # may ask for one too (an encoder whose windows carry a halo on board).
        self.dynamic_size = bool(zoo.extra.get("dynamic_size")) or any(
            x.shape[2:] != self.tile.shape[2:] for x, _ in validation)

    def add(self, step: str, engine: str, precision: str, run: runners.Runner, params: int,
            macs: int, size: int, gated: bool = True, notes: str = "",
            extra: dict[str, Any] | None = None) -> gate.StepResult:
        _progress(f"measuring {step} ({engine}, {precision}) on {len(self.validation)} "
                  "validation batches")
        metric = gate.evaluate(run, self.validation, self.zoo.metric)
        latency, fastest = measure.latency_stats(run, self.tile,
                                                 repeats=self.options.latency_repeats)
        result = gate.StepResult(step, engine, precision, params, macs, size, latency, metric,
                                 gated=gated, notes=notes, extra=extra or {},
                                 latency_min_ms=fastest)
        try:
            return self.gate.add(result)
        finally:
            _progress(f"{step}: {self.gate.metric_name} {metric:.4f} (drop {result.drop:+.4f}), "
                      f"{latency:.2f} ms/tile, {size / 1e6:.3f} MB, {macs / 1e6:.1f} M MACs")

    def torch_step(self, step: str, model: Any, gated: bool = True,
                   notes: str = "") -> gate.StepResult:
        import torch

        example = torch.from_numpy(self.tile)
        params, macs = measure.torch_params_macs(model, example)
        return self.add(step, "torch", "fp32", runners.torch_runner(model, self.options.threads),
                        params, macs, measure.torch_size_bytes(model), gated, notes)

    def onnx_step(self, step: str, path: Path, precision: str, notes: str = "",
                  macs_from: Path | None = None) -> gate.StepResult:
        level, timings = self.ort_graph_optimization(path)
        extra = {"graph_optimization": level,
                 "graph_optimization_ms": {k: round(v[0], 3) for k, v in timings.items()}}
        return self.add(step, "onnxruntime", precision,
                        runners.ort_runner(path, self.options.threads, level),
                        measure.onnx_params(path),
                        measure.onnx_macs(macs_from or path, input_shape=self.tile.shape),
                        measure.files_size_bytes(path), notes=notes, extra=extra)

    def ort_graph_optimization(self, path: Path) -> tuple[str, dict[str, tuple[float, float]]]:
        """ONNX Runtime's ``all`` or ``extended`` graph optimisation, whichever runs ``path``
        faster here: ``all`` adds the x86 NCHWc layout, a loss for convolutions narrower than
        the 16-float vector (pruned models). ``all`` unless ``extended``'s fastest run is 10 %
        faster than ``all``'s."""
        threads = self.options.threads
        timings = measure.latency_stats_alternating(
            {level: functools.partial(runners.ort_runner, path, threads, level)
             for level in ("all", "extended")},
            self.tile, repeats=self.options.latency_repeats)
        # Minima: a load spike on this shared machine during one block must not flip the choice.
        faster = timings["extended"][1] < 0.9 * timings["all"][1]
        return ("extended" if faster else "all"), timings

    def ir_step(self, step: str, xml: Path, precision: str, source_onnx: Path,
                notes: str = "", extra: dict[str, Any] | None = None) -> gate.StepResult:
        return self.add(step, "openvino", precision,
                        runners.ov_runner(xml, self.options.threads, "f32"),
                        measure.onnx_params(source_onnx),
                        measure.onnx_macs(source_onnx, input_shape=self.tile.shape),
                        measure.files_size_bytes(*openvino.ir_files(xml)), notes=notes,
                        extra=extra)


def compile_model(zoo: ZooModel, out: Path, options: CompileOptions,
                  checkpoint: Path | None = None, model_class: str | None = None) -> CompileResult:
    """Compile ``zoo`` for ``options.target`` into the bundle ``out``.

    Raises :class:`AccuracyGateError` (the report is still written next to ``out``) when a step
    loses more than ``options.max_drop``, :class:`SizeBudgetError` when the bundle exceeds
    ``options.max_size_mb``, :class:`CompileError` for bad inputs.
    """
    import torch

    started = time.perf_counter()
    out = Path(out)
    root = options.data_root or default_data_root()
    report_json = out.parent / f"{out.name}.report.json"
    report_md = out.parent / f"{out.name}.report.md"
    build = import_class(model_class) if model_class else zoo.build
    weights = Path(checkpoint) if checkpoint else Path(zoo.weights)
    # Read the key before minutes of compiling: a wrong path or a public half fails now.
    signer = _signing_key(options.sign_key)
    _seed(options.seed)
    torch.set_num_threads(options.threads)

    _progress(f"loading {zoo.name} from {weights}")
    model = load_model(build, weights)
    _progress(f"loading validation and calibration data from {root}")
    validation, tiles = load_data(zoo, root, options.calibration_tiles)
    check_gate_set(zoo, validation)
    with torch.no_grad():
        try:
            sample_out = model(torch.from_numpy(validation[0][0][:1]))
        except RuntimeError as error:
            raise CompileError(
                f"{weights}: the model cannot run on a {validation[0][0][:1].shape} tile of "
                f"{zoo.name}'s data: {' '.join(str(error).split())[:300]}") from error
    out_channels = int(sample_out.shape[1])

    the_gate = gate.Gate(zoo.metric_name, options.max_drop)
    steps = _Steps(zoo, options, validation, the_gate, tiles)
    epochs = options.finetune_epochs
    if epochs is None:
        epochs = int(zoo.extra.get("finetune_epochs", 3))
    lr = options.finetune_lr or float(zoo.extra.get("finetune_lr", 1e-3))
    report: dict[str, Any] = {
        "model": zoo.name, "model_version": zoo.version, "target": options.target,
        "precision": options.precision, "checkpoint": str(weights),
        "checkpoint_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "model_class": model_class or f"{type(model).__module__}.{type(model).__qualname__}",
        "options": {**{k: (str(v) if isinstance(v, Path) else v)
                       for k, v in asdict(options).items()},
                    "finetune_epochs": epochs, "finetune_lr": lr},
        "data_root": str(root), "tile": "x".join(str(d) for d in steps.tile.shape[1:]),
        "validation": {"batches": len(validation),
                       "tiles": int(sum(len(x) for x, _ in validation))},
        "calibration_tiles": int(len(tiles)),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "toolchain": toolchain(),
    }

    work = Path(tempfile.mkdtemp(prefix="onboard-compile-"))
    try:
        try:
            members, engines, notes = _run_steps(model, zoo, options, steps, tiles, work,
                                                 validation, epochs, lr)
        except AccuracyGateError as error:
            report["gate"] = the_gate.as_dict()
            report["error"] = str(error)
            _write_reports(report, report_json, report_md)
            raise
        report["gate"] = the_gate.as_dict()
        final = the_gate.steps[-1]
        metrics = {
            the_gate.metric_name: final.metric,
            f"{the_gate.metric_name}_fp32": the_gate.baseline,
            f"{the_gate.metric_name}_drop": final.drop,
            "latency_ms_per_tile": final.latency_ms,
            "macs_per_tile": final.macs,
            "params": final.params,
            "validation_tiles": report["validation"]["tiles"],
        }
        report_in_bundle = dict(report)
        _progress(f"writing bundle {out}")
        _write_bundle(out, zoo, options, members, engines, metrics, out_channels,
                      report_in_bundle, notes)
        if signer is not None:
            # Signed before the size and runtime checks, so both judge the bundle as it will be
            # uplinked; a bundle either check refuses is removed, signature and all.
            report["signature"] = _sign(out, signer)
        size = _dir_size(out)
        report["bundle"] = {"path": str(out), "size_bytes": size, "engines": engines}
        if options.max_size_mb is not None and size > options.max_size_mb * 1e6:
            _remove(out)
            report["error"] = (f"bundle is {size / 1e6:.3f} MB, over the uplink budget of "
                               f"{options.max_size_mb:g} MB")
            _write_reports(report, report_json, report_md)
            raise SizeBudgetError(f"{out}: {report['error']}; the bundle was not kept "
                                  "(prune more or quantise to int8)")
        if options.verify:
            verified = _verify(out, options, validation, zoo, engines, signer)
            if verified is not None:
                report["bundle"]["verified_metric"] = verified
                tolerance = 1e-3 if options.precision == "fp32" else 5e-3
                if abs(verified - final.metric) > tolerance:
                    _remove(out)
                    report["error"] = (
                        f"the bundle reopened by the flight runtime scores {verified:.4f}, "
                        f"the compiler measured {final.metric:.4f} for the same model")
                    _write_reports(report, report_json, report_md)
                    raise CompileError(f"{out}: {report['error']}")
        report["seconds"] = round(time.perf_counter() - started, 1)
        _write_reports(report, report_json, report_md)
        _progress(f"done: {out} ({size / 1e6:.3f} MB), report {report_md}")
        return CompileResult(out, report, report_json, report_md, list(the_gate.steps))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _quantize_qdq(zoo: ZooModel, onnx_path: Path, out: Path, tiles: np.ndarray,
                  target: str) -> Path:
    """INT8 QDQ as the zoo entry asks for it (which nodes, and weight-only elsewhere)."""
    return quantize.quantize_qdq(onnx_path, out, tiles, target,
                                 zoo.extra.get("int8_only_prefix"),
                                 zoo.extra.get("int8_weights_elsewhere", False))


def _run_steps(model: Any, zoo: ZooModel, options: CompileOptions, steps: _Steps,
               tiles: np.ndarray, work: Path, validation: list[tuple[np.ndarray, np.ndarray]],
               epochs: int, lr: float
               ) -> tuple[dict[str, Path], dict[str, str], dict[str, Any]]:
    import torch

    root = options.data_root or default_data_root()
    steps.torch_step("fp32", model)
    if options.prune > 0:
        _progress(f"pruning {options.prune:.0%} of the channels (torch-pruning, L2 magnitude)")
        example = torch.from_numpy(steps.tile)
        prune.prune_channels(model, example, options.prune, round_to=options.round_to)
        can_tune = epochs > 0 and zoo.train_batches is not None and zoo.loss is not None
        steps.torch_step("pruned", model, gated=not can_tune,
                         notes="judged after its fine-tune" if can_tune else
                         "not fine-tuned (no epochs, training data or loss)")
        if can_tune:
            _seed(options.seed)
            _progress(f"fine-tuning {epochs} epochs at lr {lr:g} with {zoo.name}'s loss")
            cap = options.finetune_steps

            def batches() -> Any:
                it = zoo.train_batches(root)
                return it if cap is None else itertools.islice(it, cap)

            prune.fine_tune(model, batches, zoo.loss, epochs, lr,
                            options.seed, options.threads)
            steps.torch_step("fine-tuned", model)

    _progress("exporting ONNX (opset 17) and simplifying with onnxslim")
    onnx_path = export.export_onnx(model, torch.from_numpy(steps.tile), work / "model.onnx",
                                   dynamic_size=steps.dynamic_size)
    steps.onnx_step("onnx-fp32", onnx_path, "fp32")
    notes: dict[str, Any] = {}
    target, precision = options.target, options.precision

    if target == "onnxruntime":
        if precision == "fp32":
            last, path = steps.gate.steps[-1], onnx_path
        elif precision == "fp16":
            path = quantize.convert_fp16(onnx_path, work / "model.fp16.onnx")
            last = steps.onnx_step("onnx-fp16", path, "fp16", macs_from=onnx_path)
        else:
            _progress(f"INT8 QDQ for ONNX Runtime, calibrating on {len(tiles)} tiles")
            path = _quantize_qdq(zoo, onnx_path, work / "model.qdq.onnx", tiles, "onnxruntime")
            last = steps.onnx_step(
                "int8-qdq", path, "int8",
                notes="U8 activations (asymmetric), S8 per-channel weights, MinMax")
        # The flight engine opens the bundle with the graph optimisation measured fastest.
        notes["onnxruntime"] = {"graph_optimization": last.extra["graph_optimization"],
                                "measured_ms": last.extra["graph_optimization_ms"]}
        return {"model.onnx": path}, {"onnxruntime": "model.onnx"}, notes

    if target == "openvino":
        xml = work / "model.xml"
        if precision == "int8":
            _progress(f"INT8 with NNCF, calibrating on {len(tiles)} tiles"
                      + (f", accuracy control max drop {options.max_drop:g}"
                         if options.max_drop is not None else ""))
            _, details = openvino.quantize_nncf(
                onnx_path, xml, tiles, validation=validation if options.max_drop is not None
                else None, metric=zoo.metric, max_drop=options.max_drop, seed=options.seed,
                only_prefix=zoo.extra.get("int8_only_prefix"))
            steps.ir_step("ir-int8-nncf", xml, "int8", onnx_path, extra=details,
                          notes=f"{details['method']}; non-quantised ops run f32")
        else:
            openvino.to_ir(onnx_path, xml, fp16=precision == "fp16")
            steps.ir_step(f"ir-{precision}", xml, precision, onnx_path,
                          notes="weights stored fp16, run with f32 hint on this CPU"
                          if precision == "fp16" else "INFERENCE_PRECISION_HINT f32")
        members = {"model.xml": xml, "model.bin": xml.with_suffix(".bin")}
        return members, {"openvino": "model.xml"}, notes

    # tensorrt: the engine is built on the target; ship the (QDQ) ONNX graph.
    min_hw = (min(int(x.shape[2]) for x, _ in validation),
              min(int(x.shape[3]) for x, _ in validation))
    notes["tensorrt"] = {
        "build_on_target": True,
        "input_name": export.INPUT_NAME,
        "output_name": export.OUTPUT_NAME,
        "opset": export.OPSET,
        "dynamic_size": steps.dynamic_size,
        "profile": {"min": [1, len(zoo.bands), *(min_hw if steps.dynamic_size
                                                  else (zoo.tile_size, zoo.tile_size))],
                    "opt": [1, len(zoo.bands), zoo.tile_size, zoo.tile_size],
                    "max": [8, len(zoo.bands), zoo.tile_size, zoo.tile_size]},
        "builder_flags": {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision],
        "quantization": "explicit QDQ, symmetric int8 activations and per-channel weights"
        if precision == "int8" else None,
        "workspace_mb": 512,
    }
    if precision == "int8":
        _progress(f"symmetric INT8 QDQ for TensorRT, calibrating on {len(tiles)} tiles")
        path = _quantize_qdq(zoo, onnx_path, work / "model.qdq.onnx", tiles, "tensorrt")
        steps.onnx_step("int8-qdq-trt", path, "int8",
                        notes="symmetric S8 activations and weights (TensorRT explicit "
                        "quantisation); measured with ONNX Runtime on CPU, TensorRT builds its "
                        "engine on the target")
        return {"model.qdq.onnx": path}, {"tensorrt": "model.qdq.onnx"}, notes
    return {"model.onnx": onnx_path}, {"tensorrt": "model.onnx"}, notes


def check_gate_set(zoo: ZooModel, validation: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """A zoo entry that names its gate scenes must gate on enough of them to see a regression:
    at least ``gate.MIN_GATE_TILES`` tiles from ``gate.MIN_GATE_SCENES`` scenes, one validation
    batch per named scene (in the same order) and at least one tile in each. Counting names
    alone would let a scene that yields no tile (too small, all no data) pass as gated on."""
    scenes = zoo.extra.get("gate_scenes")
    if scenes is None:
        return
    scenes = list(scenes() if callable(scenes) else scenes)
    tiles = int(sum(len(x) for x, _ in validation))
    if tiles < gate.MIN_GATE_TILES or len(scenes) < gate.MIN_GATE_SCENES:
        raise CompileError(
            f"{zoo.name}: the accuracy gate would see {tiles} tiles from {len(scenes)} scenes; "
            f"it needs at least {gate.MIN_GATE_TILES} tiles from {gate.MIN_GATE_SCENES} scenes "
            "that were not used for training or calibration")
    if len(validation) != len(scenes):
        raise CompileError(
            f"{zoo.name}: {len(validation)} validation batches for {len(scenes)} named gate "
            "scenes; the entry must give one batch per scene, in the order of "
            "extra['gate_scenes'], so the manifest names what the gate saw")
    empty = [str(name) for name, (x, _) in zip(scenes, validation, strict=True) if len(x) == 0]
    if empty:
        raise CompileError(
            f"{zoo.name}: gate scenes with no validation tile: {', '.join(empty)}; each named "
            "scene must contribute at least one tile")


def gate_extra(zoo: ZooModel, metrics: dict[str, Any]) -> dict[str, Any]:
    """``{"gate": {...}}`` for the manifest where the zoo entry names its validation scenes
    (``extra["gate_scenes"]``, a list or a callable returning one): which scenes, how many
    tiles and which metric every step was gated on, so a reader of the bundle can judge the
    gate without the compile report."""
    scenes = zoo.extra.get("gate_scenes")
    if scenes is None:
        return {}
    scenes = list(scenes() if callable(scenes) else scenes)
    return {"gate": {"scenes": scenes, "tiles": int(metrics["validation_tiles"]),
                     "metric": zoo.metric_name,
                     "fp32": metrics.get(f"{zoo.metric_name}_fp32"),
                     "final": metrics.get(zoo.metric_name)}}


def _write_bundle(out: Path, zoo: ZooModel, options: CompileOptions, members: dict[str, Path],
                  engines: dict[str, str], metrics: dict[str, Any], out_channels: int,
                  report: dict[str, Any], notes: dict[str, Any]) -> None:
    import json

    from onboard.runtime.bundle import InputSpec, Manifest, OutputSpec, write_bundle
    from onboard.runtime.bundle.manifest import DEFAULT_OUTPUT_NAME

    # What the runtime needs beyond the tensors (the change model's latent scale and
    # calibration); a callable so that it is read when the bundle is written.
    manifest_extra = zoo.extra.get("manifest_extra", {})
    if callable(manifest_extra):
        manifest_extra = manifest_extra()
    manifest = Manifest(
        name=zoo.name,
        version=options.version or zoo.version,
        task=zoo.task,
        input=InputSpec(bands=list(zoo.bands), dtype="float32", scale=list(zoo.input_scale),
                        offset=list(zoo.input_offset), tile_size=zoo.tile_size,
                        gsd_m=zoo.gsd_m, layout="NCHW"),
        output=OutputSpec(kind=zoo.output_kind, channels=out_channels,
                          classes={int(k): v for k, v in zoo.classes.items()},
                          scale_factor=int(zoo.extra.get("scale_factor", 1)),
                          description=zoo.extra.get("output_description",
                                                    f"{zoo.output_kind} per pixel"),
                          # A per-cell vector output (an encoder) names its grid and tensor.
                          name=zoo.extra.get("output_name", DEFAULT_OUTPUT_NAME),
                          cell_size=int(zoo.extra.get("cell_size", 0))),
        precision=options.precision,
        engines=engines,
        metrics=metrics,
        toolchain=report["toolchain"],
        extra={"compile": {"target": options.target, "prune": options.prune,
                           "max_drop": options.max_drop, "seed": options.seed,
                           "metric": zoo.metric_name}, **notes, **manifest_extra,
               **gate_extra(zoo, metrics)},
    )
    payload: dict[str, bytes | Path] = dict(members)
    payload["report.json"] = json.dumps(report, indent=2, default=str).encode()
    payload["report.md"] = gate.markdown(report).encode()
    # write_bundle replaces ``out`` atomically: a previous bundle survives a failed write.
    write_bundle(out, manifest, payload)


def _signing_key(path: Path | None) -> Any:
    if path is None:
        return None
    from onboard.runtime.bundle.signature import load_signing_key

    return load_signing_key(path)


def _sign(out: Path, signer: Any) -> dict[str, Any]:
    """Sign the bundle at ``out`` in place; what the report says about the signature."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.bundle.signature import ALGORITHM, sign_bundle

    _progress(f"signing {out} with key {signer.name} ({signer.key_id})")
    sign_bundle(out, signer)
    return {"algorithm": ALGORITHM, "key_name": signer.name, "key_id": signer.key_id,
            "manifest_sha256": Bundle.open(out).manifest_sha256}


def _verify(out: Path, options: CompileOptions, validation: list[tuple[np.ndarray, np.ndarray]],
            zoo: ZooModel, engines: dict[str, str], signer: Any = None) -> float | None:
    """The bundle's metric as the flight runtime runs it, or None where that engine is not
    available here (TensorRT). A signed bundle is opened trusting only its signer's public
    half, so the signature is checked the way a board checks it."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.bundle.signature import Keyring, TrustPolicy, verify_bundle
    from onboard.runtime.engines import open_engine

    backend = next(iter(engines))
    trust = None if signer is None else TrustPolicy(Keyring([signer.public]))
    if backend == "tensorrt":
        if trust is not None:
            verify_bundle(Bundle.open(out), trust)
        return None
    _progress(f"verifying the bundle with the flight runtime ({backend})")
    bundle = Bundle.open(out)
    # An fp16 IR is checked as the compiler measured it (f32 compute on this CPU); on board the
    # engine asks the device for f16.
    precision = "fp32" if options.precision == "fp16" else options.precision
    engine = open_engine(bundle, backend, "cpu", threads=options.threads, precision=precision,
                         trust=trust)
    try:
        return gate.evaluate(engine.run, validation, zoo.metric)
    finally:
        engine.close()


def _write_reports(report: dict[str, Any], json_path: Path, md_path: Path) -> None:
    import json

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = gate.markdown(report)
    signature = report.get("signature")
    if signature:
        markdown += (f"\nSigned ({signature['algorithm']}) by key `{signature['key_name']}` "
                     f"(id {signature['key_id']}), manifest SHA-256 "
                     f"{signature['manifest_sha256']}\n")
    md_path.write_text(markdown)
