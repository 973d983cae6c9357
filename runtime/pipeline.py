"""The flight pipeline: the one place that composes a pass.

    source -> tiles -> stages -> scores -> planner -> products -> queue -> link

Each acquisition of the source is cut into tiles (the units the planner ranks), read with some
context around each, and streamed batch by batch through the stages in their registered order.
A reader thread decodes the next batches while the stages run on the current one (both release
the GIL in their native code), through a bounded buffer whose policy is explicit: ``block``
leaves frames waiting on storage (a file source loses nothing), ``drop`` drops the newest batch
and records every dropped tile. Every batch has a deadline: an engine that hangs fails its tiles
and is replaced, and the pass goes on.

After every acquisition is scored, the planner fills each contact window by value per byte
(products are budgeted from estimates), the chosen products are made (their real compressed
bytes recorded; the plan is repacked if an estimate was short), written with their STAC Items,
queued, and sent over the link if one is configured. Telemetry, the audit of the plan, a
quicklook PNG per acquisition and a pass report come out beside them.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from onboard.runtime.aoi import AoiConfig, AreaOfInterest
from onboard.runtime.config import Config, register_section
from onboard.runtime.errors import ConfigError, OnboardError, SceneError
from onboard.runtime.frame import Frame
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.sources.base import Scene
from onboard.runtime.stages import Stage, StageContext, TileWork, registered_stages
from onboard.runtime.telemetry import Telemetry
from onboard.runtime.windows import CoreGrid, TilePlacement, Window

# -- the pipeline's own config sections -----------------------------------------------------------


@dataclass(frozen=True)
class SourceConfig:
    """``[source]``: where acquisitions come from."""

    kind: Literal["oscd", "geotiff", "spool"] = "oscd"
    # oscd: city folders (both dates, in order) or single band folders; geotiff: files;
    # spool: one folder an instrument writes GeoTIFFs into.
    paths: tuple[Path, ...] = ()
    bands: tuple[str, ...] = ()  # an anonymous GeoTIFF's band names, in file order
    # The DN offset the data carries (Sentinel-2 L1C from processing baseline 04.00: -1000).
    # Each bundle states what it expects; a mismatch is refused, never guessed.
    radiometric_offset: float = 0.0
    nodata: float | None = None
    settle_s: float = 1.0  # spool: a file unchanged this long is complete


@dataclass(frozen=True)
class TilingConfig:
    """``[tiling]``: the tile is the unit the planner ranks and STAC describes; ``halo`` is the
    context read around it for the models."""

    tile: int = 256
    halo: int = 16

    def __post_init__(self) -> None:
        if not 8 <= self.tile <= 4096:
            raise ConfigError(f"tile must be in [8, 4096] pixels, got {self.tile}")
        if not 0 <= self.halo <= min(self.tile, 256):
            raise ConfigError(f"halo must be in [0, min(tile, 256)], got {self.halo}")


@dataclass(frozen=True)
class BufferConfig:
    """``[buffer]``: between the reader and the stages."""

    batch: int = 8  # tiles per batch through the stages
    batches: int = 3  # batches the buffer holds
    policy: Literal["block", "drop"] = "block"
    deadline_s: float = 60.0  # per batch and stage; past it the tiles fail, the engine is reset

    def __post_init__(self) -> None:
        if not 1 <= self.batch <= 1024:
            raise ConfigError(f"batch must be in [1, 1024], got {self.batch}")
        if not 1 <= self.batches <= 1024:
            raise ConfigError(f"batches must be in [1, 1024], got {self.batches}")
        if not 0 < self.deadline_s <= 3600:
            raise ConfigError(f"deadline_s must be in (0, 3600], got {self.deadline_s}")


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: JSON lines, bounded per pass."""

    path: Path | None = None  # default: telemetry.jsonl in the output folder
    budget_bytes: int = 8 * 2**20
    band_stats: bool = True  # per-band input statistics per tile (drift monitoring)

    def __post_init__(self) -> None:
        if self.budget_bytes < 4096:
            raise ConfigError(f"telemetry budget_bytes must be at least 4096, got "
                              f"{self.budget_bytes}")


register_section("source", SourceConfig, doc="where acquisitions come from")
register_section("tiling", TilingConfig, doc="tile size and context")
register_section("buffer", BufferConfig, doc="batching, backpressure and deadlines")
register_section("telemetry", TelemetryConfig, doc="telemetry file and budget")

# -- acquisitions ---------------------------------------------------------------------------------


@dataclass
class Acquisition:
    """One frame or scene of the sensor, as the pipeline sees it."""

    id: str
    place: str
    scene: Scene
    acquired: datetime | None
    done: Callable[[dict[str, Any]], None] | None = None  # the spool's record of completion


def iter_acquisitions(source: SourceConfig, telemetry: Telemetry,
                      errors: list[dict[str, Any]]) -> Iterator[Acquisition]:
    """The source's acquisitions in order; one that cannot be opened is reported into
    ``errors`` (and telemetry) and skipped."""
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.sources.oscd import OscdScene

    def opened(path: Path, make: Callable[[], Scene]) -> Scene | None:
        try:
            return make()
        except OnboardError as error:
            record = {"source": str(path), "error": type(error).__name__, "message": str(error)}
            errors.append(record)
            telemetry.emit("acquisition_error", **record)
            return None

    bands = list(source.bands) or None
    if source.kind == "oscd":
        for path in source.paths:
            if (path / "imgs_1").is_dir():
                before = opened(path / "imgs_1", lambda p=path: OscdScene(p / "imgs_1"))
                if before is not None:
                    yield _acquisition(path.name, before)
                after = opened(path / "imgs_2", lambda p=path, b=before: OscdScene(
                    p / "imgs_2", grid=b.grid if b is not None else None))
                if after is not None:
                    yield _acquisition(path.name, after)
            else:
                scene = opened(path, lambda p=path: OscdScene(p))
                if scene is not None:
                    yield _acquisition(path.parent.name if path.name.startswith("imgs_")
                                       else path.name, scene)
    elif source.kind == "geotiff":
        for path in source.paths:
            scene = opened(path, lambda p=path: GeoTiffScene(p, bands=bands,
                                                             nodata=source.nodata))
            if scene is not None:
                yield _acquisition(path.stem, scene)
    else:
        from onboard.runtime.sources.spool import Spool

        if len(source.paths) != 1:
            raise ConfigError(f"a spool source takes one folder, got {len(source.paths)}")
        spool = Spool(source.paths[0], settle_s=source.settle_s, telemetry=telemetry)
        for item in spool.pending():
            try:
                scene = GeoTiffScene(item.path, bands=bands, nodata=source.nodata)
            except OnboardError as error:
                spool.reject(item, error)
                errors.append({"source": str(item.path), "error": type(error).__name__,
                               "message": str(error)})
                continue
            acquisition = _acquisition(item.path.stem, scene)
            acquisition.done = lambda fields, i=item: spool.done(i, **fields)
            yield acquisition


def _acquisition(place: str, scene: Scene) -> Acquisition:
    when = scene.acquired
    stamp = when.strftime("%Y%m%dT%H%M%S") if when else "undated"
    return Acquisition(f"{place}-{stamp}", place, scene, when)


# -- results --------------------------------------------------------------------------------------


@dataclass
class AcquisitionResult:
    acquisition: str
    place: str
    acquired: datetime | None
    shape: tuple[int, int]
    scores: list[TileScore]
    timings_s: dict[str, float]
    input_mpx: float
    dropped_by_backpressure: int = 0
    # Decimated layers for the quicklook: (3, h, w) RGB and (h, w) cloud classes.
    quicklook_rgb: np.ndarray | None = None
    quicklook_cloud: np.ndarray | None = None
    quicklook_factor: int = 1

    def counts(self) -> dict[str, int]:
        out = {str(d): 0 for d in Decision}
        for score in self.scores:
            out[str(score.decision)] += 1
        return out


@dataclass
class _Batch:
    works: list[TileWork]
    read_s: float


# -- the pipeline ---------------------------------------------------------------------------------


class Pipeline:
    """Scores acquisitions tile by tile through the configured stages.

    ``progress(acquisition_id, done_tiles, total_tiles)`` is called as tiles complete.
    """

    def __init__(self, config: Config, telemetry: Telemetry, state_dir: Path,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.config = config
        self.telemetry = telemetry
        self.source: SourceConfig = config.section("source")
        self.tiling: TilingConfig = config.section("tiling")
        self.buffer: BufferConfig = config.section("buffer")
        self.telemetry_config: TelemetryConfig = config.section("telemetry")
        self.aoi = AreaOfInterest.load(config.section("aoi") if "aoi" in config else AoiConfig())
        self.progress = progress
        self.context = StageContext(telemetry, state_dir, self.source.radiometric_offset)
        self.specs = [spec for spec in registered_stages() if spec.name in config]
        if not self.specs:
            raise ConfigError(f"{config.path or 'config'}: no stage is configured; known: "
                              f"{[s.name for s in registered_stages()]}")
        self.stages: list[Stage] = []
        try:
            for spec in self.specs:
                self.stages.append(spec.build(config.section(spec.name), self.context))
        except BaseException:
            self.close()
            raise
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onboard-stage")

    @property
    def bands(self) -> tuple[str, ...]:
        """Every band any stage reads, in first-asked order."""
        seen: dict[str, None] = {}
        for stage in self.stages:
            seen.update(dict.fromkeys(stage.bands))
        return tuple(seen)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)

    # -- one acquisition ------------------------------------------------------------------------

    def score(self, acquisition: Acquisition) -> AcquisitionResult:
        scene = acquisition.scene
        grid = CoreGrid(scene.height, scene.width, self.tiling.tile, self.tiling.halo)
        started = time.perf_counter()
        timings: dict[str, float] = {"read": 0.0, "stats": 0.0}
        for stage in self.stages:
            timings[stage.name] = 0.0
        factor = max(1, math.ceil(max(scene.height, scene.width) / 1024))
        rgb_bands = [b for b in ("red", "green", "blue") if b in self.bands]
        ql_shape = (-(-scene.height // factor), -(-scene.width // factor))
        ql_rgb = np.zeros((3, *ql_shape), np.float32) if len(rgb_bands) == 3 else None
        ql_cloud = np.full(ql_shape, 255, np.uint8)
        placements = list(grid)
        scores: dict[int, TileScore] = {}
        for placement in placements:
            scores[placement.index] = self._new_score(acquisition, placement)
        self._weigh_aoi(scene, placements, scores)
        buffer: queue.Queue[_Batch | None] = queue.Queue(self.buffer.batches)
        dropped = [0]
        stop = threading.Event()
        reader = threading.Thread(
            target=self._read_batches,
            args=(acquisition, placements, scores, buffer, dropped, stop), daemon=True,
            name="onboard-reader")
        reader.start()
        done = 0
        try:
            while True:
                batch = buffer.get()
                if batch is None:
                    break
                timings["read"] += batch.read_s
                works = [w for w in batch.works if w.score.decision != Decision.FAILED]
                t0 = time.perf_counter()
                if self.telemetry_config.band_stats:
                    for work in works:
                        work.score.values.update(_band_stats_summary(work))
                timings["stats"] += time.perf_counter() - t0
                for index, stage in enumerate(self.stages):
                    alive = [w for w in works if w.score.decision != Decision.FAILED]
                    if not alive:
                        break
                    t0 = time.perf_counter()
                    self._run_stage(index, alive)
                    timings[stage.name] += time.perf_counter() - t0
                for work in batch.works:
                    self._quicklook(work, factor, ql_rgb, ql_cloud, rgb_bands)
                    self._emit_tile(work)
                done += len(batch.works)
                if self.progress:
                    self.progress(acquisition.id, done, len(placements))
        finally:
            stop.set()
            reader.join()
        wall = time.perf_counter() - started
        timings["wall"] = wall
        mpx = scene.height * scene.width / 1e6
        result = AcquisitionResult(
            acquisition.id, acquisition.place, acquisition.acquired,
            (scene.height, scene.width), [scores[p.index] for p in placements], timings, mpx,
            dropped[0], ql_rgb, ql_cloud, factor)
        self.telemetry.emit(
            "acquisition", acquisition=acquisition.id, source=scene.source_id,
            shape=[scene.height, scene.width], bands_read=list(self.bands), tiles=len(placements),
            decisions=result.counts(), dropped_by_backpressure=dropped[0],
            timings_s={k: round(v, 4) for k, v in timings.items()},
            mpx_per_s=round(mpx / wall, 3) if wall > 0 else None)
        if all(not s.usable for s in result.scores):
            self.telemetry.emit("acquisition_warning", acquisition=acquisition.id,
                                message="no tile of this acquisition is usable")
        return result

    def _new_score(self, acquisition: Acquisition, placement: TilePlacement) -> TileScore:
        core = placement.core
        row, col = core.row_off // self.tiling.tile, core.col_off // self.tiling.tile
        return TileScore(f"{acquisition.id}/{row:03d}_{col:03d}", acquisition.id,
                         (core.row_off, core.col_off, core.height, core.width))

    def _weigh_aoi(self, scene: Scene, placements: list[TilePlacement],
                   scores: dict[int, TileScore]) -> None:
        if self.aoi is None:
            return
        centres = np.array([(p.core.col_off + p.core.width / 2, p.core.row_off + p.core.height / 2)
                            for p in placements], float)
        for placement, weight in zip(placements, self.aoi.weights(scene.georef, centres),
                                     strict=True):
            scores[placement.index].aoi_weight = float(weight)

    def _read_batches(self, acquisition: Acquisition, placements: list[TilePlacement],
                      scores: dict[int, TileScore], buffer: queue.Queue[_Batch | None],
                      dropped: list[int], stop: threading.Event) -> None:
        """The reader thread: decodes batches ahead of the stages."""
        bands = self.bands
        size = self.buffer.batch
        try:
            for start in range(0, len(placements), size):
                if stop.is_set():
                    return
                t0 = time.perf_counter()
                works = [self._read_tile(acquisition, p, scores[p.index], bands)
                         for p in placements[start : start + size]]
                batch = _Batch(works, time.perf_counter() - t0)
                if self.buffer.policy == "block":
                    while not stop.is_set():
                        try:
                            buffer.put(batch, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                else:
                    try:
                        buffer.put_nowait(batch)
                    except queue.Full:
                        for work in works:
                            work.score.fail("backpressure: buffer full, tile dropped unprocessed")
                        dropped[0] += len(works)
                        self.telemetry.emit("backpressure_drop", acquisition=acquisition.id,
                                            tiles=[w.score.tile_id for w in works])
        finally:
            while True:
                try:
                    buffer.put(None, timeout=0.5)
                    return
                except queue.Full:
                    if stop.is_set():
                        return

    def _read_tile(self, acquisition: Acquisition, placement: TilePlacement, score: TileScore,
                   bands: tuple[str, ...]) -> TileWork:
        core = placement.core.relative_to(placement.window)
        try:
            frame = acquisition.scene.read(placement.window, bands)
        except SceneError as error:
            score.fail(f"read: {error}")
            self.telemetry.emit("tile_error", tile=score.tile_id, error=type(error).__name__,
                                message=str(error))
            frame = Frame(np.zeros((0, 0, 0), np.uint16), (), float("nan"))
        return TileWork(score, frame, core)

    def _run_stage(self, index: int, works: list[TileWork]) -> None:
        stage = self.stages[index]
        future = self._executor.submit(stage.process, works)
        try:
            future.result(timeout=self.buffer.deadline_s)
        except concurrent.futures.TimeoutError:
            for work in works:
                work.score.fail(f"{stage.name}: no answer within the {self.buffer.deadline_s:g} s "
                                f"deadline")
            self.telemetry.emit("stage_deadline", stage=stage.name,
                                tiles=[w.score.tile_id for w in works],
                                deadline_s=self.buffer.deadline_s)
            self._replace_stage(index)
        except Exception as error:  # an engine may raise anything; the pass goes on
            for work in works:
                work.score.fail(f"{stage.name}: {type(error).__name__}: {error}")
            self.telemetry.emit("stage_error", stage=stage.name, error=type(error).__name__,
                                message=str(error), tiles=[w.score.tile_id for w in works])

    def _replace_stage(self, index: int) -> None:
        """A hung engine keeps its thread; the stage gets a fresh engine and thread."""
        self._executor.shutdown(wait=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onboard-stage")
        spec = self.specs[index]
        self.stages[index] = spec.build(self.config.section(spec.name), self.context)
        self.telemetry.emit("stage_reset", stage=spec.name)

    def _quicklook(self, work: TileWork, factor: int, rgb: np.ndarray | None,
                   cloud: np.ndarray, rgb_bands: list[str]) -> None:
        row, col, h, w = work.score.window
        target = (slice(-(-row // factor), -(-(row + h) // factor)),
                  slice(-(-col // factor), -(-(col + w) // factor)))
        offset = ((-row) % factor, (-col) % factor)
        mask = work.layers.get("cloud")
        if mask is not None:
            cloud[target] = mask[offset[0] :: factor, offset[1] :: factor]
        if rgb is not None and work.frame.pixels.size:
            pixels = work.core_of(work.frame.select(rgb_bands).pixels)
            rgb[(slice(None), *target)] = pixels[:, offset[0] :: factor, offset[1] :: factor]

    def _emit_tile(self, work: TileWork) -> None:
        self.telemetry.emit("tile", detail=True, **work.score.to_dict(),
                            bands=_band_stats(work) if self.telemetry_config.band_stats
                            and work.frame.pixels.size else None)


def _band_stats(work: TileWork) -> dict[str, dict[str, float]]:
    """Per-band mean, std, saturated and invalid fractions over the tile's core (every second
    pixel: drift monitoring needs the distribution, not every pixel)."""
    pixels = work.core_of(work.frame.pixels)[:, ::2, ::2]
    out = {}
    for name, band in zip(work.frame.bands, pixels, strict=True):
        if np.issubdtype(band.dtype, np.floating):
            finite = np.isfinite(band)
            values = band[finite]
            invalid = 1.0 - float(finite.mean())
            saturated = 0.0
        else:
            values = band
            invalid = 0.0
            saturated = float((band == np.iinfo(band.dtype).max).mean())
        out[name] = {
            "mean": round(float(values.mean()), 2) if values.size else None,
            "std": round(float(values.std()), 2) if values.size else None,
            "saturated": round(saturated, 5),
            "invalid": round(invalid, 5),
        }
    return out


def _band_stats_summary(work: TileWork) -> dict[str, float]:
    """The one input statistic the score keeps: the fraction of pixels that cannot be trusted."""
    valid = work.frame.valid
    if valid is None:
        return {"invalid_fraction": 0.0}
    return {"invalid_fraction": float(1.0 - work.core_of(valid).mean())}


@dataclass
class RunResult:
    out: Path
    acquisitions: list[AcquisitionResult] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


__all__ = [
    "Acquisition",
    "AcquisitionResult",
    "BufferConfig",
    "Pipeline",
    "RunResult",
    "SourceConfig",
    "TelemetryConfig",
    "TilingConfig",
    "Window",
    "iter_acquisitions",
]
