"""The one interface every inference backend implements.

A subclass loads the model in :meth:`Engine._load`, binding the manifest's named inputs and
outputs to the graph's (:meth:`Engine._bind`), and runs one chunk in :meth:`Engine._run_named`;
this base validates batches, splits them into ``batch_size`` chunks (padding the last chunk when
the compiled model has a fixed batch), checks every output against the manifest and warms up.
Engines are not thread-safe: give each thread its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onboard.runtime.bundle import Bundle, InputSpec, Manifest, OutputSpec
from onboard.runtime.errors import EngineError, EngineInputError
from onboard.runtime.telemetry import Telemetry


class Engine(ABC):
    """A loaded model on one backend and device.

    ``run`` takes float32 ``(N, C, H, W)`` already normalised with ``input_spec.normalise`` and
    returns the model output ``(N, K, H*s, W*s)`` as float32 (``s``: the output scale factor);
    it is for models with one input and one output. ``run_named`` runs any model: a dict of
    such batches keyed by the manifest's input names (all with the same ``N``), and a dict of
    outputs keyed by its output names, each shaped as its kind says (see
    :mod:`onboard.runtime.bundle.manifest`; ``labels`` come back as int32, the rest float32).
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
        # Each input's shape as compiled, by manifest input name: None for a dynamic dimension.
        self.model_input_shapes: dict[str, tuple[int | None, ...]] = {}
        self._fixed_batch = False
        self._closed = False
        self._load()
        try:
            self._settle(warmup)
        except BaseException:
            self.close()
            raise

    def _settle(self, warmup: int) -> None:
        """Check the loaded model against the manifest, fix the batch size, warm up."""
        fixed: set[int] = set()
        for spec in self.manifest.inputs:
            shape = self.model_input_shapes.get(spec.name)
            if shape is None:
                raise EngineError(f"{self._where}: input {spec.name!r} was not bound to the model")
            if len(shape) != 4:
                raise EngineError(f"{self._where}: the model input {spec.name!r} has shape "
                                  f"{shape}, expected 4-D NCHW")
            if shape[1] is not None and shape[1] != len(spec.bands):
                raise EngineError(
                    f"{self._where}: the model input {spec.name!r} takes {shape[1]} channels but "
                    f"the manifest lists {len(spec.bands)} bands ({', '.join(spec.bands)})")
            if shape[0] is not None:
                fixed.add(shape[0])
        if len(fixed) > 1:
            raise EngineError(f"{self._where}: the model's inputs have different fixed batch "
                              f"sizes {sorted(fixed)}")
        if fixed:
            # A model compiled for a fixed batch gets exactly that many tiles per call.
            self.batch_size = fixed.pop()
            self._fixed_batch = True
        for _ in range(warmup):
            self._run_named({spec.name: np.zeros(self._warmup_shape(spec), np.float32)
                             for spec in self.manifest.inputs})

    # -- what subclasses provide ----------------------------------------------------------------

    @abstractmethod
    def _load(self) -> None:
        """Load the model; set ``self.model_input_shapes`` for every manifest input."""

    @abstractmethod
    def _run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one chunk: contiguous float32 arrays of at most ``batch_size`` tiles, keyed by
        manifest input name; return every manifest output, keyed by its name."""

    @abstractmethod
    def _release(self) -> None:
        """Free what the backend holds."""

    def _bind(self, kind: str, wanted: Sequence[str], graph: Sequence[Collection[str]],
              every: bool) -> dict[str, int]:
        """Manifest tensor name -> index of the graph tensor it means.

        ``graph`` holds each graph input (or output)'s names. Names must match, except that a
        manifest with a single ``kind`` binds to the graph's first by position: schema 1
        manifests do not name tensors. ``every``: the graph has no ``kind`` beyond the
        manifest's (inputs must all be fed; extra outputs are merely not fetched).
        """
        index = {name: i for i, names in enumerate(graph) for name in names}
        if all(name in index for name in wanted) and (not every or len(wanted) == len(graph)):
            return {name: index[name] for name in wanted}
        if len(wanted) == 1 and graph and (len(graph) == 1 or not every):
            return {wanted[0]: 0}
        graph_names = [sorted(names)[0] if names else "?" for names in graph]
        raise EngineError(f"{self._where}: the manifest's {kind}s {list(wanted)} do not match "
                          f"the model's {len(graph)} {kind}(s) {graph_names}")

    # -- the interface ---------------------------------------------------------------------------

    @property
    def input_spec(self) -> InputSpec:
        """The first input's spec: the only one of a single-input model."""
        return self.manifest.input

    @property
    def output_spec(self) -> OutputSpec:
        """The first output's spec: the only one of a single-output model."""
        return self.manifest.output

    @property
    def model_input_shape(self) -> tuple[int | None, ...]:
        """The first input's shape as compiled: None for a dynamic dimension."""
        return self.model_input_shapes.get(self.manifest.input.name, ())

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a single-input, single-output model on ``(N, C, H, W)`` float32."""
        self._check_open("run")
        if len(self.manifest.inputs) != 1 or len(self.manifest.outputs) != 1:
            raise EngineError(
                f"{self._where}: the model has {len(self.manifest.inputs)} input(s) and "
                f"{len(self.manifest.outputs)} output(s); run() is for one of each, use "
                f"run_named({{{', '.join(repr(s.name) for s in self.manifest.inputs)}: ...}})")
        x = self._check_input(batch, self.input_spec, "batch")
        return self._run_checked({self.input_spec.name: x})[self.output_spec.name]

    def run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run any model: float32 ``(N, C, H, W)`` per manifest input name, the same ``N`` for
        all; returns every manifest output by name."""
        self._check_open("run_named")
        if not isinstance(feeds, dict):
            raise EngineInputError(f"{self._where}: run_named takes a dict of input name -> "
                                   f"array, got {type(feeds).__name__}")
        names = [spec.name for spec in self.manifest.inputs]
        missing = [name for name in names if name not in feeds]
        unknown = [name for name in feeds if name not in names]
        if missing or unknown:
            raise EngineInputError(
                f"{self._where}: the model takes inputs {names}; "
                + "; ".join(part for part in (missing and f"missing {missing}",
                                              unknown and f"unknown {unknown}") if part))
        checked = {spec.name: self._check_input(feeds[spec.name], spec, f"input {spec.name!r}")
                   for spec in self.manifest.inputs}
        counts = {name: x.shape[0] for name, x in checked.items()}
        if len(set(counts.values())) > 1:
            raise EngineInputError(f"{self._where}: the inputs hold different numbers of tiles "
                                   f"{counts}; each tile needs all of them")
        return self._run_checked(checked)

    def _run_checked(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = feeds[self.manifest.inputs[0].name]
        self._check_cells(first.shape)
        n = first.shape[0]
        pieces: dict[str, list[np.ndarray]] = {spec.name: [] for spec in self.manifest.outputs}
        for start in range(0, n, self.batch_size):
            chunk = {name: x[start:start + self.batch_size] for name, x in feeds.items()}
            count = min(self.batch_size, n - start)
            if self._fixed_batch and count < self.batch_size:
                chunk = {name: np.concatenate(
                    [x, np.zeros((self.batch_size - count, *x.shape[1:]), np.float32)])
                    for name, x in chunk.items()}
            result = self._run_named({name: np.ascontiguousarray(x)
                                      for name, x in chunk.items()})
            for name, parts in pieces.items():
                parts.append(np.asarray(result[name])[:count])
        return {spec.name: self._check_output(
                    pieces[spec.name][0] if len(pieces[spec.name]) == 1
                    else np.concatenate(pieces[spec.name]), spec, first.shape)
                for spec in self.manifest.outputs}

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

    def _check_open(self, call: str) -> None:
        if self._closed:
            raise EngineError(f"{self._where}: {call}() after close()")

    def _warmup_shape(self, spec: InputSpec) -> tuple[int, int, int, int]:
        n, c, h, w = self.model_input_shapes[spec.name]
        tile = spec.tile_size
        return (self.batch_size if n is None else n, len(spec.bands) if c is None else c,
                tile if h is None else h, tile if w is None else w)

    def _check_input(self, batch: Any, spec: InputSpec, label: str) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise EngineInputError(
                f"{self._where}: expected a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise EngineInputError(
                f"{self._where}: {label} dtype is {batch.dtype}, the engine takes float32 model "
                "input; convert raw pixels with engine.input_spec.normalise() first")
        if batch.ndim != 4:
            raise EngineInputError(
                f"{self._where}: {label} shape {batch.shape} is not (N, C, H, W)"
                + ("; add the batch axis with batch[None]" if batch.ndim == 3 else ""))
        n, c, h, w = batch.shape
        if n == 0 or h == 0 or w == 0:
            raise EngineInputError(f"{self._where}: empty {label} {batch.shape}")
        if c != len(spec.bands):
            raise EngineInputError(
                f"{self._where}: {label} has {c} channels, the model takes {len(spec.bands)} "
                f"({', '.join(spec.bands)})")
        _, _, model_h, model_w = self.model_input_shapes[spec.name]
        if (model_h is not None and h != model_h) or (model_w is not None and w != model_w):
            raise EngineInputError(
                f"{self._where}: {label} tiles are {h}x{w}, the compiled model takes "
                f"{model_h}x{model_w}")
        return batch

    def _check_cells(self, input_shape: tuple[int, ...]) -> None:
        _, _, h, w = input_shape
        for spec in self.manifest.outputs:
            if spec.cell_size and (h % spec.cell_size or w % spec.cell_size):
                raise EngineInputError(
                    f"{self._where}: tiles are {h}x{w}; output {spec.name!r} has one vector per "
                    f"{spec.cell_size}x{spec.cell_size} cell, so tiles must be a multiple of it")

    def _check_output(self, out: np.ndarray, spec: OutputSpec,
                      input_shape: tuple[int, ...]) -> np.ndarray:
        n, _, h, w = input_shape
        s = spec.scale_factor
        if spec.kind == "vector":
            expected: tuple[int, ...] = (n, spec.channels) if not spec.cell_size else \
                (n, spec.channels, h // spec.cell_size, w // spec.cell_size)
            what = f"{spec.channels}-long vector(s), cell size {spec.cell_size or 'the tile'}"
        elif spec.kind == "labels":
            expected, what = (n, 1, h * s, w * s), f"one class index per pixel, scale factor {s}"
        else:
            expected = (n, spec.channels, h * s, w * s)
            what = f"{spec.channels} channel(s), scale factor {s}"
        named = "" if len(self.manifest.outputs) == 1 else f" output {spec.name!r}"
        if out.shape != expected:
            raise EngineError(
                f"{self._where}: the model returned{named} shape {out.shape}, the manifest's "
                f"output spec says {expected} ({what})")
        if spec.kind == "labels":
            if out.dtype.kind not in "iu":
                raise EngineError(
                    f"{self._where}: output {spec.name!r} is of kind 'labels' but the model "
                    f"returned {out.dtype}, not class indices (is the argmax in the graph?)")
            return out.astype(np.int32, copy=False)
        return out.astype(np.float32, copy=False)
