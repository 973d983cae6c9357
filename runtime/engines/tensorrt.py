"""TensorRT on Jetson (and any CUDA GPU): serialized engines run with pycuda buffers.

Devices: ``cuda``, ``cuda:N`` or ``gpu``. A bundle that carries a TensorRT engine (``engines
["tensorrt"]``) must name the TensorRT version that built it in ``toolchain["tensorrt"]``: an
engine only deserializes on the exact TensorRT version (and GPU) that built it, and a mismatch is
refused here with the two versions named instead of letting the runtime fail inside CUDA.

A bundle with the ONNX model only is built into an engine on the target, once: the plan is
cached under ``cache_dir`` keyed by bundle hash, GPU, compute capability, TensorRT version,
precision and maximum batch, with a SHA-256 beside it that is checked before every load (flash
bit flips hit cached engines too). Dynamic tile sizes are fixed to the manifest's tile size.

Written against TensorRT 8.6/10 Python API (tensor-name API: ``num_io_tensors``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) and pycuda. The
``tensorrt_lean`` runtime alone cannot parse ONNX or build engines and is not used.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import EngineError, EngineUnavailableError, EngineVersionError

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
        cache = Path(self.cache_dir or os.environ.get("ONBOARD_ENGINE_CACHE")
                     or DEFAULT_CACHE).expanduser()
        key = (f"{self.bundle.sha256[:16]}-{gpu_name}-sm{major}{minor}-trt{trt.__version__}-"
               f"{self.precision}-b{self.batch_size}")
        plan_path = cache / f"{key}.engine"
        digest_path = plan_path.with_suffix(".sha256")
        if plan_path.is_file() and digest_path.is_file():
            plan = plan_path.read_bytes()
            if hashlib.sha256(plan).hexdigest() == digest_path.read_text().strip():
                self.from_cache = True
                return plan
            if self.telemetry is not None:
                self.telemetry.emit("engine_cache_damaged", path=str(plan_path))
        plan = self._build(trt, self.bundle.read(engines["onnxruntime"]))
        cache.mkdir(parents=True, exist_ok=True)
        _write_atomic(plan_path, plan)
        _write_atomic(digest_path, hashlib.sha256(plan).hexdigest().encode() + b"\n")
        if self.telemetry is not None:
            self.telemetry.emit("engine_built", path=str(plan_path), bytes=len(plan),
                                tensorrt=trt.__version__)
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
        tensor = network.get_input(0)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            tile = self.input_spec.tile_size
            fixed = [d if d >= 0 else s for d, s in zip(shape, (0, len(self.input_spec.bands),
                                                               tile, tile), strict=True)]
            low = (1 if shape[0] < 0 else shape[0], *fixed[1:])
            high = (self.batch_size if shape[0] < 0 else shape[0], *fixed[1:])
            profile = builder.create_optimization_profile()
            profile.set_shape(tensor.name, low, high, high)
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
        if len(inputs) != 1 or not outputs:
            raise EngineError(f"{self._where}: the engine has {len(inputs)} inputs and "
                              f"{len(outputs)} outputs, expected 1 and at least 1")
        self._input, self._output = inputs[0], outputs[0]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
                        for n in (self._input, self._output)}
        shape = tuple(engine.get_tensor_shape(self._input))
        if any(d < 0 for d in shape):
            low, _, high = engine.get_tensor_profile_shape(self._input, 0)
            shape = tuple(lo if lo == hi else -1 for lo, hi in zip(low, high, strict=True))
            self.batch_size = min(self.batch_size, int(high[0]))
        self.model_input_shape = tuple(d if d >= 0 else None for d in shape)

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

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        cuda = self._cuda
        self._cuda_context.push()
        try:
            if not self._context.set_input_shape(self._input, chunk.shape):
                raise EngineError(f"{self._where}: TensorRT refuses input shape {chunk.shape}")
            out_shape = tuple(self._context.get_tensor_shape(self._output))
            host_in = self._host_buffer(self._input, chunk.shape)
            host_in[...] = chunk
            host_out = self._host_buffer(self._output, out_shape)
            d_in = self._device_buffer(self._input, host_in.nbytes)
            d_out = self._device_buffer(self._output, host_out.nbytes)
            cuda.memcpy_htod_async(d_in, host_in, self._stream)
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise EngineError(f"{self._where}: TensorRT execution failed: "
                                  f"{self._logger.last_errors()}")
            cuda.memcpy_dtoh_async(host_out, d_out, self._stream)
            self._stream.synchronize()
            return host_out.astype(np.float32)  # copies: the host buffer is reused
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


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
