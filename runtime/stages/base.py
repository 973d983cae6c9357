"""The stage protocol: one method over a batch of tiles, returning their scores.

A stage is a small object that the pipeline builds from the stage's own config section and
calls with batches of :class:`TileWork`. It reads the tiles' frames, may add per-pixel layers
(the cloud mask, a change map) over each tile's core, writes what it measured into each tile's
:class:`~onboard.runtime.scores.TileScore` and may lower its decision, never raise it.

A new stage is one module in this package that calls :func:`register_stage`: the pipeline finds
it (every module here is imported), its section becomes a valid config key, and it runs in its
declared ``order`` whenever its section is present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from onboard.runtime.config import register_section
from onboard.runtime.frame import Frame
from onboard.runtime.scores import TileScore
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Window


@dataclass
class TileWork:
    """One tile on its way through the stages.

    ``frame`` holds the tile's window (its core plus context), with the bands the stages asked
    for; ``core`` is the core in the frame's own coordinates.
    """

    score: TileScore
    frame: Frame
    core: Window
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # (core h, core w) each

    def core_of(self, array: np.ndarray) -> np.ndarray:
        """The core of a (..., H, W) array laid over the frame."""
        return array[(..., *self.core.slices)]


class Stage(Protocol):
    """What the pipeline calls. ``bands`` are the input bands the stage reads, by common
    name; ``describe`` says what runs (bundle, backend), for telemetry and STAC."""

    name: ClassVar[str]
    bands: tuple[str, ...]

    def process(self, batch: list[TileWork]) -> list[TileScore]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StageContext:
    """What a stage may need from the run beyond its own section."""

    telemetry: Telemetry
    state_dir: Path  # persistent state that outlives a run (a reference store, say)
    radiometric_offset: float = 0.0  # the source's DN offset, checked against each bundle


@dataclass(frozen=True)
class StageSpec:
    name: str
    config: type
    build: Callable[[Any, StageContext], Stage]
    order: int  # stages run in ascending order


_STAGES: dict[str, StageSpec] = {}


def register_stage(name: str, config: type, build: Callable[[Any, StageContext], Stage],
                   order: int) -> None:
    """Make ``[name]`` a config section whose presence runs the stage ``build`` makes."""
    register_section(name, config, doc=f"the {name} stage")
    _STAGES[name] = StageSpec(name, config, build, order)


def registered_stages() -> list[StageSpec]:
    return sorted(_STAGES.values(), key=lambda spec: spec.order)
