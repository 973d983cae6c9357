"""Inference engines: one :class:`Engine` interface over ONNX Runtime, OpenVINO and TensorRT.

Backends are imported only when asked for, so a board without OpenVINO or TensorRT never
imports them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from onboard.runtime.bundle import BACKENDS, Bundle
from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import (
    BundleError,
    BundleNotFoundError,
    EngineError,
    EngineUnavailableError,
)
from onboard.runtime.telemetry import Telemetry

__all__ = ["BACKENDS", "Engine", "open_engine"]

_CLASSES = {
    "onnxruntime": ("onboard.runtime.engines.onnxruntime", "OnnxRuntimeEngine"),
    "openvino": ("onboard.runtime.engines.openvino", "OpenVinoEngine"),
    "tensorrt": ("onboard.runtime.engines.tensorrt", "TensorRtEngine"),
}


def engine_class(backend: str) -> type[Engine]:
    if backend not in _CLASSES:
        raise EngineUnavailableError(
            f"unknown backend {backend!r}; onboard has {', '.join(BACKENDS)}")
    module, name = _CLASSES[backend]
    return getattr(importlib.import_module(module), name)


def open_engine(bundle: Bundle | str | Path, backend: str = "onnxruntime", device: str = "cpu",
                *, threads: int | None = None, batch_size: int = 1, warmup: int = 1,
                precision: str | None = None, fallback: Bundle | str | Path | None = None,
                telemetry: Telemetry | None = None, cache_dir: Path | None = None) -> Engine:
    """Verify ``bundle`` and load it on ``backend``/``device``.

    When the bundle is refused (damaged, wrong schema, missing engine file) or its engine cannot
    load (e.g. a TensorRT engine from another TensorRT version) and a ``fallback`` (golden)
    bundle is given, the golden one is loaded instead; both the refusal and the fallback are
    reported in telemetry, and ``engine.fallback_from`` names the refused bundle.
    """
    cls = engine_class(backend)
    options = {"threads": threads, "batch_size": batch_size, "warmup": warmup,
               "precision": precision, "telemetry": telemetry, "cache_dir": cache_dir}
    try:
        engine = cls(_as_bundle(bundle), device, **options)
    except (BundleError, BundleNotFoundError, EngineError) as error:
        if fallback is None or isinstance(error, EngineUnavailableError):
            # A missing backend or device fails the golden bundle just the same.
            raise
        refused = str(bundle.path if isinstance(bundle, Bundle) else bundle)
        if telemetry is not None:
            telemetry.emit("bundle_refused", path=refused, error=type(error).__name__,
                           message=str(error), backend=backend, device=device,
                           fallback=str(fallback.path if isinstance(fallback, Bundle)
                                         else fallback))
        try:
            engine = cls(_as_bundle(fallback), device, **options)
        except (BundleError, BundleNotFoundError, EngineError) as golden_error:
            if telemetry is not None:
                telemetry.emit("bundle_refused", path=str(fallback), golden=True,
                               error=type(golden_error).__name__, message=str(golden_error))
            raise golden_error from error
        engine.fallback_from = refused
    if telemetry is not None:
        telemetry.emit("engine_open", **engine.describe(), fallback_from=engine.fallback_from)
    return engine


def _as_bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
