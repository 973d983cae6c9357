"""Running one bundle's engine over frames and whole scenes, tile by tile.

This is where raw pixels meet the model: bands are picked by common name, scaled as the
manifest (or the operator) says, edge tiles are padded to the compiled tile size, and outputs
are stitched back onto the scene's grid with only each tile's core kept, so no seams show.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from onboard.runtime.bundle import InputSpec
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.base import Engine
from onboard.runtime.frame import Frame
from onboard.runtime.sources.base import Scene, Tile, iter_tiles
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Stitcher, TileGrid

if TYPE_CHECKING:  # the config module imports the stages, which import this one
    from onboard.runtime.config import StageConfig

NODATA_CLASS = 255  # class masks carry this where the input pixels could not be trusted


class Predictor:
    """Turns frames into model outputs with one engine.

    ``scale`` overrides the manifest's DN-to-input scale for every band (for inputs that are
    already reflectance, say); the manifest's offsets still apply.
    """

    def __init__(self, engine: Engine, scale: float | None = None) -> None:
        self.engine = engine
        spec = engine.input_spec
        if scale is not None:
            spec = replace(spec, scale=[float(scale)] * len(spec.bands))
        self.spec: InputSpec = spec
        self.output = engine.output_spec

    @property
    def tile_size(self) -> int:
        return self.spec.tile_size

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model's input (C, H, W) float32 for ``frame``: its bands, scaled, NaN-free."""
        pixels = frame.select(self.spec.bands).pixels
        x = self.spec.normalise(pixels)
        if frame.valid is not None and not frame.valid.all():
            x[:, ~frame.valid] = 0.0  # NaNs would poison whole convolution windows
        return x

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Model outputs for prepared inputs of any size up to the tile size (padded here)."""
        size = self.tile_size
        shapes = [x.shape[1:] for x in inputs]
        batch = np.zeros((len(inputs), inputs[0].shape[0], size, size), np.float32)
        for i, x in enumerate(inputs):
            h, w = x.shape[1:]
            if h > size or w > size:
                raise ValueError(f"tile {h}×{w} is larger than the model's {size}×{size}")
            if h == size and w == size:
                batch[i] = x
                continue
            # Reflect-pad so that small scenes see plausible context, not a black border.
            mode = "reflect" if size - h < h and size - w < w else "edge"
            batch[i] = np.pad(x, ((0, 0), (0, size - h), (0, size - w)), mode=mode)
        out = self.engine.run(batch)
        s = self.output.scale_factor
        return [out[i, :, : h * s, : w * s] for i, (h, w) in enumerate(shapes)]

    def to_product(self, output: np.ndarray, frame: Frame) -> np.ndarray:
        """Class masks (uint8; NODATA_CLASS where invalid) or values (float32; NaN there)."""
        valid = frame.valid
        if self.output.kind == "classes":
            mask = output.argmax(axis=0).astype(np.uint8)
            if valid is not None and self.output.scale_factor == 1:
                mask[~valid] = NODATA_CLASS
            return mask[None]
        values = output.astype(np.float32)
        if valid is not None and self.output.scale_factor == 1:
            values[:, ~valid] = np.nan
        return values

    def predict_tiles(self, tiles: Iterator[Tile], batch_size: int = 4
                      ) -> Iterator[tuple[Tile, np.ndarray]]:
        """(tile, product) for each tile, batching tiles through the engine."""
        pending: list[Tile] = []
        for tile in tiles:
            pending.append(tile)
            if len(pending) == batch_size:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    def _flush(self, tiles: list[Tile]) -> Iterator[tuple[Tile, np.ndarray]]:
        outputs = self.run([self.prepare(t.frame) for t in tiles])
        for tile, output in zip(tiles, outputs, strict=True):
            yield tile, self.to_product(output, tile.frame)

    def predict_scene(self, scene: Scene, overlap: int = 16, batch_size: int = 4,
                      errors: list | None = None,
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The product for a whole scene, streamed tile by tile and stitched."""
        size = self.tile_size
        grid = TileGrid(scene.height, scene.width, size, min(overlap, size - 1))
        classes = self.output.kind == "classes"
        stitcher = Stitcher(grid, 1 if classes else self.output.channels,
                            np.uint8 if classes else np.float32, self.output.scale_factor)
        if classes:
            stitcher.out[:] = NODATA_CLASS  # tiles that cannot be read stay nodata
        done = 0
        tiles = iter_tiles(scene, grid.tile, grid.overlap, errors=errors)
        for tile, product in self.predict_tiles(tiles, batch_size):
            stitcher.add(tile.placement, product)
            done += 1
            if progress:
                progress(done, len(grid))
        return stitcher.out


def open_predictor(stage: StageConfig, telemetry: Telemetry | None = None) -> Predictor:
    """The predictor a stage's config asks for, falling back to its golden bundle (and saying
    so in telemetry) when the primary bundle is refused."""
    engine = open_engine(stage.bundle, stage.backend, stage.device, threads=stage.threads,
                         batch_size=stage.batch, fallback=stage.golden, telemetry=telemetry)
    return Predictor(engine)
