"""ONNX Runtime: the flight runtime's default engine (CPU everywhere; CUDA/TensorRT when present).

Devices: ``cpu``; ``cuda`` or ``cuda:N`` (TensorRT execution provider first when this
onnxruntime has it, then CUDA, CPU for what they cannot run); ``auto`` (the best present).

Graph optimisation: ``all`` unless the bundle's manifest says otherwise in
``extra.onnxruntime.graph_optimization`` (``all`` | ``extended`` | ``basic`` | ``disabled``).
The compiler measures both ``all`` and ``extended`` and records the faster: ``all`` adds the
x86 NCHWc layout, which pads channels to 16 (AVX-512) and makes convolutions narrower than that,
as in pruned models, several times slower than without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import EngineError, EngineUnavailableError

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
GRAPH_OPTIMIZATION_LEVELS = ("all", "extended", "basic", "disabled")


def graph_optimization_level(name: str) -> Any:
    """onnxruntime's ``GraphOptimizationLevel`` for one of :data:`GRAPH_OPTIMIZATION_LEVELS`."""
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    return levels[name]


def session_options(threads: int | None = None, graph_optimization: str = "all") -> Any:
    """The one place ONNX Runtime sessions are set up (flight engine, compiler, evaluation):
    ``threads`` intra-op threads and a single inter-op thread, warnings only, and the graph
    optimisation level named as in :data:`GRAPH_OPTIMIZATION_LEVELS`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Warnings only; shape warnings of models exported with fixed tile sizes are noise.
    options.log_severity_level = 3
    options.graph_optimization_level = graph_optimization_level(graph_optimization)
    # Idle intra-op threads otherwise spin between runs: on 2 cores they steal the reader's and
    # the other stages' time, and on orbit they burn power. Measured here (bench/results/
    # pipeline.md): 1.14x the throughput and a third less CPU with spinning off.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def cpu_session(model: str | Path | bytes, threads: int | None = None,
                graph_optimization: str = "all") -> Any:
    """An ONNX Runtime CPU session for a model file (or its bytes), set up as the flight engine
    sets up its own."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, session_options(threads, graph_optimization),
                                providers=["CPUExecutionProvider"])


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def _load(self) -> None:
        import onnxruntime as ort

        member = self.manifest.engines.get("onnxruntime")
        if member is None:
            raise EngineError(f"{self._where}: the bundle carries no ONNX model (it has "
                              f"{sorted(self.manifest.engines)})")
        providers = self._providers(ort.get_available_providers())
        hints = self.manifest.extra.get("onnxruntime")
        level = hints.get("graph_optimization", "all") if isinstance(hints, dict) else "all"
        if level not in GRAPH_OPTIMIZATION_LEVELS:
            raise EngineError(f"{self._where}: the manifest asks for ONNX Runtime graph "
                              f"optimisation {level!r}; known: "
                              f"{', '.join(GRAPH_OPTIMIZATION_LEVELS)}")
        options = session_options(self.threads, level)
        self.graph_optimization: str = level
        try:
            self._session = ort.InferenceSession(self.bundle.read(member), options,
                                                 providers=providers)
        except Exception as error:  # onnxruntime raises its own, unrelated exception types
            raise EngineError(f"{self._where}: ONNX Runtime cannot load {member}: "
                              f"{error}") from error
        self.providers: list[str] = self._session.get_providers()
        wanted_gpu = [p for p, _ in providers if p in _GPU_PROVIDERS]
        if self.device != "auto" and wanted_gpu and not set(wanted_gpu) & set(self.providers):
            # onnxruntime falls back to CPU silently when CUDA fails to initialise.
            raise EngineUnavailableError(
                f"{self._where}: {', '.join(wanted_gpu)} failed to initialise; the session "
                f"runs on {self.providers}")
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        bound_in = self._bind("input", [spec.name for spec in self.manifest.inputs],
                              [[i.name] for i in inputs], every=True)
        bound_out = self._bind("output", [spec.name for spec in self.manifest.outputs],
                               [[o.name] for o in outputs], every=False)
        # Manifest name -> graph name; the session takes and gives graph names.
        self._inputs = {name: inputs[i].name for name, i in bound_in.items()}
        self._outputs = {name: outputs[i].name for name, i in bound_out.items()}
        self._half_inputs = {name for name, i in bound_in.items()
                             if inputs[i].type == "tensor(float16)"}
        self.model_input_shapes = {
            name: tuple(d if isinstance(d, int) and d > 0 else None for d in inputs[i].shape)
            for name, i in bound_in.items()}

    def _providers(self, available: list[str]) -> list[tuple[str, dict[str, Any]]]:
        providers = self._gpu_providers(available)
        if self.precision != self.manifest.precision and not (
                providers and providers[0][0] == "TensorrtExecutionProvider"):
            # Only the TensorRT provider can lower precision at load; the others run as stored.
            raise EngineError(
                f"{self._where}: ONNX Runtime here runs the model as stored "
                f"({self.manifest.precision}); precision {self.precision} needs the TensorRT "
                "execution provider, another bundle or another backend")
        return [*providers, ("CPUExecutionProvider", {})]

    def _gpu_providers(self, available: list[str]) -> list[tuple[str, dict[str, Any]]]:
        device = self.device.lower()
        if device == "cpu":
            return []
        if device == "auto":
            index = 0
        elif device == "cuda" or device == "gpu":
            index = 0
        elif device.startswith("cuda:") and device[5:].isdigit():
            index = int(device[5:])
        else:
            raise EngineUnavailableError(
                f"{self._where}: unknown device {self.device!r} for ONNX Runtime; use cpu, "
                "cuda, cuda:N or auto")
        providers: list[tuple[str, dict[str, Any]]] = []
        if "TensorrtExecutionProvider" in available:
            options: dict[str, Any] = {"device_id": index,
                                       "trt_fp16_enable": self.precision == "fp16",
                                       "trt_int8_enable": self.precision == "int8"}
            if self.cache_dir is not None:
                # The provider keys its cache by model, GPU and TensorRT version itself.
                cache = Path(self.cache_dir) / "ort-tensorrt"
                cache.mkdir(parents=True, exist_ok=True)
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache))
            providers.append(("TensorrtExecutionProvider", options))
        if "CUDAExecutionProvider" in available:
            providers.append(("CUDAExecutionProvider", {"device_id": index}))
        if not providers and device != "auto":
            raise EngineUnavailableError(
                f"{self._where}: device {self.device!r} needs onnxruntime-gpu (CUDA or "
                f"TensorRT execution provider); this onnxruntime has {available}")
        return providers

    def _run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        graph_feeds = {self._inputs[name]: x.astype(np.float16) if name in self._half_inputs
                       else x for name, x in feeds.items()}
        results = self._session.run(list(self._outputs.values()), graph_feeds)
        return dict(zip(self._outputs, results, strict=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers,
                "graph_optimization": self.graph_optimization}

    def _release(self) -> None:
        self._session = None
