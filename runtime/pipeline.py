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
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import imagecodecs
import numpy as np

from onboard.runtime.aoi import AoiConfig, AreaOfInterest
from onboard.runtime.bundle.signature import TrustPolicy, trusting
from onboard.runtime.config import Config, load_config, register_section
from onboard.runtime.downlink import cfdp as _cfdp  # also registers [cfdp]
from onboard.runtime.downlink.link import link_cost
from onboard.runtime.downlink.planner import (
    Candidate,
    ContactWindow,
    PlannerConfig,
    as_utc,
    candidates_for,
    exact_optimum,
    plan,
    repack,
)
from onboard.runtime.downlink.products import product_id, superres_band_names
from onboard.runtime.durability import (
    deferred_folder_sync,
    remove_partials,
    write_json,
    write_text,
)
from onboard.runtime.errors import ConfigError, InvalidPixelsError, OnboardError, SceneError
from onboard.runtime.frame import Frame
from onboard.runtime.inference import NODATA_CLASS
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
    # Each usable tile's layers, zstd-compressed (masks are long runs: a few KB per tile), for
    # the mask products made after the plan.
    layers: dict[str, dict[str, bytes]] = field(default_factory=dict)

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
        for message in config.warnings:  # each was a ConfigWarning when the config loaded
            telemetry.emit("config_warning", config=str(config.path or "config"),
                           message=message)
        # Every bundle a stage opens must be signed by a key the config trusts.
        self.trust = TrustPolicy.from_config(config.section("signatures"))
        self.stages: list[Stage] = []
        try:
            with trusting(self.trust):
                for spec in self.specs:
                    self.stages.append(spec.build(config.section(spec.name), self.context))
                    check = getattr(self.stages[-1], "check_tiling", None)
                    if check is not None:  # a stage on cells refuses tiles not made of them
                        check(self.tiling.tile, self.tiling.halo)
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
        layers: dict[str, dict[str, bytes]] = {}
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
        # What only the downlink and the ground need (quicklook, tile telemetry, packed layers)
        # is done by a third thread while the next batch is inferred.
        post: queue.Queue[_Batch | None] = queue.Queue(2)
        post_errors: list[BaseException] = []

        def finish_batches() -> None:
            while (finished := post.get()) is not None:
                if post_errors:
                    continue
                try:
                    for work in finished.works:
                        self._quicklook(work, factor, ql_rgb, ql_cloud, rgb_bands)
                        self._emit_tile(work)
                        if work.score.usable and work.layers:
                            layers[work.score.tile_id] = {
                                name: imagecodecs.zstd_encode(
                                    np.ascontiguousarray(layer).tobytes())
                                for name, layer in work.layers.items()}
                except BaseException as error:  # re-raised on the pipeline's own thread
                    post_errors.append(error)

        finisher = threading.Thread(target=finish_batches, daemon=True, name="onboard-post")
        finisher.start()
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
                post.put(batch)
                done += len(batch.works)
                if self.progress:
                    self.progress(acquisition.id, done, len(placements))
        finally:
            stop.set()
            reader.join()
            post.put(None)
            finisher.join()
        if post_errors:
            raise post_errors[0]
        for stage in self.stages:  # once per acquisition: the change stage commits its store
            end = getattr(stage, "end_acquisition", None)
            if end is not None:
                end(acquisition.id)
        wall = time.perf_counter() - started
        timings["wall"] = wall
        mpx = scene.height * scene.width / 1e6
        result = AcquisitionResult(
            acquisition.id, acquisition.place, acquisition.acquired,
            (scene.height, scene.width), [scores[p.index] for p in placements], timings, mpx,
            dropped[0], ql_rgb, ql_cloud, factor, layers)
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
            _close_buffer(buffer, stop)

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
        with trusting(self.trust):
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
        if self.telemetry.detail_budget_spent:
            self.telemetry.emit("tile", detail=True)  # counted, not written: skip the stats
            return
        self.telemetry.emit("tile", detail=True, **work.score.to_dict(),
                            bands=_band_stats(work) if self.telemetry_config.band_stats
                            and work.frame.pixels.size else None)


def _close_buffer(buffer: queue.Queue[_Batch | None], stop: threading.Event) -> None:
    """Tell the consumer the stream ended, unless it already stopped listening."""
    while not stop.is_set():
        try:
            buffer.put(None, timeout=0.5)
            return
        except queue.Full:
            continue


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
            "mean": round(float(values.mean(dtype=np.float64)), 2) if values.size else None,
            "std": round(float(values.std(dtype=np.float64)), 2) if values.size else None,
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


# -- a whole run: passes, plan, products, queue, link ---------------------------------------------

SAMPLE_CONFIG = Path(__file__).parent / "sample" / "onboard.toml"


@dataclass(frozen=True)
class StorageConfig:
    """``[storage]``: what the run may keep onboard (products, queue, telemetry)."""

    budget_bytes: int = 2 * 2**30

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ConfigError(f"storage budget_bytes must be positive, got {self.budget_bytes}")


@dataclass(frozen=True)
class LinkConfig:
    """``[link]``: where the queue drains during each contact window. ``folder``: a receiver
    folder standing in for the ground station (relative to the output folder)."""

    kind: Literal["none", "folder", "cfdp"] = "none"  # cfdp: CFDP Class 2, see [cfdp]
    folder: str = "ground"


register_section("storage", StorageConfig, doc="onboard storage budget")
register_section("link", LinkConfig, doc="the transmitter the queue drains into")
register_section("passes", ContactWindow, many=True, doc="contact windows")


@dataclass
class _Pooled:
    """A scored tile waiting for a contact window, with what its products need."""

    score: TileScore
    acquisition: Acquisition
    layers: dict[str, bytes]  # name -> zstd-compressed (h, w) uint8


@dataclass
class RunResult:
    out: Path
    acquisitions: list[AcquisitionResult] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    fatal: bool = False

    def summary_lines(self) -> list[str]:
        s = self.summary
        lines = [f"output: {self.out}"]
        for acq in s.get("acquisitions", []):
            d = acq["decisions"]
            lines.append(f"  {acq['id']}: {acq['tiles']} tiles, keep {d['keep']}, demote "
                         f"{d['demote']}, drop {d['drop']}, failed {d['failed']}, "
                         f"{acq['mpx_per_s']:.1f} Mpx/s")
        for error in s.get("errors", []):
            lines.append(f"  skipped {error['source']}: {error['message']}")
        plan = s.get("plan", {})
        for i, window in enumerate(plan.get("windows", [])):
            lines.append(f"  pass {i} ({window['start']}): planned {window['planned_bytes']} of "
                         f"{window['budget_bytes']} B, {window['chosen']} products "
                         f"{window['chosen_kinds']}")
        if plan:
            optimum = plan.get("exact_optimum")
            estimated = plan["planner_value_on_estimates"]
            lines.append(f"  value captured {plan['value']:.3f}"
                         + (f" (planner {estimated / optimum:.1%} of the exact optimum of the "
                            f"same candidates)" if optimum else "")
                         + f"; downlink everything: {plan['downlink_everything_value']:.3f}")
        link = s.get("link")
        if link:
            lines.append(f"  sent {link['sent']} products ({link['bytes_sent']} B), "
                         f"acknowledged {link['acknowledged']}, queued {link['queued']}")
        lines.append(f"  {s.get('input_mpx', 0):.2f} Mpx in {s.get('wall_s', 0):.2f} s: "
                     f"{s.get('mpx_per_s', 0):.2f} Mpx/s end to end")
        lines.append(f"report: {self.out / 'report.md'}")
        return lines


def _default_window(now: datetime) -> ContactWindow:
    """With no ``[[passes]]``: one ten-minute pass at 1 Mbit/s right after the last
    acquisition."""
    return ContactWindow(start=now, duration_s=600.0, bitrate_bps=1e6)


class PassRunner:
    """Runs a config's acquisitions and contact windows in time order into ``out``."""

    def __init__(self, config: Config, out: Path,
                 progress: Callable[[str, int, int], None] | None = None,
                 scored: Mapping[str, AcquisitionResult] | None = None,
                 skipped: Mapping[str, str] | None = None) -> None:
        """``scored``: acquisitions already scored elsewhere (a replay's workers), by id, used
        instead of scoring them here; an acquisition in ``skipped`` (id -> why) is reported as
        one that could not be used."""
        from onboard.runtime.downlink.products import ProductMaker
        from onboard.runtime.downlink.queue import DownlinkQueue

        self.config = config
        self.out = out
        self.started = utc_now()
        for folder in (out, out / "products"):
            folder.mkdir(parents=True, exist_ok=True)
            remove_partials(folder)  # what a killed run left half-written
        tconf: TelemetryConfig = config.section("telemetry")
        self.telemetry = Telemetry(tconf.path or out / "telemetry.jsonl", tconf.budget_bytes,
                                   keep=False)
        self.telemetry.new_pass()
        self.planner_config: PlannerConfig = config.section("planner")
        self.products_config = config.section("products")
        self.storage: StorageConfig = config.section("storage")
        self.maker = ProductMaker(self.products_config)
        # Super-resolution costs a model run per product: only made for tiles the plan chose.
        self.superres = None
        if "superres" in self.products_config.kinds:
            if "superres" not in config:
                raise ConfigError(f"{config.path or 'config'}: products.kinds names superres "
                                  f"but there is no [superres] section with its bundle")
            if "superres" not in self.planner_config.utility:
                raise ConfigError(f"{config.path or 'config'}: products.kinds names superres "
                                  f"but [planner] utility gives it no value")
            from onboard.runtime.stages.superres import LazySuperResolver

            self.superres = LazySuperResolver(config.section("superres"), self.telemetry)
            # Planned at what the bundle makes (its manifest, read now; the engine waits for
            # the first superres product): a [products] section stating other bands or another
            # scale factor is refused here, before anything is scored.
            superres_output = self.superres.output
            superres_output.check(self.products_config, str(config.path or "config"))
            self.maker = ProductMaker(self.products_config, superres=superres_output)
        self.queue = DownlinkQueue(out / "queue.sqlite")
        self.windows = sorted(config.section("passes"), key=lambda w: as_utc(w.start))
        self.pipeline = Pipeline(config, self.telemetry, out / "state", progress)
        self.bundle_ids = [f"{d.get('bundle', '?')}@{d.get('version', '?')}"
                           for d in (s.describe() for s in self.pipeline.stages)]
        self.scored = dict(scored or {})
        self.skipped = dict(skipped or {})
        self.pool: dict[str, _Pooled] = {}
        self.result = RunResult(out)
        self.window_summaries: list[dict[str, Any]] = []
        self.chosen: dict[str, str] = {}  # tile id -> product id
        self.products_bytes = 0
        self.refused_for_space = 0
        self.repacked = 0
        self.all_candidates: list[Candidate] = []
        self.link_report = {"sent": 0, "bytes_sent": 0, "acknowledged": 0}
        link: LinkConfig = config.section("link")
        self.transmitter = None
        if link.kind == "folder":
            from onboard.runtime.downlink.link import FolderTransmitter, Receiver

            folder = Path(link.folder)
            self.transmitter = FolderTransmitter(Receiver(folder if folder.is_absolute()
                                                          else out / folder))
        elif link.kind == "cfdp":
            self.transmitter = _cfdp.open_transmitter(config, out, self.telemetry)

    def close(self, quiet: bool = False) -> None:
        closers = [self.pipeline.close, self.queue.close, self.telemetry.close]
        if self.superres is not None:
            closers.insert(0, self.superres.close)
        for close in closers:
            try:
                close()
            except OnboardError:
                if not quiet:
                    raise

    def run(self) -> RunResult:
        started = time.perf_counter()
        self.telemetry.emit("run_start", config=str(self.config.path), out=str(self.out),
                            stages=[s.describe() for s in self.pipeline.stages],
                            windows=[w.to_dict() for w in self.windows] or "default")
        pending = list(self.windows)
        errors = self.result.errors
        acquisitions = iter_acquisitions(self.pipeline.source, self.telemetry, errors)
        if self.pipeline.source.kind != "spool":
            # Files on storage are all there: take them in acquisition time across places, so a
            # contact window is planned only after every scene acquired before it (undated
            # ones first, in source order). A spool delivers in arrival order as it fills.
            acquisitions = iter(sorted(acquisitions, key=lambda a: (
                a.acquired is not None, as_utc(a.acquired) if a.acquired else self.started)))
        for acquisition in acquisitions:
            when = as_utc(acquisition.acquired) if acquisition.acquired else None
            while pending and when is not None and as_utc(pending[0].start) <= when:
                self._contact(pending.pop(0))
            self._score(acquisition)
        while pending:
            self._contact(pending.pop(0))
        if not self.windows:
            dated = [as_utc(r.acquired) for r in self.result.acquisitions if r.acquired]
            self.windows = [_default_window(max(dated) if dated else self.started)]
            self._contact(self.windows[0])
        wall = time.perf_counter() - started
        self._finish(wall)
        return self.result

    def _score(self, acquisition: Acquisition) -> None:
        if acquisition.id in self.skipped or (self.scored and acquisition.id not in self.scored):
            record = {"source": acquisition.scene.source_id, "error": "ReplaySkipped",
                      "message": f"{acquisition.id}: "
                                 f"{self.skipped.get(acquisition.id, 'not scored')}"}
            self.result.errors.append(record)
            self.telemetry.emit("acquisition_error", **record)
            return
        result = self.scored.get(acquisition.id) or self.pipeline.score(acquisition)
        self.result.acquisitions.append(result)
        for score in result.scores:
            self.pool[score.tile_id] = _Pooled(score, acquisition,
                                               result.layers.get(score.tile_id, {}))
        write_text(self.out / f"scores-{acquisition.id}.jsonl",
                   "".join(json.dumps(s.to_dict()) + "\n" for s in result.scores))
        if acquisition.done is not None:
            acquisition.done({"acquisition": acquisition.id, "tiles": len(result.scores)})

    # -- one contact window ---------------------------------------------------------------------

    def _candidates(self, now: datetime) -> list[Candidate]:
        bands_of: dict[str, tuple[str, ...]] = {}
        out = []
        for tile_id, pooled in self.pool.items():
            if tile_id in self.chosen or not pooled.score.usable:
                continue
            scene = pooled.acquisition.scene
            bands = bands_of.setdefault(pooled.acquisition.id, tuple(scene.bands))
            _, _, h, w = pooled.score.window
            sizes = {}
            for kind in self.products_config.kinds:
                if kind == "mask" and not pooled.layers:
                    continue
                names = tuple(pooled.layers) if kind == "mask" else (
                    self.products_config.thumbnail_bands if kind == "thumbnail" else
                    superres_band_names(self.maker.superres, bands) if kind == "superres"
                    else bands)
                # Planned as what it spends of the pass: with the link's own overhead.
                sizes[kind] = link_cost(self.transmitter, self.maker.sizes.estimate(
                    kind, (h, w), list(names), self.products_config.thumbnail_scale))
            for candidate in candidates_for(pooled.score, sizes, now, pooled.acquisition.acquired,
                                            self.planner_config):
                if candidate.value > 1e-9:  # aged past any use: not worth a byte or a row
                    out.append(replace(candidate,
                                       product_id=product_id(tile_id, candidate.kind)))
        return out

    def _contact(self, window: ContactWindow) -> None:
        index = len(self.window_summaries)
        now = as_utc(window.start)
        telemetry_link = None
        if self.transmitter is not None:
            start_pass = getattr(self.transmitter, "start_pass", None)
            if start_pass is not None:  # a link with its own notion of the pass (CFDP)
                start_pass(window.capacity_bytes)
            send_telemetry = getattr(self.transmitter, "send_telemetry_file", None)
            if send_telemetry is not None:
                # Telemetry as space packets first at each contact, within its own budget per
                # pass and the window's: what was written since the last contact (this pass's
                # tiles, the last pass's downlink records). The products are planned in what
                # it leaves of the window.
                self.telemetry.sync()
                telemetry_link = send_telemetry(
                    self.telemetry.path, min(self.telemetry.budget_bytes, window.budget_bytes))
                window = replace(window, reserved_bytes=int(telemetry_link.get("bytes", 0)))
        candidates = self._candidates(now)
        self.all_candidates.extend(candidates)
        chosen_plan = plan(candidates, [window], self.planner_config)
        # The planner against the exact optimum of the same candidates, both on the estimates.
        estimated_value = chosen_plan.value
        made: dict[str, Any] = {}
        # Make what is chosen, plan again on the real sizes, make what that adds: the plan
        # converges in a round or two because the size model learns from every product made.
        for _ in range(4):
            for candidate in chosen_plan.chosen():
                if candidate.product_id not in made:
                    product = self._make(candidate)
                    if product is not None:
                        made[candidate.product_id] = product
            chosen_plan = repack(chosen_plan, {p: link_cost(self.transmitter, m.size)
                                               for p, m in made.items()})
            if all(c.product_id in made for c in chosen_plan.chosen()):
                break
        # The plan of record chooses among the products that exist, at their real sizes, so
        # every chosen row of the audit is a file on board and the budget holds exactly.
        before = len(chosen_plan.chosen())
        made_candidates = [c for c in chosen_plan.candidates if c.product_id in made]
        chosen_plan = plan(made_candidates, [window], self.planner_config,
                           baseline=[c for c in chosen_plan.candidates
                                     if c.kind == self.planner_config.baseline_kind])
        final = chosen_plan.chosen()
        self.repacked += max(before - len(final), 0)
        unmade = [c for c in candidates if c.product_id not in made]
        optimum = exact_optimum(candidates, window.budget_bytes, time_limit_s=20.0)
        write_text(self.out / f"plan-{index}.jsonl", "".join(
            json.dumps(row, separators=(",", ":")) + "\n" for row in chosen_plan.rows()
            + [{"tile_id": c.tile_id, "acquisition": c.acquisition, "kind": c.kind,
                "product_id": c.product_id, "bytes": c.nbytes, "estimated": True,
                "value": round(c.value, 9), "value_per_byte": c.value_per_byte,
                "chosen": None, "value_reason": c.reason,
                "why": "not chosen: worth less per byte than the products planned (estimate)"}
               for c in unmade]))
        kinds: dict[str, int] = {}
        planned = 0
        stored: list[tuple[Candidate, Any, Path]] = []
        # Every product and Item is on disk (files and folder synced once) before the queue
        # names any of them; then the pass's products are queued in one transaction.
        with deferred_folder_sync():
            for candidate in final:
                product = made[candidate.product_id]
                path = self._store(candidate, product, index)
                if path is not None:
                    stored.append((candidate, product, path))
        with self.queue.batch():
            for candidate, product, path in stored:
                self.chosen[candidate.tile_id] = candidate.product_id
                kinds[candidate.kind] = kinds.get(candidate.kind, 0) + 1
                planned += product.size
                self.queue.enqueue(candidate.product_id, path,
                                   priority=candidate.value_per_byte, window=index,
                                   sha256=product.sha256,
                                   meta={"tile": candidate.tile_id, "kind": candidate.kind,
                                         "value": candidate.value})
        summary = {"start": now.isoformat(), "budget_bytes": window.budget_bytes,
                   "planned_bytes": planned, "chosen": sum(kinds.values()),
                   "chosen_kinds": kinds, "candidates": len(candidates),
                   "candidate_tiles": len({c.tile_id for c in candidates}),
                   "value": sum(c.value for c in final),
                   "planner_value_on_estimates": estimated_value, "exact_optimum": optimum,
                   "downlink_everything_value": chosen_plan.baseline_value,
                   "downlink_everything_bytes": chosen_plan.baseline_bytes}
        if telemetry_link is not None:
            summary["telemetry_link"] = telemetry_link
        if self.transmitter is not None:
            from onboard.runtime.downlink.link import drain

            report = drain(self.queue, self.transmitter, window.budget_bytes, self.telemetry)
            summary["link"] = report.to_dict()
            self.link_report["sent"] += len(report.acknowledged) + len(report.not_acknowledged)
            self.link_report["bytes_sent"] += report.sent_bytes
            self.link_report["acknowledged"] += len(report.acknowledged)
        self.window_summaries.append(summary)
        self.telemetry.emit("pass", window=index, **summary)

    def _make(self, candidate: Candidate) -> Any:
        pooled = self.pool[candidate.tile_id]
        row, col, h, w = pooled.score.window
        try:
            if candidate.kind == "superres" and self.superres is not None:
                return self.superres.make_product(self.maker, pooled.acquisition.scene,
                                                  Window(row, col, h, w))
            frame = pooled.acquisition.scene.read(Window(row, col, h, w))
            layers = {name: np.frombuffer(imagecodecs.zstd_decode(blob), np.uint8).reshape(h, w)
                      for name, blob in pooled.layers.items()}
            return self.maker.make(candidate.kind, frame, layers=layers)
        except OnboardError as error:
            pooled.score.fail(f"product {candidate.kind}: {error}")
            self.telemetry.emit("product_error", product=candidate.product_id,
                                error=type(error).__name__, message=str(error))
            return None

    def _store(self, candidate: Candidate, product: Any, window: int) -> Path | None:
        """Write a product and its STAC Item, within the storage budget."""
        from onboard.runtime.downlink.stac import make_item

        pooled = self.pool[candidate.tile_id]
        path = self.out / "products" / f"{candidate.product_id}{product.suffix}"
        used = self.products_bytes + self.queue_bytes() + self.telemetry.bytes_written
        if used + product.size > self.storage.budget_bytes:
            self.refused_for_space += 1
            self.telemetry.emit("storage_full", product=candidate.product_id,
                                bytes=product.size, used=used,
                                budget=self.storage.budget_bytes)
            return None
        product.write(path)
        item = make_item(product, pooled.score, item_id=candidate.product_id, href=path.name,
                         acquired=pooled.acquisition.acquired, priority=candidate.value,
                         bundles=self.bundle_ids,
                         extra_properties={"onboard:pass": window,
                                           "onboard:value_per_byte": candidate.value_per_byte})
        write_json(path.with_suffix(".json"), item)
        self.products_bytes += product.size + path.with_suffix(".json").stat().st_size
        return path

    def queue_bytes(self) -> int:
        db = self.out / "queue.sqlite"
        return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())

    # -- after the last window ------------------------------------------------------------------

    def _finish(self, wall: float) -> None:
        from onboard.runtime.downlink.quicklook import write_pass_quicklook
        from onboard.runtime.downlink.report import write_report

        acquisitions = []
        timings: dict[str, float] = {}
        for result in self.result.acquisitions:
            chosen = {tid for tid in self.chosen if tid.startswith(result.acquisition + "/")}
            quicklook = None
            if result.quicklook_cloud is not None:
                quicklook = f"quicklook-{result.acquisition}.png"
                f = result.quicklook_factor
                rgb = result.quicklook_rgb if result.quicklook_rgb is not None else np.zeros(
                    (3, *result.quicklook_cloud.shape), np.float32)
                scaled = [replace(s, window=(s.window[0] // f, s.window[1] // f,
                                             -(-s.window[2] // f), -(-s.window[3] // f)))
                          for s in result.scores] if f > 1 else result.scores
                write_pass_quicklook(self.out / quicklook, rgb, result.quicklook_cloud, scaled,
                                     chosen, title=result.acquisition)
            for key, value in result.timings_s.items():
                timings[key] = timings.get(key, 0.0) + value
            acquisitions.append({"id": result.acquisition, "tiles": len(result.scores),
                                 "decisions": result.counts(), "shape": list(result.shape),
                                 "mpx_per_s": result.input_mpx / max(result.timings_s["wall"],
                                                                     1e-9),
                                 "dropped_by_backpressure": result.dropped_by_backpressure,
                                 "chosen": len(chosen), "quicklook": quicklook})
        input_mpx = sum(r.input_mpx for r in self.result.acquisitions)
        self.queue.checkpoint()
        counts = self.queue.counts()
        candidates = self.all_candidates
        total_value = sum(w["value"] for w in self.window_summaries)
        optima = [w["exact_optimum"] for w in self.window_summaries]
        summary = {
            "name": str(self.config.path.name if self.config.path else "onboard run"),
            "started": self.started.isoformat(), "wall_s": wall, "input_mpx": input_mpx,
            "mpx_per_s": input_mpx / wall if wall > 0 else 0.0,
            "acquisitions": acquisitions, "errors": self.result.errors,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "plan": {"windows": self.window_summaries, "candidates": len(candidates),
                     "planner_value_on_estimates": sum(w["planner_value_on_estimates"]
                                                       for w in self.window_summaries),
                     "candidate_tiles": len({c.tile_id for c in candidates}),
                     "chosen": len(self.chosen),
                     "chosen_kinds": _count(w["chosen_kinds"] for w in self.window_summaries),
                     "value": total_value,
                     "exact_optimum": (sum(optima) if optima and None not in optima
                                       else None),
                     "downlink_everything_value": sum(w["downlink_everything_value"]
                                                      for w in self.window_summaries),
                     "repacked": self.repacked},
            "storage": {"budget_bytes": self.storage.budget_bytes,
                        "products_bytes": self.products_bytes,
                        "queue_bytes": self.queue_bytes(),
                        "telemetry_bytes": self.telemetry.bytes_written,
                        "used_bytes": self.products_bytes + self.queue_bytes()
                        + self.telemetry.bytes_written,
                        "refused": self.refused_for_space},
            "queue": counts,
            "telemetry": {"bytes": self.telemetry.bytes_written,
                          "budget_bytes": self.telemetry.budget_bytes,
                          "dropped": self.telemetry.dropped},
        }
        if self.transmitter is not None:
            summary["link"] = {**self.link_report, "queued": counts.get("queued", 0)}
        self.telemetry.emit("run_done", **{k: v for k, v in summary.items()
                                           if k not in ("acquisitions",)})
        self.telemetry.sync()
        write_json(self.out / "summary.json", summary)
        write_report(self.out / "report.md", summary)
        self.result.summary = summary


def _count(dicts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for key, value in d.items():
            out[key] = out.get(key, 0) + value
    return out


def run(config_path: str | Path, out: str | Path,
        progress: Callable[[str, int, int], None] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None) -> RunResult:
    """``onboard run``: every acquisition of the config's source through the stages, each
    contact window planned, its products made, queued and (with a link) sent. ``overrides``
    replace config keys (section -> key -> value)."""
    config = load_config(config_path, overrides)
    runner = PassRunner(config, Path(out), progress)
    try:
        result = runner.run()
    except BaseException:
        runner.close(quiet=True)  # the error that stopped the run is the one to report
        raise
    runner.close()
    return result


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


# -- one bundle over one scene: `onboard predict` -------------------------------------------------

PNG_EDGE = 4096  # the quick-look's longest side, in pixels


@dataclass(frozen=True)
class PredictRequest:
    """``onboard predict``: one bundle over one scene, into one GeoTIFF (and a PNG)."""

    bundle: Path
    input: Path
    out: Path
    bands: list[str] | None = None  # an anonymous GeoTIFF's band names, in file order
    scale: float | None = None  # replaces the bundle's DN -> input scale for every band
    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    batch: int = 4
    overlap: int = 16
    png: bool = True
    telemetry: Path | None = None
    trust: list[Path] = field(default_factory=list)  # public keys the bundle must be signed by


def predict(request: PredictRequest, progress: Callable[[int, int], None] | None = None,
            warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``request.bundle`` over ``request.input`` tile by tile with overlap, stitched without
    seams, and write the class mask (255 = no data) or values with the input's georeferencing
    (at the output's pixel size); returns the summary the CLI prints."""
    from onboard.runtime.downlink.products import write_geotiff
    from onboard.runtime.downlink.quicklook import write_mask_png
    from onboard.runtime.engines import open_engine
    from onboard.runtime.georef import Georef
    from onboard.runtime.inference import Predictor, check_overlap
    from onboard.runtime.sources.oscd import open_scene

    warn = warn or (lambda message: None)
    telemetry = Telemetry(request.telemetry) if request.telemetry else Telemetry()
    # A band folder names its bands by file; a GeoTIFF may need its band names given.
    scene = (open_scene(request.input) if request.input.is_dir()
             else open_scene(request.input, request.bands))
    engine = open_engine(request.bundle, request.backend, request.device,
                         threads=request.threads, batch_size=request.batch, telemetry=telemetry,
                         trust=list(request.trust) or None)
    try:
        check_overlap(request.overlap, engine.input_spec.tile_size, "--overlap")
        predictor = Predictor(engine, scale=request.scale)
        errors: list[SceneError] = []
        spec = engine.output_spec
        classes = spec.kind == "classes"
        streamed = None
        if classes and spec.scale_factor == 1:
            # Streamed: the mask is kept as compressed pieces while the stats and the preview
            # are taken, then written once its verdict is known (it goes in the file).
            stitcher, pieces = predictor.stream_classes(scene, request.overlap, request.batch,
                                                        errors, progress)
            streamed = _StreamedMask(scene.height, scene.width, stitcher.block,
                                     max(1, -(-max(scene.height, scene.width) // PNG_EDGE)))
            streamed.take(pieces)
            product: Any = streamed.pieces()
            counts = streamed.counts
        else:
            product = predictor.predict_scene(scene, request.overlap, request.batch, errors,
                                              progress)
            counts = _class_counts(product[0]) if product.dtype == np.uint8 else None
        for error in errors:
            telemetry.emit("tile_error", error=type(error).__name__, message=str(error))
            warn(str(error))
        nodata = _check_prediction(predictor, product, counts, request, telemetry, warn)
        georef = scene.georef
        if georef is not None and spec.scale_factor != 1:
            georef = Georef(georef.crs, georef.transform.scaled(spec.scale_factor))
        names = ["class"] if classes else [f"value{i}" for i in range(product.shape[0])]
        shape = dict(shape=(1, scene.height, scene.width), dtype=np.uint8,
                     tile=streamed.block) if streamed is not None else {}
        write_geotiff(request.out, product, names, georef, acquired=scene.acquired,
                      source_id=str(request.input),
                      extra={"bundle": engine.manifest.name,
                             "bundle_version": engine.manifest.version,
                             "bundle_sha256": engine.bundle.sha256,
                             "classes": {str(k): v for k, v in spec.classes.items()},
                             "nodata_class": NODATA_CLASS if classes else None,
                             "nodata_fraction": round(nodata, 6),
                             "nonfinite_output_tiles": predictor.checked.tiles}, **shape)
        summary: dict[str, Any] = {"out": str(request.out), "tiles_failed": len(errors),
                                   "nodata_fraction": round(nodata, 4),
                                   "nonfinite_output_tiles": predictor.checked.tiles}
        if classes and counts is not None:
            known = int(counts.sum() - counts[NODATA_CLASS])
            for value, name in sorted(spec.classes.items()):
                fraction = float(counts[value]) / known if known else 0.0
                summary[f"{name}_fraction"] = round(fraction, 4)
            if request.png:
                # A quick-look, not the product: every n-th pixel, at most PNG_EDGE px a side
                # (the full RGB of a 32 768² mask alone is 3 GiB).
                if streamed is not None:
                    preview = streamed.preview
                else:
                    step = max(1, -(-max(product.shape[1:]) // PNG_EDGE))
                    preview = product[0][::step, ::step]
                summary["png"] = str(write_mask_png(request.out.with_suffix(".png"), preview))
        else:
            summary["min"] = float(np.nanmin(product))
            summary["max"] = float(np.nanmax(product))
        telemetry.emit("predict_done", **summary)
        return summary
    finally:
        engine.close()
        telemetry.close()


def _class_counts(mask: np.ndarray) -> np.ndarray:
    """Pixels per class value (256 bins), a band of rows at a time: bincount widens its input
    to intp, and a mask-sized temporary at 32 768² would be another 8 GiB."""
    counts = np.zeros(256, np.int64)
    rows = max(1, 2**22 // max(1, mask.shape[1]))
    for r in range(0, mask.shape[0], rows):
        counts += np.bincount(mask[r:r + rows].reshape(-1), minlength=256)
    return counts


class _StreamedMask:
    """A class mask streamed in row-major ``block`` × ``block`` pieces, kept zstd-compressed
    (a 32 768² mask is 1 GiB raw and a few MB so), with its class counts and an every
    ``step``-th pixel preview taken as the pieces pass."""

    def __init__(self, height: int, width: int, block: int, step: int) -> None:
        self.height, self.width, self.block, self.step = height, width, block, step
        self.counts = np.zeros(256, np.int64)
        self.preview = np.full((-(-height // step), -(-width // step)), NODATA_CLASS, np.uint8)
        self.blobs: list[bytes] = []

    def take(self, pieces: Iterable[np.ndarray]) -> None:
        columns = -(-self.width // self.block)
        for i, piece in enumerate(pieces):
            r0, c0 = (i // columns) * self.block, (i % columns) * self.block
            inside = piece[: self.height - r0, : self.width - c0]  # not the padding
            self.counts += np.bincount(inside.reshape(-1), minlength=256)
            rows, cols = (-r0) % self.step, (-c0) % self.step
            sample = inside[rows :: self.step, cols :: self.step]
            top, left = (r0 + rows) // self.step, (c0 + cols) // self.step
            self.preview[top : top + sample.shape[0], left : left + sample.shape[1]] = sample
            self.blobs.append(imagecodecs.zstd_encode(np.ascontiguousarray(piece), 3))

    def pieces(self) -> Iterator[np.ndarray]:
        shape = (self.block, self.block)
        for blob in self.blobs:
            yield np.frombuffer(imagecodecs.zstd_decode(blob), np.uint8).reshape(shape)


def _check_prediction(predictor: Any, product: Any, counts: np.ndarray | None,
                      request: PredictRequest, telemetry: Telemetry,
                      warn: Callable[[str], None]) -> float:
    """The product's no-data fraction (from its class ``counts`` for a mask); warns of
    non-finite model output and refuses a product with no usable pixel at all (a mask of
    nothing but no data is not an answer)."""
    if counts is not None:
        usable = int(counts.sum() - counts[NODATA_CLASS])
        nodata = 1.0 - usable / max(1, int(counts.sum()))
    else:
        usable = int(np.isfinite(product).all(axis=0).sum())
        nodata = 1.0 - usable / max(1, product[0].size)
    checked = predictor.checked
    if checked.tiles:
        telemetry.emit("nonfinite_output", tiles=checked.tiles, pixels=checked.pixels,
                       tile_ids=checked.tile_ids, nodata_fraction=round(nodata, 6))
        warn(f"the model's output was not finite (NaN or infinite) for {checked.pixels} pixels "
             f"in {checked.tiles} tile(s); they are no data in the product")
    if not usable:
        telemetry.emit("predict_refused", reason="no usable pixel", nodata_fraction=1.0,
                       nonfinite_output_tiles=checked.tiles)
        why = "the model's output was not finite" if checked.tiles else \
            "every input pixel is NaN, infinite, out of range, no data or saturated"
        raise InvalidPixelsError(request.input, f"no usable pixel: {why}; nothing written to "
                                             f"{request.out}")
    return nodata
