"""The zoo's registry: what the compiler needs to know about each trained model.

A model registers one :class:`ZooModel`. ``onboard compile NAME`` looks it up here; everything
model-specific (architecture, weights, data, loss, metric) comes from the entry, so the compiler
itself knows no model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Each zoo module registers its entries when imported; listed here so lookup is explicit.
_MODULES = ("onboard.models.cloud", "onboard.models.change", "onboard.models.superres")


@dataclass
class ZooModel:
    """One trained model and everything needed to compile, fine-tune and evaluate it.

    Arrays are numpy float32 NCHW already normalised with ``input_scale``/``input_offset``
    (model input = DN * scale + offset), labels are numpy arrays, so the compiler can feed the
    same data to torch, ONNX Runtime and OpenVINO.
    """

    name: str
    task: str  # "cloud" | "change" | "superres" | "segmentation"
    version: str
    build: Callable[[], Any]  # () -> torch.nn.Module, untrained
    weights: Path  # state_dict saved with torch.save
    bands: list[str]  # STAC common names, in input order
    input_scale: list[float]
    input_offset: list[float]
    tile_size: int
    gsd_m: float
    output_kind: str  # "classes" | "values"
    classes: dict[int, str] = field(default_factory=dict)
    metric_name: str = ""  # e.g. "boa" (balanced overall accuracy), "psnr"
    # (data_root) -> iterable of (x, y) numpy batches for fine-tuning
    train_batches: Callable[[Path], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None
    # (data_root) -> list of (x, y) numpy batches: the held-out validation split
    validation_batches: Callable[[Path], list[tuple[np.ndarray, np.ndarray]]] | None = None
    # (data_root, n) -> float32 NCHW calibration tiles from the model's own training split
    calibration_tiles: Callable[[Path, int], np.ndarray] | None = None
    # (model_output_logits, labels) -> torch loss; used by the pruning fine-tune
    loss: Callable[[Any, Any], Any] | None = None
    # (list of model outputs as numpy, list of labels) -> metric value, higher is better
    metric: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None
    card: Path | None = None  # the model card (markdown)
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, ZooModel] = {}


def register(model: ZooModel) -> ZooModel:
    _REGISTRY[model.name] = model
    return model


def get(name: str) -> ZooModel:
    """The zoo entry called ``name``; raises KeyError listing what the zoo has."""
    _load()
    if name not in _REGISTRY:
        raise KeyError(f"no zoo model {name!r}; the zoo has {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def _load() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise
