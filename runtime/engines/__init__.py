"""Inference engines: one :class:`Engine` interface over ONNX Runtime, OpenVINO and TensorRT.

Backends are imported only when asked for, so a board without OpenVINO or TensorRT never
imports them. Every bundle is verified here before an engine parses it: its checksums always,
its signature against the trust policy (the caller's, or the one the run installed from its
``[signatures]`` section), so every stage gets the same check.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from onboard.runtime.bundle import BACKENDS, Bundle
from onboard.runtime.bundle.signature import (
    TrustPolicy,
    Verdict,
    active_trust_policy,
    verify_bundle,
)
from onboard.runtime.durability import remove_partials
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
                telemetry: Telemetry | None = None, cache_dir: Path | None = None,
                trust: TrustPolicy | list[Path] | tuple[Path, ...] | None = None) -> Engine:
    """Verify ``bundle`` and load it on ``backend``/``device``.

    ``trust`` says which signing keys are trusted (a policy, or public key paths; default: the
    installed policy, see
    :func:`~onboard.runtime.bundle.signature.install_trust_policy`; none: not checked).
    When the bundle is refused (damaged, wrong schema, missing engine file, not signed by a
    trusted key) or its engine cannot load (e.g. a TensorRT engine from another TensorRT
    version) and a ``fallback`` (golden) bundle is given, the golden one is loaded instead,
    under the same signature check; both the refusal and the fallback are reported in
    telemetry, and ``engine.fallback_from`` names the refused bundle.
    """
    cls = engine_class(backend)
    if isinstance(trust, (list, tuple)):  # public key files or folders, as a CLI names them
        trust = TrustPolicy.trusting(*trust) if trust else None
    policy = trust if trust is not None else active_trust_policy()
    if cache_dir is not None:
        remove_partials(cache_dir)  # what a killed engine build left half-written
    options = {"threads": threads, "batch_size": batch_size, "warmup": warmup,
               "precision": precision, "telemetry": telemetry, "cache_dir": cache_dir}
    verdict = Verdict("not checked")

    def load(source: Bundle | str | Path) -> Engine:
        nonlocal verdict
        verified = _as_bundle(source)
        verdict = verify_bundle(verified, policy)
        return cls(verified, device, **options)

    try:
        engine = load(bundle)
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
            engine = load(fallback)
        except (BundleError, BundleNotFoundError, EngineError) as golden_error:
            if telemetry is not None:
                telemetry.emit("bundle_refused", path=str(fallback), golden=True,
                               error=type(golden_error).__name__, message=str(golden_error))
            raise golden_error from error
        engine.fallback_from = refused
    if telemetry is not None:
        telemetry.emit("engine_open", **engine.describe(), fallback_from=engine.fallback_from,
                       **verdict.describe())
        if verdict.status == "unsigned":
            telemetry.emit("bundle_unsigned", path=str(engine.bundle.path),
                           message="unsigned bundle loaded: signatures are not required")
    engine.signature = verdict
    return engine


def _as_bundle(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
