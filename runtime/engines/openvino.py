"""OpenVINO: Intel CPUs, GPUs, NPUs (and Movidius MYRIAD on OpenVINO 2022.3 LTS only).

Devices: ``cpu``, ``gpu``, ``npu``, ``myriad``, ``auto``, or any OpenVINO device name
(``GPU.1``). The bundle's OpenVINO IR is used when it carries one, else its ONNX model (OpenVINO
reads ONNX directly). Both are read from memory: nothing is extracted to flash.

The inference precision is always set explicitly and read back after compiling: on CPUs with
AMX/AVX512-BF16, OpenVINO otherwise runs an fp32 model in bf16 without saying so, which moves
class scores by far more than the 1e-4 the engines are held to.

With a ``cache_dir`` the compiled model is cached (``CompiledModel.export_model`` /
``Core.import_model``) in an :class:`~onboard.runtime.engines.cache.EngineCache` entry keyed by
the bundle hash, the OpenVINO build, the device (its full name), the precision, the threads and
the batch: compiling for a GPU or NPU takes far longer than importing. The entry is verified
before it is imported (OpenVINO imports a blob cut short without complaint) and an entry that
does not import, or imports with other inputs or outputs than the bundle's model, is rebuilt.
OpenVINO's own ``CACHE_DIR`` is not used: it writes files outside the runtime's atomic-write
path, and does not check them.

MYRIAD (Neural Compute Stick 2, Myriad X VPU) was dropped after OpenVINO 2022.3 LTS. To fly on
one, install ``openvino==2022.3.*`` (its Python API lives in ``openvino.runtime``, which this
engine falls back to); MYRIAD runs fp16 only.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from onboard.runtime.engines.base import Engine
from onboard.runtime.engines.cache import EngineCache
from onboard.runtime.errors import EngineError, EngineUnavailableError

_DEVICES = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU", "myriad": "MYRIAD", "auto": "AUTO"}
# onboard precision -> OpenVINO INFERENCE_PRECISION_HINT. int8 models carry their own
# FakeQuantize nodes; what is left around them runs in f32.
_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "f32"}
# Devices that compile static shapes only.
_STATIC_ONLY = ("NPU", "MYRIAD")


def _openvino() -> Any:
    try:
        import openvino as ov

        ov.Core  # noqa: B018 - 2022.3 has no top-level Core; fall through to openvino.runtime
        return ov
    except (ImportError, AttributeError):
        pass
    try:
        from openvino import runtime as ov_runtime
    except ImportError as error:
        raise EngineUnavailableError(
            "OpenVINO is not installed: pip install 'onboard[openvino]'") from error
    return ov_runtime


class OpenVinoEngine(Engine):
    backend = "openvino"

    def _load(self) -> None:
        ov = _openvino()
        core = ov.Core()
        device = self._device_name(core)
        model = self._read_model(ov, core)
        bound_in = self._bind("input", [spec.name for spec in self.manifest.inputs],
                              [port.get_names() for port in model.inputs], every=True)
        bound_out = self._bind("output", [spec.name for spec in self.manifest.outputs],
                               [port.get_names() for port in model.outputs], every=False)
        specs = {spec.name: spec for spec in self.manifest.inputs}
        if device.split(".")[0] in _STATIC_ONLY and any(
                model.inputs[i].get_partial_shape().is_dynamic for i in bound_in.values()):
            model.reshape({model.inputs[i]: [self.batch_size, len(specs[name].bands),
                                             specs[name].tile_size, specs[name].tile_size]
                           for name, i in bound_in.items()})
        partial = {name: model.inputs[i].get_partial_shape() for name, i in bound_in.items()}
        # Indices into the compiled model's ports, which keep the model's order.
        self._inputs, self._outputs = bound_in, bound_out

        if self.precision not in _HINTS:
            raise EngineError(f"{self._where}: unknown precision {self.precision!r}")
        hint = _HINTS[self.precision]
        config: dict[str, Any] = {}
        supported = self._supported_properties(core, device)
        if "INFERENCE_PRECISION_HINT" in supported:
            config["INFERENCE_PRECISION_HINT"] = hint
        elif self.precision == "fp32" and device.split(".")[0] not in ("AUTO",):
            raise EngineError(f"{self._where}: OpenVINO device {device} cannot be told to run "
                              "fp32; refusing rather than letting it pick a lower precision")
        if self.threads and "INFERENCE_NUM_THREADS" in supported:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self._compiled = self._compile(ov, core, model, device, config)
        self.inference_precision = self._read_back_precision()
        if "INFERENCE_PRECISION_HINT" in config and self.inference_precision not in (None, hint):
            raise EngineError(f"{self._where}: asked OpenVINO for {hint}, it compiled "
                              f"{self.inference_precision}")
        self.ov_device = device
        self._request = self._compiled.create_infer_request()
        self.model_input_shapes = {
            name: tuple(d.get_length() if d.is_static else None for d in shape)
            for name, shape in partial.items()}

    def _compile(self, ov: Any, core: Any, model: Any, device: str,
                 config: dict[str, Any]) -> Any:
        """The compiled model: imported from the engine cache when it holds a verified blob
        for exactly this build, else compiled (and then stored there)."""
        self.from_cache = False
        if self.cache_dir is None:
            return self._compile_fresh(core, model, device, config)
        cache = EngineCache(self.cache_dir, self.telemetry)
        key = self._cache_key(ov, core, model, device, config)
        blob = cache.load(key)  # None when absent or damaged (reported by the cache)
        if blob is not None:
            try:
                compiled = core.import_model(blob, device, config)
                _check_ports(compiled, model)
            except Exception as error:  # a blob this OpenVINO or device cannot use
                cache.unusable(key, (str(error).splitlines() or [""])[0])
            else:
                self.from_cache = True
                return compiled
        compiled = self._compile_fresh(core, model, device, config)
        try:
            exported = compiled.export_model()
        except Exception as error:  # a plugin (AUTO) that cannot export: run uncached
            cache.unusable(key, f"{device} cannot export: {error}")
            return compiled
        # 2025 returns bytes, 2026 an io.BytesIO.
        data = exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported)
        cache.keep(key, data, openvino=_version(ov))
        return compiled

    def _compile_fresh(self, core: Any, model: Any, device: str, config: dict[str, Any]) -> Any:
        try:
            return core.compile_model(model, device, config)
        except Exception as error:  # OpenVINO raises RuntimeError and its own types
            raise EngineError(f"{self._where}: OpenVINO cannot compile the model for "
                              f"{device}: {error}") from error

    def _cache_key(self, ov: Any, core: Any, model: Any, device: str,
                   config: dict[str, Any]) -> str:
        """What a compiled blob depends on: a blob only imports into the OpenVINO build and
        the device (model, not only kind) that compiled it, with the same properties and
        input shapes."""
        try:
            full_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        except Exception:  # AUTO and some plugins do not name a device
            full_name = device
        depends = {"openvino": _version(ov), "device": device, "full_name": full_name,
                   "config": {k: str(v) for k, v in sorted(config.items())},
                   "inputs": [str(port.get_partial_shape()) for port in model.inputs]}
        digest = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()
        return (f"{self.bundle.sha256[:16]}-openvino-{device}-{self.precision}-"
                f"b{self.batch_size}-{digest[:16]}")

    def _device_name(self, core: Any) -> str:
        wanted = _DEVICES.get(self.device.lower(), self.device)
        available = list(core.available_devices)
        if wanted == "AUTO" or wanted in available or (
                "." not in wanted and any(d.split(".")[0] == wanted for d in available)):
            return wanted
        note = ""
        if wanted == "MYRIAD":
            note = ("; MYRIAD needs OpenVINO 2022.3 LTS, the last release with the MYRIAD "
                    "plugin (pip install 'openvino==2022.3.*')")
        raise EngineUnavailableError(
            f"{self._where}: OpenVINO device {wanted} is not present; this machine has "
            f"{available}{note}")

    def _read_model(self, ov: Any, core: Any) -> Any:
        engines = self.manifest.engines
        try:
            if "openvino" in engines:
                xml = engines["openvino"]
                weights = xml[: -len(".xml")] + ".bin"
                blob = np.frombuffer(self.bundle.read(weights), np.uint8)
                return core.read_model(self.bundle.read(xml), ov.Tensor(blob))
            if "onnxruntime" in engines:
                return core.read_model(self.bundle.read(engines["onnxruntime"]))
        except EngineError:
            raise
        except Exception as error:
            raise EngineError(f"{self._where}: OpenVINO cannot read the model: "
                              f"{error}") from error
        raise EngineError(f"{self._where}: the bundle carries neither an OpenVINO IR nor an ONNX "
                          f"model (it has {sorted(engines)})")

    @staticmethod
    def _supported_properties(core: Any, device: str) -> set[str]:
        try:
            return {str(p) for p in core.get_property(device, "SUPPORTED_PROPERTIES")}
        except Exception:  # a plugin that cannot even list its properties supports none
            return set()

    def _read_back_precision(self) -> str | None:
        try:
            value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # AUTO and some plugins do not report it
            return None
        return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

    def _run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._request.infer({self._inputs[name]: x for name, x in feeds.items()})
        # The request reuses its output buffers on the next call.
        return {name: self._request.get_output_tensor(i).data.copy()
                for name, i in self._outputs.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ov_device": self.ov_device,
                "inference_precision": self.inference_precision, "from_cache": self.from_cache}

    def _release(self) -> None:
        self._request = None
        self._compiled = None


def _version(ov: Any) -> str:
    try:
        return str(ov.get_version())
    except AttributeError:
        return str(getattr(ov, "__version__", "unknown"))


def _check_ports(compiled: Any, model: Any) -> None:
    """An imported blob must have the model's inputs and outputs, names and shapes."""
    def ports(of: Any) -> list[tuple[list[str], str]]:
        return [(sorted(p.get_names()), str(p.get_partial_shape())) for p in of]

    if ports(compiled.inputs) != ports(model.inputs) or \
            ports(compiled.outputs) != ports(model.outputs):
        raise EngineError("the cached blob's inputs or outputs are not the bundle model's")
