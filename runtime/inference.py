"""Running one bundle's engine over frames and whole scenes, tile by tile.

This is where raw pixels meet the model: bands are picked by common name, scaled as the
manifest (or the operator) says, edge tiles are padded to the compiled tile size, and outputs
are stitched back onto the scene's grid with only each tile's core kept, so no seams show.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from onboard.runtime.bundle import InputSpec
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import ConfigError, EngineInputError
from onboard.runtime.frame import Frame
from onboard.runtime.sources.base import Scene, Tile, iter_tiles
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import Stitcher, StreamingStitcher, TileGrid

if TYPE_CHECKING:  # the config module imports the stages, which import this one
    from onboard.runtime.config import StageConfig

NODATA_CLASS = 255  # class masks carry this where the input pixels could not be trusted
# A DN-to-model-input scale outside this range is a typo or an attack, never a calibration
# (DN to reflectance is 1e-4, reflectance in is 1): refused before any pixel is read.
MIN_SCALE, MAX_SCALE = 1e-12, 1e6
# No model takes inputs this large (reflectance is about 1, raw 16-bit DN at most 65 535): a
# pixel scaled beyond it is garbage (a 3e38 float pixel), and a network fed it still answers
# with finite, confident logits, so it is no data before it reaches the engine.
MAX_MODEL_INPUT = 1e6


def check_scale(scale: float | None, where: str = "scale") -> float | None:
    """``scale`` if it is a usable DN-to-model-input scale, else :class:`ConfigError`."""
    if scale is None:
        return None
    value = float(scale)
    if not math.isfinite(value) or not MIN_SCALE <= value <= MAX_SCALE:
        raise ConfigError(f"{where} must be a finite number in [{MIN_SCALE:g}, {MAX_SCALE:g}], "
                          f"got {scale!r}: a zero, negative or non-finite scale turns every "
                          "pixel into the same or a meaningless model input")
    return value


def check_overlap(overlap: int, tile_size: int, where: str = "overlap") -> int:
    """``overlap`` if tiles of ``tile_size`` may overlap by it, else :class:`ConfigError`.

    More than half a tile multiplies the tiles (and the time) without changing any core pixel's
    context: 255 on 256-pixel tiles makes 66 049 tiles of a 512 × 512 scene instead of 9.
    """
    if isinstance(overlap, bool) or not isinstance(overlap, int) \
            or not 0 <= overlap <= tile_size // 2:
        raise ConfigError(f"{where} must be an integer in [0, {tile_size // 2}] (half the "
                          f"model's {tile_size}-pixel tile), got {overlap!r}")
    return overlap


@dataclass
class OutputCheck:
    """What the finite check on a model's outputs found so far."""

    tiles: int = 0  # tiles with at least one non-finite output pixel
    pixels: int = 0  # output pixels marked no data because their output was not finite
    tile_ids: list[int] = field(default_factory=list)  # the first few, for the report


class Predictor:
    """Turns frames into model outputs with one engine.

    ``scale`` overrides the manifest's DN-to-input scale for every band (for inputs that are
    already reflectance, say); the manifest's offsets still apply.

    A pixel whose model input is not finite or beyond :data:`MAX_MODEL_INPUT` (a 3e38 pixel,
    say), or whose output is not finite, is no data in the product, never a class: the argmax
    of NaN logits is class 0, a confident "clear". :attr:`checked` counts the outputs marked.
    """

    def __init__(self, engine: Engine, scale: float | None = None) -> None:
        self.engine = engine
        spec = engine.input_spec
        scale = check_scale(scale)
        if scale is not None:
            spec = replace(spec, scale=[scale] * len(spec.bands))
        self.spec: InputSpec = spec
        self.output = engine.output_spec
        self.checked = OutputCheck()

    @property
    def tile_size(self) -> int:
        return self.spec.tile_size

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model's input (C, H, W) float32 for ``frame``: its bands, scaled, NaN-free."""
        return self._prepare(frame)[0]

    def _prepare(self, frame: Frame) -> tuple[np.ndarray, np.ndarray | None]:
        """The model input and where it can be trusted (None: everywhere)."""
        pixels = frame.select(self.spec.bands).pixels
        with np.errstate(over="ignore", invalid="ignore"):
            x = self.spec.normalise(pixels)
        valid = frame.valid
        with np.errstate(invalid="ignore"):
            # False for NaN too; a finite pixel can still overflow float32 once scaled.
            plausible = (np.abs(x) <= MAX_MODEL_INPUT).all(axis=0)
        if not plausible.all():
            valid = plausible if valid is None else valid & plausible
        if valid is not None and not valid.all():
            x[:, ~valid] = 0.0  # NaNs would poison whole convolution windows
        return x, valid

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Model outputs for prepared inputs of any size up to the tile size (padded here)."""
        size = self.tile_size
        shapes = [x.shape[1:] for x in inputs]
        batch = np.zeros((len(inputs), inputs[0].shape[0], size, size), np.float32)
        for i, x in enumerate(inputs):
            h, w = x.shape[1:]
            if h > size or w > size:
                raise EngineInputError(f"tile {h}×{w} is larger than the model's {size}×{size}")
            if h == size and w == size:
                batch[i] = x
                continue
            # Reflect-pad so that small scenes see plausible context, not a black border.
            mode = "reflect" if size - h < h and size - w < w else "edge"
            batch[i] = np.pad(x, ((0, 0), (0, size - h), (0, size - w)), mode=mode)
        out = self.engine.run(batch)
        s = self.output.scale_factor
        return [out[i, :, : h * s, : w * s] for i, (h, w) in enumerate(shapes)]

    def to_product(self, output: np.ndarray, frame: Frame,
                   valid: np.ndarray | None = None) -> np.ndarray:
        """Class masks (uint8; NODATA_CLASS where invalid) or values (float32; NaN there).

        ``valid`` defaults to the frame's; pixels whose output is not finite are invalid too.
        """
        valid = frame.valid if valid is None else valid
        if self.output.scale_factor != 1:
            valid = None  # on the input grid; the output grid is checked by its own values
        finite = np.isfinite(output).all(axis=0) if np.issubdtype(output.dtype, np.floating) \
            else None
        if finite is not None and not finite.all():
            self.checked.pixels += int((~finite).sum()) if valid is None \
                else int((~finite & valid).sum())
            valid = finite if valid is None else valid & finite
        if self.output.kind in ("classes", "labels"):
            if self.output.kind == "labels":
                mask = np.where(np.isfinite(output[0]), output[0], 0).astype(np.uint8)
            else:
                with np.errstate(invalid="ignore"):
                    mask = output.argmax(axis=0).astype(np.uint8)
            if valid is not None:
                mask[~valid] = NODATA_CLASS
            return mask[None]
        values = output.astype(np.float32)
        if valid is not None:
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
        prepared = [self._prepare(t.frame) for t in tiles]
        outputs = self.run([x for x, _ in prepared])
        for tile, output, (_, valid) in zip(tiles, outputs, prepared, strict=True):
            before = self.checked.pixels
            product = self.to_product(output, tile.frame, valid)
            if self.checked.pixels > before:
                self.checked.tiles += 1
                if len(self.checked.tile_ids) < 16:
                    self.checked.tile_ids.append(tile.placement.index)
            yield tile, product

    def predict_scene(self, scene: Scene, overlap: int = 16, batch_size: int = 4,
                      errors: list | None = None,
                      progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The product for a whole scene, streamed tile by tile and stitched."""
        size = self.tile_size
        grid = TileGrid(scene.height, scene.width, size, check_overlap(overlap, size))
        classes = self.output.kind in ("classes", "labels")
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

    def stream_classes(self, scene: Scene, overlap: int = 16, batch_size: int = 4,
                       errors: list | None = None,
                       progress: Callable[[int, int], None] | None = None, block: int = 256
                       ) -> tuple[StreamingStitcher, Iterator[np.ndarray]]:
        """The class mask of a whole scene as row-major ``block`` × ``block`` pieces (no data
        past the edges and where a tile cannot be read), the model run tile by tile as the
        pieces are pulled: the mask of a large scene is never whole in memory."""
        if self.output.kind not in ("classes", "labels") or self.output.scale_factor != 1:
            raise ConfigError(f"{self.engine.bundle.path}: only class masks stream; this "
                              f"bundle gives {self.output.kind}")
        size = self.tile_size
        grid = TileGrid(scene.height, scene.width, size, check_overlap(overlap, size))
        stitcher = StreamingStitcher(grid, 1, np.uint8, 1, block=block, fill=NODATA_CLASS)
        total = len(grid)

        def results() -> Iterator[tuple[Any, np.ndarray]]:
            tiles = iter_tiles(scene, grid.tile, grid.overlap, errors=errors)
            for done, (tile, product) in enumerate(self.predict_tiles(tiles, batch_size), 1):
                if progress:
                    progress(done, total)
                yield tile.placement, product

        return stitcher, stitcher.stream(results())


def open_predictor(stage: StageConfig, telemetry: Telemetry | None = None) -> Predictor:
    """The predictor a stage's config asks for, falling back to its golden bundle (and saying
    so in telemetry) when the primary bundle is refused."""
    engine = open_engine(stage.bundle, stage.backend, stage.device, threads=stage.threads,
                         batch_size=stage.batch, fallback=stage.golden, telemetry=telemetry,
                         cache_dir=stage.cache_dir)
    return Predictor(engine)
