"""The one interface every inference backend implements.

A subclass loads the model in :meth:`Engine._load` and runs one chunk in :meth:`Engine._run`;
this base validates batches, splits them into ``batch_size`` chunks (padding the last chunk when
the compiled model has a fixed batch), checks the output against the manifest and warms up.
Engines are not thread-safe: give each thread its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onboard.runtime.bundle import Bundle, InputSpec, Manifest, OutputSpec
from onboard.runtime.errors import EngineError, EngineInputError
from onboard.runtime.telemetry import Telemetry


class Engine(ABC):
    """A loaded model on one backend and device.

    ``run`` takes float32 ``(N, C, H, W)`` already normalised with ``input_spec.normalise`` and
    returns the model output ``(N, K, H*s, W*s)`` as float32 (``s``: the output scale factor).
    """

    backend: ClassVar[str] = ""

    def __init__(self, bundle: Bundle, device: str = "cpu", *, threads: int | None = None,
                 batch_size: int = 1, warmup: int = 1, precision: str | None = None,
                 telemetry: Telemetry | None = None, cache_dir: Path | None = None) -> None:
        if threads is not None and threads < 1:
            raise EngineError(f"threads must be at least 1, got {threads}")
        if batch_size < 1:
            raise EngineError(f"batch_size must be at least 1, got {batch_size}")
        if warmup < 0:
            raise EngineError(f"warmup must be 0 or more, got {warmup}")
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.device = device
        self.threads = threads
        self.batch_size = batch_size
        self.precision = precision or self.manifest.precision
        self.telemetry = telemetry
        self.cache_dir = cache_dir
        # Set by open_engine when this engine runs the golden bundle because the primary failed.
        self.fallback_from: str | None = None
        # The model's input shape as compiled: None for a dynamic dimension.
        self.model_input_shape: tuple[int | None, ...] = ()
        self._closed = False
        self._load()
        try:
            self._settle(warmup)
        except BaseException:
            self.close()
            raise

    def _settle(self, warmup: int) -> None:
        """Check the loaded model against the manifest, fix the batch size, warm up."""
        if len(self.model_input_shape) != 4:
            raise EngineError(f"{self._where}: the model input has shape "
                              f"{self.model_input_shape}, expected 4-D NCHW")
        channels = self.model_input_shape[1]
        if channels is not None and channels != len(self.input_spec.bands):
            raise EngineError(
                f"{self._where}: the model takes {channels} channels but the manifest lists "
                f"{len(self.input_spec.bands)} bands ({', '.join(self.input_spec.bands)})")
        fixed_batch = self.model_input_shape[0]
        if fixed_batch is not None:
            # A model compiled for a fixed batch gets exactly that many tiles per call.
            self.batch_size = fixed_batch
        for _ in range(warmup):
            self._run(np.zeros(self._warmup_shape(), np.float32))

    # -- what subclasses provide ----------------------------------------------------------------

    @abstractmethod
    def _load(self) -> None:
        """Load the model; set ``self.model_input_shape``."""

    @abstractmethod
    def _run(self, chunk: np.ndarray) -> np.ndarray:
        """Run one contiguous float32 chunk of at most ``batch_size`` tiles."""

    @abstractmethod
    def _release(self) -> None:
        """Free what the backend holds."""

    # -- the interface ---------------------------------------------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def output_spec(self) -> OutputSpec:
        return self.manifest.output

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self._closed:
            raise EngineError(f"{self._where}: run() after close()")
        x = self._check_input(batch)
        n = x.shape[0]
        outputs = []
        for start in range(0, n, self.batch_size):
            chunk = x[start:start + self.batch_size]
            count = chunk.shape[0]
            if self.model_input_shape[0] is not None and count < self.batch_size:
                pad = np.zeros((self.batch_size - count, *chunk.shape[1:]), np.float32)
                chunk = np.concatenate([chunk, pad])
            y = np.asarray(self._run(np.ascontiguousarray(chunk)))
            outputs.append(y[:count])
        out = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        self._check_output(out, x.shape)
        return out.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {"bundle": m.name, "version": m.version, "task": m.task,
                "path": str(self.bundle.path), "sha256": self.bundle.sha256,
                "backend": self.backend, "device": self.device, "precision": self.precision,
                "batch_size": self.batch_size, "threads": self.threads,
                "golden": self.fallback_from is not None}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.manifest.name} {self.manifest.version}, "
                f"{self.backend} on {self.device}, {self.precision})")

    # -- checks ----------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self.bundle.path.name} ({self.backend} on {self.device})"

    def _warmup_shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.model_input_shape
        tile = self.input_spec.tile_size
        return (self.batch_size if n is None else n, len(self.input_spec.bands) if c is None
                else c, tile if h is None else h, tile if w is None else w)

    def _check_input(self, batch: Any) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise EngineInputError(
                f"{self._where}: expected a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise EngineInputError(
                f"{self._where}: batch dtype is {batch.dtype}, the engine takes float32 model "
                "input; convert raw pixels with engine.input_spec.normalise() first")
        if batch.ndim != 4:
            raise EngineInputError(
                f"{self._where}: batch shape {batch.shape} is not (N, C, H, W)"
                + ("; add the batch axis with batch[None]" if batch.ndim == 3 else ""))
        n, c, h, w = batch.shape
        bands = self.input_spec.bands
        if n == 0 or h == 0 or w == 0:
            raise EngineInputError(f"{self._where}: empty batch {batch.shape}")
        if c != len(bands):
            raise EngineInputError(
                f"{self._where}: batch has {c} channels, the model takes {len(bands)} "
                f"({', '.join(bands)})")
        _, _, model_h, model_w = self.model_input_shape
        if (model_h is not None and h != model_h) or (model_w is not None and w != model_w):
            raise EngineInputError(
                f"{self._where}: tiles are {h}x{w}, the compiled model takes {model_h}x{model_w}")
        return batch

    def _check_output(self, out: np.ndarray, input_shape: tuple[int, ...]) -> None:
        n, _, h, w = input_shape
        spec = self.output_spec
        expected = (n, spec.channels, h * spec.scale_factor, w * spec.scale_factor)
        if out.shape != expected:
            raise EngineError(
                f"{self._where}: the model returned shape {out.shape}, the manifest's output "
                f"spec says {expected} ({spec.channels} channel(s), scale factor "
                f"{spec.scale_factor})")
