"""The change stage: each clear 32 × 32 cell scored against the reference store, and the store
fed with the clear cells of every acquisition.

The bundle is an encoder (task ``change``): one input, one ``vector`` output with ``cell_size``
32, a latent per cell, and ``manifest.extra["change"]`` = ``{"distance": "l2" | "cosine",
"latent_scale": s, "calibration": {"a", "b"}, "cell_size": 32, "subcells": S}``. With S > 1
(optional, default 1) a cell's latent is S sub-cell latents, feature-major, and its L2 distance
is the largest over its sub-cells. Per tile:

- The encoder runs on a window whose cell grid is the core's: the core's whole cells, the
  frame's context around them (the halo), and zeros (the mean input, as the model's own
  padding) to fill the context to whole cells or to the compiled size of a model with a fixed
  input (a 256 × 256 bundle on 32 px tiles sees each tile and its halo in the middle of a
  window of zeros). Cores are whole cells (the tile size must be a multiple of 32; a scene's
  last row and column of tiles may be narrower, and their partial cells are skipped).
- Latents are quantised to the store's int8 codes, ``q = clip(round(z / s), -127, 127)``, and
  the distance is measured between codes (dequantised), so a score does not depend on whether a
  latent came from the engine or the store. A cell's score is ``sigmoid(a × d + b)`` of its
  minimum distance over the place's references (RaVAEn's memory variant).
- Only clear cells are scored and become references: at least ``min_clear_fraction`` of their
  pixels clear in the cloud stage's layer (``work.layers["cloud"]``; without a cloud stage, valid
  pixels count as clear, and a config with ``[change]`` but no ``[cloud]`` warns at load and in
  telemetry, ``config_warning``). A clear cell whose place has no reference is new: it has no
  score.
- The tile's ``change`` is the **maximum** over its scored cells (a tile is worth its downlink
  when any part of it changed), absent when no cell is scored; ``change_cells`` and
  ``change_new_cells`` count scored and new cells. ``work.layers["change"]`` is the score per
  pixel of the core, ``round(254 × score)`` over each scored cell and 255 where there is none.

The store is committed once per acquisition (:meth:`ChangeStage.end_acquisition`, which the
pipeline calls after the acquisition's last batch), idempotent by acquisition id.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onboard.runtime.bundle import Manifest
from onboard.runtime.config import Config, EngineConfig, register_check
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.base import Engine
from onboard.runtime.errors import ConfigError, GeoreferenceError, StorageError
from onboard.runtime.georef import Georef
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.stages.base import StageContext, TileWork, register_stage
from onboard.runtime.store.reference import CellKeys, ReferenceStore
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import CoreGrid, Window

CLEAR_CLASS = 0  # the cloud stage's class of a clear pixel
NO_SCORE = 255  # in the change layer: no score (new, cloudy, partial or unreadable cell)
DISTANCES = ("l2", "cosine")


@dataclass(frozen=True)
class ChangeConfig(EngineConfig):
    """``[change]``: the encoder bundle (and golden), and the reference store."""

    store: Path | None = None  # default: the run's state folder / "reference"
    k: int = 3  # references kept per place
    min_clear_fraction: float = 0.95  # of a cell's pixels, for it to be scored and kept
    store_budget_bytes: int = 256 * 2**20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= 64:
            raise ConfigError(f"[change] k must be in [1, 64], got {self.k}")
        if not 0.0 < self.min_clear_fraction <= 1.0:
            raise ConfigError(f"[change] min_clear_fraction must be in (0, 1], got "
                              f"{self.min_clear_fraction}")
        if self.store_budget_bytes < 65536:
            raise ConfigError(f"[change] store_budget_bytes must be at least 65536, got "
                              f"{self.store_budget_bytes}")


@dataclass(frozen=True)
class ChangeParams:
    """A change bundle's scoring rule, from ``manifest.extra["change"]``."""

    distance: str
    latent_scale: float
    a: float
    b: float
    cell_size: int
    subcells: int = 1  # sub-cell latents per cell (feature-major); distance: the largest

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str) -> ChangeParams:
        block = manifest.extra.get("change")
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: the bundle's manifest has no extra.change block "
                              f"(distance, latent_scale, calibration, cell_size)")
        try:
            params = cls(str(block["distance"]), float(block["latent_scale"]),
                         float(block["calibration"]["a"]), float(block["calibration"]["b"]),
                         int(block["cell_size"]), int(block.get("subcells", 1)))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{where}: extra.change is malformed: {type(error).__name__}: "
                              f"{error}") from error
        if params.distance not in DISTANCES:
            raise ConfigError(f"{where}: extra.change.distance must be one of {DISTANCES}, got "
                              f"{params.distance!r}")
        if params.subcells < 1 or (params.subcells > 1 and params.distance != "l2"):
            raise ConfigError(f"{where}: extra.change.subcells must be 1, or more with the l2 "
                              f"distance, got {params.subcells} with {params.distance!r}")
        if not (params.latent_scale > 0 and math.isfinite(params.latent_scale)):
            raise ConfigError(f"{where}: extra.change.latent_scale must be positive, got "
                              f"{params.latent_scale}")
        if not (math.isfinite(params.a) and math.isfinite(params.b)):
            raise ConfigError(f"{where}: extra.change.calibration must be finite")
        return params

    def quantise(self, z: np.ndarray) -> np.ndarray:
        """int8 codes of latents ``z`` (..., D)."""
        return np.clip(np.round(np.asarray(z, np.float32) / np.float32(self.latent_scale)),
                       -127, 127).astype(np.int8)

    def min_distance(self, codes: np.ndarray, references: np.ndarray, present: np.ndarray
                     ) -> np.ndarray:
        """(n,) minimum distance from ``codes`` (n, D) to each cell's present ``references``
        (n, K, D), both int8 codes; NaN where a cell has none. With sub-cells, a reference's
        distance is the largest over the cell's sub-cells."""
        q = codes.astype(np.float32)[:, None, :]
        r = references.astype(np.float32)
        if self.distance == "l2":
            n, k, dim = r.shape
            squared = ((q - r) ** 2).reshape(n, k, dim // self.subcells, self.subcells)
            d = np.sqrt(squared.sum(-2)).max(-1) * np.float32(self.latent_scale)
        else:  # cosine does not see the scale
            norms = np.sqrt((q**2).sum(-1) * (r**2).sum(-1))
            d = 1.0 - (q * r).sum(-1) / np.maximum(norms, 1e-12)
        d = np.where(present, d, np.inf)
        best = d.min(axis=1) if d.shape[1] else np.full(len(codes), np.inf)
        return np.where(np.isfinite(best), best, np.nan).astype(np.float32)

    def score(self, distance: np.ndarray) -> np.ndarray:
        """Calibrated change score in [0, 1] (NaN stays NaN)."""
        return (1.0 / (1.0 + np.exp(-(self.a * distance.astype(np.float64) + self.b)))
                ).astype(np.float32)


@dataclass
class CellResult:
    """What the stage found in one tile's cells (for ``onboard predict --reference``): the
    core's ``rows`` × ``cols`` whole cells, row by row, the first at pixel (``row_off``,
    ``col_off``) of the acquisition (the core's corner, ``TileScore.window``)."""

    keys: CellKeys
    scores: np.ndarray  # float32 (n,), NaN where not scored
    row_off: int = 0
    col_off: int = 0
    rows: int = 0
    cols: int = 0


@dataclass
class _Plan:
    """Where a tile's cells lie in the encoder's input: a window of the frame (``window``, in
    the frame's coordinates; it may reach past the frame, which reads as zeros) whose cell grid
    is the core's, and the core's first cell in it."""

    work: TileWork
    window: Window
    rows: int  # whole cells of the core
    cols: int
    first: tuple[int, int]


def _context(available: int, other: int, spare: int | None, cell: int) -> int:
    """Pixels of context before the core along one axis, a whole number of cells: all there is
    (rounded up to a cell; the rest of that cell is zeros), or, for a model of fixed size,
    ``spare`` pixels shared with the other side (``other``: what lies after the core)."""
    want = -(-available // cell) * cell
    if spare is None:
        return want
    after = -(-other // cell) * cell
    if want + after <= spare:
        return min(want, spare)
    return min(want, max(spare - after, spare // 2 // cell * cell))


class ChangeStage:
    name: ClassVar[str] = "change"

    def __init__(self, engine: Engine, store: ReferenceStore, params: ChangeParams,
                 min_clear_fraction: float = 0.95, telemetry: Telemetry | None = None) -> None:
        self.engine = engine
        self.store = store
        self.params = params
        self.min_clear_fraction = min_clear_fraction
        self.telemetry = telemetry
        self.spec = engine.input_spec
        self.bands = tuple(self.spec.bands)
        self.output = _latent_output(engine.manifest, str(engine.bundle.path))
        self.cell = params.cell_size
        # Set by callers that want each tile's cells and scores (onboard predict --reference).
        self.collect: list[CellResult] | None = None

    def describe(self) -> dict[str, Any]:
        return {"stage": self.name, **self.engine.describe(),
                "store": self.store.stats(), "distance": self.params.distance}

    def close(self) -> None:
        self.engine.close()

    def check_tiling(self, tile: int, halo: int) -> None:
        """Refuse a tiling whose tiles are not whole cells."""
        if tile % self.cell:
            raise ConfigError(f"[tiling] tile = {tile}: the change stage scores "
                              f"{self.cell} × {self.cell} cells, so the tile size must be a "
                              f"multiple of {self.cell}")

    # -- one batch -------------------------------------------------------------------------------

    def _plan(self, work: TileWork) -> _Plan | None:
        c = self.cell
        core = work.core
        rows, cols = core.height // c, core.width // c
        if not rows or not cols:
            return None
        fh, fw = work.frame.shape
        below = fh - core.row_off - rows * c
        after = fw - core.col_off - cols * c
        fixed_h, fixed_w = self._model_size
        spare_h = None if fixed_h is None else fixed_h - rows * c
        spare_w = None if fixed_w is None else fixed_w - cols * c
        if (spare_h is not None and spare_h < 0) or (spare_w is not None and spare_w < 0):
            raise ConfigError(f"{self.engine.bundle.path}: the compiled model takes "
                              f"{fixed_h}x{fixed_w} windows, smaller than the tile's "
                              f"{rows * c}x{cols * c} px of whole cells")
        top = _context(core.row_off, below, spare_h, c)
        left = _context(core.col_off, after, spare_w, c)
        height = rows * c + top + (_context(below, 0, None, c) if spare_h is None
                                   else spare_h - top)
        width = cols * c + left + (_context(after, 0, None, c) if spare_w is None
                                   else spare_w - left)
        window = Window(core.row_off - top, core.col_off - left, height, width)
        return _Plan(work, window, rows, cols, (top // c, left // c))

    @property
    def _model_size(self) -> tuple[int | None, int | None]:
        shape = self.engine.model_input_shapes.get(self.spec.name, ())
        return (shape[2], shape[3]) if len(shape) == 4 else (None, None)

    def _encode(self, plans: list[_Plan]) -> list[np.ndarray]:
        """Latents (rows × cols, D) of each plan's core cells, float32."""
        out: list[np.ndarray | None] = [None] * len(plans)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault((plan.window.height, plan.window.width), []).append(i)
        for (h, w), members in groups.items():
            x = np.zeros((len(members), len(self.bands), h, w), np.float32)
            for slot, i in enumerate(members):
                plan = plans[i]
                frame = plan.work.frame.select(list(self.bands))
                fh, fw = frame.shape
                # The part of the window inside the frame; the rest stays 0 (the mean input).
                r0, c0 = max(plan.window.row_off, 0), max(plan.window.col_off, 0)
                r1 = min(plan.window.row_off + h, fh)
                c1 = min(plan.window.col_off + w, fw)
                target = x[slot][:, r0 - plan.window.row_off:r1 - plan.window.row_off,
                                 c0 - plan.window.col_off:c1 - plan.window.col_off]
                target[:] = self.spec.normalise(frame.pixels[:, r0:r1, c0:c1])
                if frame.valid is not None:
                    valid = frame.valid[r0:r1, c0:c1]
                    if not valid.all():
                        target[:, ~valid] = 0.0  # NaNs would poison whole convolution windows
            z = self.engine.run_named({self.spec.name: x})[self.output]
            for slot, i in enumerate(members):
                plan = plans[i]
                r, c = plan.first
                cells = z[slot][:, r:r + plan.rows, c:c + plan.cols]
                out[i] = cells.reshape(cells.shape[0], -1).T
        return [z for z in out if z is not None]

    def _clear(self, work: TileWork, rows: int, cols: int) -> np.ndarray:
        """(rows × cols,) whether each core cell is clear enough to score and keep."""
        c = self.cell
        mask = work.layers.get("cloud")
        if mask is not None:
            clear = mask[: rows * c, : cols * c] == CLEAR_CLASS
        elif work.frame.valid is not None:
            clear = work.core_of(work.frame.valid)[: rows * c, : cols * c]
        else:
            return np.ones(rows * cols, bool)
        fraction = clear.reshape(rows, c, cols, c).mean(axis=(1, 3), dtype=np.float32)
        return (fraction >= self.min_clear_fraction).ravel()

    def process(self, batch: list[TileWork]) -> list[TileScore]:
        plans = []
        for work in batch:
            if work.score.decision == Decision.FAILED or not work.frame.pixels.size:
                continue
            plan = self._plan(work)
            if plan is None:
                work.score.reasons.append("change: no whole cell in this tile")
                continue
            plans.append(plan)
        if not plans:
            return [work.score for work in batch]
        latents = self._encode(plans)
        for plan, z in zip(plans, latents, strict=True):
            self._score_tile(plan, z)
        return [work.score for work in batch]

    def _score_tile(self, plan: _Plan, z: np.ndarray) -> None:
        work, c = plan.work, self.cell
        if not np.isfinite(z).all():
            work.score.fail("change: the model output is not finite")
            return
        n = plan.rows * plan.cols
        layer = np.full((work.core.height, work.core.width), NO_SCORE, np.uint8)
        work.layers["change"] = layer
        georef = work.frame.georef
        if georef is None or georef.crs is None:
            work.score.reasons.append("change: the frame has no georeferencing: no place to "
                                      "compare with")
            return
        codes = self.params.quantise(z)
        clear = self._clear(work, plan.rows, plan.cols)
        grid_rows, grid_cols = np.divmod(np.arange(n), plan.cols)
        centre_rows = work.core.row_off + grid_rows * c + c / 2
        centre_cols = work.core.col_off + grid_cols * c + c / 2
        try:
            keys = self.store.keys(georef, centre_cols, centre_rows)
        except GeoreferenceError as error:
            work.score.reasons.append(f"change: {error}")
            return
        acquisition = work.score.acquisition
        try:
            memory = self.store.lookup(keys, exclude_scene=acquisition)
        except StorageError as error:
            # A damaged segment must not silence change detection over its region for good:
            # its places count as new, and the next commit writes the region afresh. Only the
            # regions whose segments cannot be read are forgotten; the tile's other regions
            # keep their references.
            damaged = self.store.forget_unreadable(keys) or [error]
            for each in damaged:
                if self.telemetry is not None:
                    self.telemetry.emit("reference_damaged", tile=work.score.tile_id,
                                        file=getattr(each, "path", None),
                                        error=type(each).__name__, message=str(each))
                work.score.reasons.append(f"change: reference store damaged ({each}); its "
                                          f"cells counted as new")
            memory = self.store.lookup(keys, exclude_scene=acquisition)
        scored = clear & memory.known
        scores = np.full(n, np.nan, np.float32)
        if scored.any():
            distance = self.params.min_distance(codes[scored], memory.codes[scored],
                                                memory.present[scored])
            scores[scored] = self.params.score(distance)
        new = int((clear & ~memory.known).sum())
        work.score.values["change_cells"] = float(scored.sum())
        work.score.values["change_new_cells"] = float(new)
        if scored.any():
            best = float(np.max(scores[scored]))
            work.score.values["change"] = best
            work.score.reasons.append(f"change: {best:.2f} (max over {int(scored.sum())} "
                                      f"cells; {new} new)")
            coded = np.where(scored, np.round(scores * 254), NO_SCORE).astype(np.uint8)
            layer[: plan.rows * c, : plan.cols * c] = np.repeat(
                np.repeat(coded.reshape(plan.rows, plan.cols), c, axis=0), c, axis=1)
        elif new:
            work.score.reasons.append(f"change: new place ({new} clear cells, no reference)")
        else:
            work.score.reasons.append("change: no clear cell to score")
        self.store.stage(acquisition, work.frame.acquired, keys, codes, clear)
        if self.collect is not None:
            self.collect.append(CellResult(keys, scores, work.score.window[0],
                                           work.score.window[1], plan.rows, plan.cols))

    # -- the end of an acquisition ---------------------------------------------------------------

    def end_acquisition(self, acquisition: str) -> None:
        """Commit ``acquisition``'s clear cells to the store, once per acquisition id."""
        result = self.store.commit(acquisition)
        if self.telemetry is not None:
            self.telemetry.emit("reference_commit", acquisition=acquisition,
                                committed=result.committed, places_added=result.places_added,
                                references_added=result.references_added,
                                evicted_regions=result.evicted_regions,
                                evicted_places=result.evicted_places, bytes=result.bytes,
                                places=self.store.places)


def _latent_output(manifest: Manifest, where: str) -> str:
    vectors = [o for o in manifest.outputs if o.kind == "vector" and o.cell_size]
    if len(vectors) != 1:
        raise ConfigError(f"{where}: the change stage needs exactly one per-cell vector output "
                          f"(kind 'vector' with a cell_size), found {len(vectors)}")
    return vectors[0].name


def build_change_stage(config: ChangeConfig, context: StageContext) -> ChangeStage:
    engine = open_engine(config.bundle, config.backend, config.device, threads=config.threads,
                         batch_size=config.batch, fallback=config.golden,
                         telemetry=context.telemetry, cache_dir=config.cache_dir)
    try:
        return change_stage(engine, config.store or context.state_dir / "reference",
                            k=config.k, min_clear_fraction=config.min_clear_fraction,
                            budget_bytes=config.store_budget_bytes, telemetry=context.telemetry,
                            radiometric_offset=context.radiometric_offset)
    except BaseException:
        engine.close()
        raise


def change_stage(engine: Engine, store_path: Path, *, k: int = 3,
                 min_clear_fraction: float = 0.95, budget_bytes: int = 256 * 2**20,
                 telemetry: Telemetry | None = None, radiometric_offset: float = 0.0
                 ) -> ChangeStage:
    """The stage over an open encoder ``engine`` and the store at ``store_path``."""
    manifest = engine.manifest
    where = str(engine.bundle.path)
    if manifest.task != "change":
        raise ConfigError(f"{where}: the change stage needs a change bundle, got task "
                          f"{manifest.task!r}")
    params = ChangeParams.from_manifest(manifest, where)
    output = next(o for o in manifest.outputs if o.name == _latent_output(manifest, where))
    if output.cell_size != params.cell_size:
        raise ConfigError(f"{where}: output {output.name!r} has cell_size {output.cell_size} "
                          f"but extra.change.cell_size is {params.cell_size}")
    if output.channels % params.subcells:
        raise ConfigError(f"{where}: output {output.name!r} has {output.channels} channels, "
                          f"which do not split into {params.subcells} sub-cell latents")
    expected = float(getattr(engine.input_spec, "radiometric_offset", 0.0))
    if expected != radiometric_offset:
        raise ConfigError(
            f"{where}: the bundle expects input with a radiometric offset of {expected:g} DN but "
            f"the source states {radiometric_offset:g} DN; refusing to guess")
    # The golden bundle may differ in precision, never in what its codes mean.
    store = ReferenceStore(store_path, dim=output.channels, k=k,
                           model=f"{manifest.name}@{manifest.version}",
                           budget_bytes=budget_bytes, cell_px=params.cell_size)
    return ChangeStage(engine, store, params, min_clear_fraction, telemetry)


register_stage("change", ChangeConfig, build_change_stage, order=20)

NO_CLOUD_WARNING = ("[change] without [cloud]: there is no cloud mask, so every cell with "
                    "enough valid pixels counts as clear, is scored and becomes a reference "
                    "(clouds, haze and shadows included); add a [cloud] stage")


def _check_change_has_cloud(config: Config) -> list[str]:
    """Only clear cells should become references, and only the cloud stage says what is
    clear."""
    return [NO_CLOUD_WARNING] if "change" in config and "cloud" not in config else []


register_check(_check_change_has_cloud)


# -- onboard predict BUNDLE --reference DATE1 INPUT ----------------------------------------------


@dataclass
class ChangeRaster:
    """Change score per whole cell of the input (the bundle's ``cell_size``, 32 px, counted
    from the input's top-left pixel): float32 (rows, cols), NaN where a cell has no score,
    georeferenced on the input's own cell grid (its transform with 32 times larger pixels). On
    the input's grid each cell keeps its own score, even where two cells fall on one place of
    the store."""

    scores: np.ndarray
    georef: Georef
    scored: int  # cells with a score
    unscored: int  # whole cells of the input without one (see :func:`change_raster`)


def change_raster(engine: Engine, reference: Any, scene: Any, *, tile: int = 256,
                  halo: int = 0, batch: int = 8, min_clear_fraction: float = 0.95,
                  store_path: Path | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> ChangeRaster:
    """Score ``scene`` against ``reference`` (two :class:`~onboard.runtime.sources.base.Scene`
    objects): the reference's clear cells are committed to a store (a temporary one unless
    ``store_path``), then the scene's cells are scored against it. There is no cloud stage
    here: a cell is clear when ``min_clear_fraction`` of its pixels are valid, so a cell has
    no score when its place holds no valid reference cell (the reference does not cover it, or
    has too many invalid pixels there) or when too many of its own pixels are invalid. Windows
    of ``tile`` pixels with no halo by default: each window encoded on its own, as the change
    model is evaluated."""
    for which, current in (("the reference", reference), ("the input", scene)):
        if current.georef is None or current.georef.crs is None:
            raise GeoreferenceError(getattr(current, "source_id", None),
                                    f"{which} has no georeferencing (CRS and transform): its "
                                    f"cells have no place to compare with")
    folder = Path(store_path) if store_path else Path(tempfile.mkdtemp(prefix="onboard-ref-"))
    try:
        stage = change_stage(engine, folder, k=1, min_clear_fraction=min_clear_fraction)
        stage.check_tiling(tile, halo)
        for index, current in enumerate((reference, scene)):
            acquisition = f"{'reference' if index == 0 else 'input'}-{current.source_id}"
            if index == 1:
                stage.collect = []
            grid = CoreGrid(current.height, current.width, tile, halo)
            placements = list(grid)
            for start in range(0, len(placements), batch):
                works = []
                for placement in placements[start:start + batch]:
                    core = placement.core
                    score = TileScore(f"{acquisition}/{core.row_off}_{core.col_off}",
                                      acquisition,
                                      (core.row_off, core.col_off, core.height, core.width))
                    frame = current.read(placement.window, stage.bands)
                    works.append(TileWork(score, frame, core.relative_to(placement.window)))
                stage.process(works)
                if progress is not None:
                    progress(acquisition, min(start + batch, len(placements)), len(placements))
            stage.end_acquisition(acquisition)
        return _raster(scene, stage.cell, stage.collect or [])
    finally:
        if store_path is None:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)


def _raster(scene: Any, cell: int, cells: list[CellResult]) -> ChangeRaster:
    """The scores of ``cells`` on ``scene``'s own grid of whole ``cell``-px cells."""
    rows, cols = scene.height // cell, scene.width // cell
    if not rows or not cols:
        raise GeoreferenceError(getattr(scene, "source_id", None),
                                f"the input ({scene.height} × {scene.width} px) holds no whole "
                                f"{cell} × {cell} cell")
    out = np.full((rows, cols), np.nan, np.float32)
    for result in cells:
        r0, c0 = result.row_off // cell, result.col_off // cell
        out[r0:r0 + result.rows, c0:c0 + result.cols] = \
            result.scores.reshape(result.rows, result.cols)
    georef = Georef(scene.georef.crs, scene.georef.transform.scaled(1.0 / cell))
    scored = int(np.isfinite(out).sum())
    return ChangeRaster(out, georef, scored, out.size - scored)


def predict(args: Any) -> int:
    """``onboard predict CHANGE_BUNDLE --reference DATE1 INPUT --out SCORES.tif``: the change
    score of every 32-px cell of INPUT against the cells of DATE1, one float32 pixel per cell
    on INPUT's own cell grid (NaN: no score), with a PNG quick-look beside it. There is no cloud
    masking: a cell counts as clear when enough of its pixels are valid.

    DATE1 and INPUT are GeoTIFFs (``--bands`` names their bands) or OSCD-style band folders;
    two band folders are read on DATE1's 10 m grid, as the pipeline reads an OSCD pair.
    """
    import sys

    from onboard.runtime.downlink.products import write_geotiff
    from onboard.runtime.downlink.quicklook import colormap
    from onboard.runtime.png import write_png
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.sources.oscd import OscdScene

    telemetry = Telemetry(args.telemetry) if getattr(args, "telemetry", None) else Telemetry()
    engine = open_engine(args.bundle, args.backend, args.device, threads=args.threads,
                         batch_size=args.batch, telemetry=telemetry,
                         trust=list(getattr(args, "trust", None) or []) or None)
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    scenes: list[Any] = []
    try:
        wanted = tuple(engine.input_spec.bands)
        if args.reference.is_dir() and args.input.is_dir():
            reference: Any = OscdScene(args.reference, _own_names(wanted))
            scene: Any = OscdScene(args.input, _own_names(wanted), grid=reference.grid)
        else:
            reference = OscdScene(args.reference, _own_names(wanted)) \
                if args.reference.is_dir() else GeoTiffScene(args.reference, bands=bands)
            scene = OscdScene(args.input, _own_names(wanted)) if args.input.is_dir() \
                else GeoTiffScene(args.input, bands=bands)
        scenes = [reference, scene]

        def progress(what: str, done: int, total: int) -> None:
            if sys.stderr.isatty() or done == total:
                print(f"\r{what.split('-')[0]}: tiles {done}/{total}",
                      end="\n" if done == total else "", file=sys.stderr)

        raster = change_raster(engine, reference, scene, batch=args.batch, progress=progress)
    finally:
        engine.close()
        for opened in scenes:
            close = getattr(opened, "close", None)
            if close is not None:
                close()
    write_geotiff(args.out, raster.scores[None], ["change"], raster.georef,
                  acquired=getattr(scene, "acquired", None), source_id=str(args.input),
                  extra={"bundle": engine.manifest.name,
                         "bundle_version": engine.manifest.version,
                         "bundle_sha256": engine.bundle.sha256, "reference": str(args.reference),
                         "nodata": "NaN: no score (the reference has no valid cell at "
                                   "this place, or too few of the cell's own pixels are "
                                   "valid; no cloud masking)",
                         "cell_px": raster_cell_px(engine)})
    summary: dict[str, Any] = {"out": str(args.out), "cells_scored": raster.scored,
                               "cells_without_score": raster.unscored}
    if raster.scored:
        finite = raster.scores[np.isfinite(raster.scores)]
        summary.update(mean=round(float(finite.mean()), 4), max=round(float(finite.max()), 4),
                       above_half=int((finite > 0.5).sum()))
    if not args.no_png:
        # One cell is 8 × 8 PNG pixels: a city is a few dozen cells across.
        image = np.repeat(np.repeat(colormap(raster.scores, 0.0, 1.0), 8, axis=0), 8, axis=1)
        summary["png"] = str(write_png(Path(args.out).with_suffix(".png"), image))
    telemetry.emit("predict_done", **summary)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def raster_cell_px(engine: Engine) -> int:
    return ChangeParams.from_manifest(engine.manifest, str(engine.bundle.path)).cell_size


def _own_names(bands: tuple[str, ...]) -> tuple[str, ...]:
    """Sentinel-2 names of a bundle's bands (own or unique common names), to open an OSCD band
    folder with only what the encoder reads."""
    from onboard.runtime.bands import sentinel2_band

    return tuple(sentinel2_band(b).name for b in bands)
