"""The one shape every source has: a grid of bands that can be read a window at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from onboard.runtime.errors import SceneError
from onboard.runtime.frame import Frame
from onboard.runtime.georef import Georef
from onboard.runtime.windows import TileGrid, TilePlacement, Window


@dataclass
class Tile:
    """One tile of a scene: where it lies on the grid and its pixels."""

    placement: TilePlacement
    frame: Frame


class Scene(Protocol):
    """A source of pixels on one grid. Reading a window touches only the data under it."""

    source_id: str
    height: int
    width: int
    bands: tuple[str, ...]
    gsd_m: float
    georef: Georef | None
    acquired: datetime | None

    def read(self, window: Window, bands: list[str] | tuple[str, ...] | None = None
             ) -> Frame: ...


def iter_tiles(
    scene: Scene,
    tile: int = 256,
    overlap: int = 0,
    errors: list[SceneError] | None = None,
) -> Iterator[Tile]:
    """Stream a scene tile by tile.

    A tile that cannot be read (a corrupt segment, say) is reported into ``errors`` and skipped,
    so one bad tile never stops the stream; without ``errors`` the first such error is raised.
    """
    for placement in TileGrid(scene.height, scene.width, tile, overlap):
        try:
            frame = scene.read(placement.window)
        except SceneError as error:
            if errors is None:
                raise
            errors.append(error)
            continue
        yield Tile(placement, frame)
