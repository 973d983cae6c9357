"""TensorRT on Jetson (and any CUDA GPU): serialized engines run with pycuda buffers.

Devices: ``cuda``, ``cuda:N`` or ``gpu``. A bundle that carries a TensorRT engine (``engines
["tensorrt"]``) must name the TensorRT version that built it in ``toolchain["tensorrt"]``: an
engine only deserializes on the exact TensorRT version (and GPU) that built it, and a mismatch is
refused here with the two versions named instead of letting the runtime fail inside CUDA.

A bundle with the ONNX model only is built into an engine on the target, once: the plan is
cached under ``cache_dir`` keyed by bundle hash, GPU, compute capability, TensorRT version,
precision and maximum batch, in an :class:`~onboard.runtime.engines.cache.EngineCache` entry
whose SHA-256 is checked before every load (flash bit flips and killed writes hit cached engines
too). Dynamic tile sizes are fixed to the manifest's tile size.

Written against TensorRT 8.6/10 Python API (tensor-name API: ``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and pycuda. The
``tensorrt_lean`` runtime alone cannot parse ONNX or build engines and is not used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.engines.base import Engine
from onboard.runtime.engines.cache import EngineCache
from onboard.runtime.errors import (
    EngineError,
    EngineUnavailableError,
    EngineVersionError,
)

_WORKSPACE_BYTES = 1 << 30
DEFAULT_CACHE = Path("~/.cache/onboard/engines")


def _import() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
    except ImportError as error:
        raise EngineUnavailableError(
            "the TensorRT Python bindings are not installed (on Jetson they come with JetPack: "
            "see Dockerfile.jetson; elsewhere pip install 'onboard[tensorrt]')") from error
    try:
        import pycuda.driver as cuda
    except ImportError as error:
        raise EngineUnavailableError("pycuda is not installed: pip install pycuda") from error
    return trt, cuda


def _version_key(version: str) -> tuple[str, ...]:
    # Engines are tied to the TensorRT release (major.minor.patch); the build number is not.
    return tuple(version.split(".")[:3])


class TensorRtEngine(Engine):
    backend = "tensorrt"

    def _load(self) -> None:
        trt, cuda = _import()
        self._trt, self._cuda = trt, cuda
        match = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", self.device.lower())
        if match is None:
            raise EngineUnavailableError(
                f"{self._where}: unknown device {self.device!r} for TensorRT; use cuda or cuda:N")
        try:
            cuda.init()
            gpu = cuda.Device(int(match.group(1) or 0))
            self._cuda_context = gpu.make_context()
        except Exception as error:  # pycuda raises its own error types
            raise EngineUnavailableError(f"{self._where}: no usable CUDA device "
                                         f"{self.device!r}: {error}") from error
        self._buffers: dict[str, tuple[Any, int]] = {}
        self._host: dict[str, np.ndarray] = {}
        try:
            self._logger = _capturing_logger(trt)
            plan = self._plan(trt, gpu)
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(plan)
            if engine is None:
                raise EngineError(f"{self._where}: TensorRT {trt.__version__} cannot deserialize "
                                  f"the engine: {self._logger.last_errors()}")
            self._engine = engine
            self._context = engine.create_execution_context()
            self._stream = cuda.Stream()
            self._bind_io(trt, engine)
        except BaseException:
            self._cuda_context.pop()
            self._cuda_context.detach()
            raise
        self._cuda_context.pop()

    # -- engine plan: shipped, cached or built ----------------------------------------------------

    def _plan(self, trt: Any, gpu: Any) -> bytes:
        self.from_cache = False
        engines, toolchain = self.manifest.engines, self.manifest.toolchain
        if "tensorrt" in engines:
            built_with = toolchain.get("tensorrt")
            if built_with is None:
                raise EngineVersionError(
                    f"{self._where}: the bundle's TensorRT engine does not say which TensorRT "
                    "built it (toolchain.tensorrt); refusing to deserialize it blind")
            if _version_key(built_with) != _version_key(trt.__version__):
                raise EngineVersionError(
                    f"{self._where}: the engine was built by TensorRT {built_with}, this board "
                    f"has TensorRT {trt.__version__}; engines do not load across versions. "
                    "Uplink a bundle built for this version, or one with the ONNX model only "
                    "(the board then builds and caches the engine)")
            return self.bundle.read(engines["tensorrt"])
        if "onnxruntime" not in engines:
            raise EngineError(f"{self._where}: the bundle carries neither a TensorRT engine nor "
                              f"an ONNX model to build one from (it has {sorted(engines)})")
        major, minor = gpu.compute_capability()
        gpu_name = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name()).strip("-")
        cache_folder = Path(self.cache_dir or os.environ.get("ONBOARD_ENGINE_CACHE")
                            or DEFAULT_CACHE).expanduser()
        key = (f"{self.bundle.sha256[:16]}-{gpu_name}-sm{major}{minor}-trt{trt.__version__}-"
               f"{self.precision}-b{self.batch_size}")
        cache = EngineCache(cache_folder, self.telemetry)
        plan = cache.load(key)  # verified against its digest; damage is reported there
        if plan is not None:
            self.from_cache = True
            return plan
        plan = self._build(trt, self.bundle.read(engines["onnxruntime"]))
        cache.keep(key, plan, tensorrt=trt.__version__)
        return plan

    def _build(self, trt: Any, onnx: bytes) -> bytes:
        builder = trt.Builder(self._logger)
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10:
            # Implicit batch is the default before TensorRT 10; ONNX needs explicit batch.
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"{self._where}: TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        if self.precision in ("fp16", "int8"):
            flag = getattr(trt.BuilderFlag, "FP16" if self.precision == "fp16" else "INT8", None)
            if flag is None:
                # TensorRT 11 networks are strongly typed: precision comes from the ONNX itself.
                raise EngineError(
                    f"{self._where}: TensorRT {trt.__version__} takes the precision from the "
                    f"model; ship an {self.precision} ONNX model instead of asking for it")
            # int8: the bundle's QDQ nodes carry the scales; the flag lets TensorRT use them.
            config.set_flag(flag)
        specs = {spec.name: spec for spec in self.manifest.inputs}
        tensors = [network.get_input(i) for i in range(network.num_inputs)]
        bound = self._bind("input", list(specs), [[t.name] for t in tensors], every=True)
        profile = None
        for name, i in bound.items():
            tensor, spec = tensors[i], specs[name]
            shape = tuple(tensor.shape)
            if all(d >= 0 for d in shape):
                continue
            # Dynamic tile sizes are fixed to the manifest's; the batch may be 1..batch_size.
            fixed = [d if d >= 0 else s for d, s in zip(
                shape, (0, len(spec.bands), spec.tile_size, spec.tile_size), strict=True)]
            low = (1 if shape[0] < 0 else shape[0], *fixed[1:])
            high = (self.batch_size if shape[0] < 0 else shape[0], *fixed[1:])
            profile = profile or builder.create_optimization_profile()
            profile.set_shape(tensor.name, low, high, high)
        if profile is not None:
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"{self._where}: TensorRT failed to build the engine: "
                              f"{self._logger.last_errors()}")
        return bytes(plan)

    # -- buffers and running ----------------------------------------------------------------------

    def _bind_io(self, trt: Any, engine: Any) -> None:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        bound_in = self._bind("input", [spec.name for spec in self.manifest.inputs],
                              [[n] for n in inputs], every=True)
        bound_out = self._bind("output", [spec.name for spec in self.manifest.outputs],
                               [[n] for n in outputs], every=False)
        # Manifest name -> engine tensor name.
        self._inputs = {name: inputs[i] for name, i in bound_in.items()}
        self._outputs = {name: outputs[i] for name, i in bound_out.items()}
        # Every output gets an address, fetched or not: TensorRT writes them all.
        self._all_outputs = outputs
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                        for n in [*inputs, *outputs]}
        self.model_input_shapes = {}
        for name, tensor in self._inputs.items():
            shape = tuple(engine.get_tensor_shape(tensor))
            if any(d < 0 for d in shape):
                low, _, high = engine.get_tensor_profile_shape(tensor, 0)
                shape = tuple(lo if lo == hi else -1 for lo, hi in zip(low, high, strict=True))
                self.batch_size = min(self.batch_size, int(high[0]))
            self.model_input_shapes[name] = tuple(d if d >= 0 else None for d in shape)

    def _device_buffer(self, name: str, nbytes: int) -> Any:
        held = self._buffers.get(name)
        if held is None or held[1] < nbytes:
            if held is not None:
                held[0].free()
            held = (self._cuda.mem_alloc(nbytes), nbytes)
            self._buffers[name] = held
            self._context.set_tensor_address(name, int(held[0]))
        return held[0]

    def _host_buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        # Page-locked, so the copies are truly asynchronous; grown when a bigger batch comes.
        size = int(np.prod(shape))
        held = self._host.get(name)
        if held is None or held.size < size:
            held = self._cuda.pagelocked_empty(size, self._dtypes[name])
            self._host[name] = held
        return held[:size].reshape(shape)

    def _run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        self._cuda_context.push()
        try:
            for name, x in feeds.items():
                tensor = self._inputs[name]
                if not self._context.set_input_shape(tensor, x.shape):
                    raise EngineError(f"{self._where}: TensorRT refuses shape {x.shape} for "
                                      f"input {name!r}")
            host: dict[str, np.ndarray] = {}
            for name, x in feeds.items():
                tensor = self._inputs[name]
                host[tensor] = self._host_buffer(tensor, x.shape)
                host[tensor][...] = x
                device = self._device_buffer(tensor, host[tensor].nbytes)
                cuda.memcpy_htod_async(device, host[tensor], self._stream)
            for tensor in self._all_outputs:
                # Output shapes are known once every input shape is set.
                host[tensor] = self._host_buffer(
                    tensor, tuple(self._context.get_tensor_shape(tensor)))
                self._device_buffer(tensor, max(host[tensor].nbytes, 1))
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise EngineError(f"{self._where}: TensorRT execution failed: "
                                  f"{self._logger.last_errors()}")
            for tensor in self._outputs.values():
                cuda.memcpy_dtoh_async(host[tensor], self._buffers[tensor][0], self._stream)
            self._stream.synchronize()
            # Copies: the host buffers are reused by the next call.
            return {name: host[tensor].copy() for name, tensor in self._outputs.items()}
        finally:
            self._cuda_context.pop()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt": self._trt.__version__,
                "from_cache": self.from_cache}

    def _release(self) -> None:
        self._cuda_context.push()
        try:
            for buffer, _ in self._buffers.values():
                buffer.free()
            self._buffers.clear()
            self._host.clear()
            self._context = None
            self._engine = None
        finally:
            self._cuda_context.pop()
            self._cuda_context.detach()


def _capturing_logger(trt: Any) -> Any:
    class CapturingLogger(trt.ILogger):
        """Keeps TensorRT's errors so that refusals can say why."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)

        def last_errors(self) -> str:
            return "; ".join(self.errors[-3:]) or "no error message from TensorRT"

    return CapturingLogger()

