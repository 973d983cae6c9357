"""Ground-side replay: the flight pipeline over an archive, scored on Dask.

``onboard replay CONFIG ARCHIVE... [--scheduler ADDRESS] --out DIR`` answers "what would the
flight software have downlinked from these months of archive, at what cost?" before a config, a
threshold or a bundle is uplinked. It runs *the* flight code: every scene goes through
:class:`~onboard.runtime.pipeline.Pipeline` (the same stages, bundles and reference store as
``onboard run``) and every contact window through :class:`~onboard.runtime.pipeline.PassRunner`
(the same planner, products, STAC Items, queue and link). Nothing here scores a tile or plans a
byte; this module only decides where and in which order the pipeline runs.

**Why this lives in ``runtime/``.** It composes the pipeline and nothing else, and the flight
runtime must never load Dask: ``dask``, ``distributed`` and ``pyarrow`` (the ``[replay]`` extra)
are imported inside the functions that need them, so importing ``onboard.runtime`` (or this
module) on board costs nothing and needs none of them (a test checks the import graph).

**Order and partitions.** The archive is put in time order (each entry by its first
acquisition; an OSCD city folder yields its two dates in order), and that order is the one a
sequential ``onboard run`` with ``paths = ARCHIVE`` sees. The reference store carries state from
pass to pass, keyed by geographic cell, so scenes whose footprints (WGS84 bounding boxes)
overlap form one *partition*: one store folder (``DIR/state/<partition>``), its scenes scored in
that order by one Dask task, while partitions run in parallel. Disjoint footprints share no cell,
so each partition's store holds exactly what one store of the sequential run would hold for its
places. Then every contact window is planned once, on this machine, over the scores of all
places in the sequential order, so the plan is the sequential run's plan.

**Faults.** Each scene's result is written through :mod:`~onboard.runtime.durability` as soon as
it is scored (``DIR/scenes/<id>/result.pkl``), and each attempt is journalled before it starts.
A partition task whose worker dies is submitted again and skips what is written; the scene that
was in flight is tried a second time, and a scene that fails twice (its worker died, or it
raised) is reported and skipped, its partition going on without it. The attempt count lives in
the journal, not in the scheduler, so "retried once" holds whatever the scheduler's own
``allowed-failures``. A replay stopped and started again with the same ``--out`` resumes: the
written scenes are not scored again (an attempt cut off by the stop is not counted against its
scene), and the cheap planning step is redone from the scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.config import Config, load_config
from onboard.runtime.downlink.planner import as_utc
from onboard.runtime.durability import (
    Journal,
    atomic_path,
    remove_partials,
    write_bytes,
    write_json,
    write_text,
)
from onboard.runtime.errors import ConfigError, StorageError
from onboard.runtime.pipeline import (
    Acquisition,
    AcquisitionResult,
    PassRunner,
    Pipeline,
    RunResult,
    SourceConfig,
    iter_acquisitions,
)
from onboard.runtime.telemetry import Telemetry

FORMAT = "onboard-replay/1"
MAX_ATTEMPTS = 2  # a scene is tried once and retried once
UNDATED = datetime.max.replace(tzinfo=timezone.utc)


# -- the archive ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneRef:
    """One acquisition of the archive, as the driver plans the work (no pixels)."""

    id: str
    place: str
    path: str  # the archive entry it comes from
    acquired: datetime | None
    bounds: tuple[float, float, float, float] | None  # WGS84 (west, south, east, north)
    mpx: float


@dataclass(frozen=True)
class Partition:
    """Scenes that may share reference-store cells: one store, scored in order by one task."""

    name: str
    scenes: tuple[SceneRef, ...]

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.path for s in self.scenes))

    @property
    def mpx(self) -> float:
        return sum(s.mpx for s in self.scenes)


@dataclass(frozen=True)
class Archive:
    """The archive in replay order and the config that runs it (``[source]`` pointed at it)."""

    config: Config
    kind: str
    paths: tuple[Path, ...]
    scenes: tuple[SceneRef, ...]
    errors: tuple[dict[str, Any], ...]


def archive_kind(paths: Sequence[Path]) -> str:
    """``oscd`` for folders (city folders or single dates), ``geotiff`` for files."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"archive: not found: {missing}")
    folders = [p.is_dir() for p in paths]
    if all(folders):
        return "oscd"
    if not any(folders):
        return "geotiff"
    raise ConfigError(f"archive mixes GeoTIFF files and OSCD folders ({[str(p) for p in paths]}):"
                      f" a run has one source kind, replay one kind at a time")


def replay_config(config: Config, kind: str, paths: Sequence[Path]) -> Config:
    """``config`` with its ``[source]`` reading ``paths``: what ``onboard run`` would be given.

    A stage section that names its own store folder (``[change] store``) is pointed back at
    the run's state folder: each partition gets its own store there, and a replay must never
    write into the store a flight config names.
    """
    source: SourceConfig = config.section("source")
    values = dict(config.values)
    values["source"] = replace(source, kind=kind, paths=tuple(Path(p) for p in paths))
    for name, section in values.items():
        if is_dataclass(section) and not isinstance(section, type) \
                and "store" in {f.name for f in fields(section)} and section.store is not None:
            values[name] = replace(section, store=None)
    return Config(config.path, values)


def _bounds(acquisition: Acquisition) -> tuple[float, float, float, float] | None:
    from onboard.runtime.georef import to_lonlat

    scene = acquisition.scene
    if scene.georef is None or scene.georef.crs is None:
        return None
    # Edge points as well as corners: a UTM square's WGS84 outline is not a rectangle.
    steps = np.linspace(0.0, 1.0, 9)
    cols = np.concatenate([steps, steps, np.zeros(9), np.ones(9)]) * scene.width
    rows = np.concatenate([np.zeros(9), np.ones(9), steps, steps]) * scene.height
    t = scene.georef.transform
    xs, ys = t.a * cols + t.b * rows + t.c, t.d * cols + t.e * rows + t.f
    lon, lat = to_lonlat(scene.georef.crs, xs, ys)
    return (float(np.min(lon)), float(np.min(lat)), float(np.max(lon)), float(np.max(lat)))


def discover(config: Config, archive: Sequence[str | Path]) -> Archive:
    """Open every archive entry (headers only), put the entries in time order and check that
    every acquisition id is unique (a tile id is ``<acquisition>/<row>_<col>``)."""
    paths = [Path(p).resolve() for p in archive]
    if not paths:
        raise ConfigError("archive: no scene given")
    kind = archive_kind(paths)
    source: SourceConfig = config.section("source")
    telemetry = Telemetry(None, keep=False)
    errors: list[dict[str, Any]] = []
    per_path: list[tuple[Path, list[SceneRef]]] = []
    for path in paths:
        refs = []
        entry = replace(source, kind=kind, paths=(path,))
        for acquisition in iter_acquisitions(entry, telemetry, errors):
            scene = acquisition.scene
            refs.append(SceneRef(acquisition.id, acquisition.place, str(path),
                                 acquisition.acquired, _bounds(acquisition),
                                 scene.height * scene.width / 1e6))
            close = getattr(scene, "close", None)
            if close is not None:
                close()
        per_path.append((path, refs))

    def first(entry: tuple[Path, list[SceneRef]]) -> datetime:
        dated = [as_utc(r.acquired) for r in entry[1] if r.acquired is not None]
        return min(dated) if dated else UNDATED

    per_path.sort(key=first)  # stable: same-time entries keep the order they were given in
    scenes = [ref for _, refs in per_path for ref in refs]
    seen: dict[str, str] = {}
    for ref in scenes:
        if ref.id in seen:
            raise ConfigError(f"archive: {ref.path} and {seen[ref.id]} both give acquisition "
                              f"{ref.id!r}; tile and product ids would collide (rename a place "
                              f"folder or replay them apart)")
        seen[ref.id] = ref.path
    ordered = tuple(p for p, _ in per_path)
    return Archive(replay_config(config, kind, ordered), kind, ordered, tuple(scenes),
                   tuple(errors))


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]
             ) -> bool:
    return b[0] < a[2] and a[0] < b[2] and b[1] < a[3] and a[1] < b[3]


def partition(scenes: Sequence[SceneRef], by: str = "footprint") -> list[Partition]:
    """Group scenes into partitions: one reference store each, scored in order by one task.

    ``footprint`` (the default, exact): scenes whose footprints overlap, transitively.
    Footprints are WGS84 bounding boxes; touching edges share no cell, so only a positive
    overlap joins two scenes. A scene without georeferencing has no store cell to share and
    goes with the other scenes of its place name. ``place``: one partition per place name (an
    OSCD city, a Sentinel-2 tile id), for archives whose places overlap a little everywhere
    (Sentinel-2 tiles overlap their neighbours by 9.8 km, which would join a whole UTM zone
    into one partition): references in those overlaps are then not shared between places, as
    one store would share them (:func:`overlapping_partitions` lists the pairs). Each
    partition keeps the archive's order.
    """
    if by not in ("footprint", "place"):
        raise ConfigError(f"partition by 'footprint' or 'place', got {by!r}")
    parent = list(range(len(scenes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    by_place: dict[str, int] = {}
    if by == "footprint":
        boxes = [(i, s.bounds) for i, s in enumerate(scenes) if s.bounds is not None]
        boxes.sort(key=lambda item: item[1][0])  # sweep by west edge
        for index, (i, a) in enumerate(boxes):
            for j, b in boxes[index + 1:]:
                if b[0] >= a[2]:
                    break
                if _overlap(a, b):
                    join(i, j)
    for i, s in enumerate(scenes):
        if s.bounds is None or by == "place":
            join(i, by_place.setdefault(s.place, i))
    groups: dict[int, list[SceneRef]] = {}
    for i, s in enumerate(scenes):
        groups.setdefault(root(i), []).append(s)
    out = []
    used: set[str] = set()
    for members in groups.values():
        places = list(dict.fromkeys(s.place for s in members))
        name = _safe_name(places[0] + (f"+{len(places) - 1}" if len(places) > 1 else ""))
        while name in used:
            name += "_"
        used.add(name)
        out.append(Partition(name, tuple(members)))
    return out


def overlapping_partitions(parts: Sequence[Partition]) -> list[tuple[str, str]]:
    """Pairs of partitions whose footprints overlap (none when partitioned by footprint)."""
    boxes = []
    for part in parts:
        known = [s.bounds for s in part.scenes if s.bounds is not None]
        boxes.extend((part.name, b) for b in known)
    pairs = {tuple(sorted((x, y))) for i, (x, a) in enumerate(boxes)
             for y, b in boxes[i + 1:] if x != y and _overlap(a, b)}
    return sorted(pairs)  # type: ignore[arg-type]


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_+." else "_" for c in text) or "place"


# -- one partition, on a worker -------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionJob:
    """What a worker needs to score a partition: all of it paths on a shared filesystem."""

    config_path: str
    kind: str
    archive: tuple[str, ...]  # every archive entry, in replay order (the run's [source])
    entries: tuple[str, ...]  # those holding this partition's scenes
    partition: str
    scene_ids: tuple[str, ...]
    out: str
    session: int
    fingerprint: str


def scene_dir(out: Path, scene_id: str) -> Path:
    return out / "scenes" / _safe_name(scene_id)


def result_path(out: Path, scene_id: str) -> Path:
    return scene_dir(out, scene_id) / "result.pkl"


def load_result(out: Path, scene_id: str, fingerprint: str) -> dict[str, Any] | None:
    """A scene's written result, or None when there is none (or it is of another replay)."""
    path = result_path(out, scene_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StorageError(path, f"cannot read replay result: {error.strerror or error}") \
            from error
    try:
        record = pickle.loads(data)  # our own file, written whole by atomic_path
    except Exception as error:
        raise StorageError(path, f"damaged replay result: {error}") from error
    if record.get("format") != FORMAT or record.get("fingerprint") != fingerprint:
        return None
    return record


@dataclass
class SceneState:
    """A scene's attempts, as its journal tells them."""

    failed: str | None = None  # why it was given up
    attempts: int = 0  # started in this session
    last_error: str | None = None


def scene_state(journal: Journal, session: int) -> SceneState:
    state = SceneState()
    for record in journal:
        event = record.get("event")
        if event == "failed":
            state.failed = str(record.get("reason"))
        elif event == "start" and record.get("session") == session:
            state.attempts += 1
        elif event == "error":
            state.last_error = str(record.get("message"))
    return state


def score_partition(job: PartitionJob) -> list[dict[str, Any]]:
    """Score a partition's scenes in order through the flight pipeline (a Dask task).

    Skips what is written; a scene whose earlier attempts in this session did not finish (the
    worker died) or raised is tried at most :data:`MAX_ATTEMPTS` times in all, then reported
    and skipped. Returns one small record per scene (the scores go to disk, not over the wire).
    """
    out = Path(job.out)
    config = replay_config(load_config(job.config_path), job.kind,
                           [Path(p) for p in job.archive])
    wanted = set(job.scene_ids)
    records: dict[str, dict[str, Any]] = {}
    telemetry = Telemetry(out / "telemetry" / f"{job.partition}.jsonl",
                          config.section("telemetry").budget_bytes, keep=False)
    pipeline: Pipeline | None = None
    try:
        for path in job.entries:
            entry = replace(config.section("source"), paths=(Path(path),))
            for acquisition in iter_acquisitions(entry, telemetry, []):
                if acquisition.id not in wanted:
                    continue
                folder = scene_dir(out, acquisition.id)
                remove_partials(folder)
                journal = Journal(folder / "journal.jsonl")
                state = scene_state(journal, job.session)
                # The result file is the commit point (a kill may fall between it and the
                # journal's "done"): a scene whose result is written is never scored again.
                if load_result(out, acquisition.id, job.fingerprint) is not None:
                    records[acquisition.id] = {"scene": acquisition.id, "status": "resumed"}
                    continue
                if state.failed is not None:
                    records[acquisition.id] = {"scene": acquisition.id, "status": "failed",
                                               "reason": state.failed}
                    continue
                while True:
                    if state.attempts >= MAX_ATTEMPTS:
                        reason = (f"failed {state.attempts} times; last: {state.last_error}"
                                  if state.last_error else
                                  f"its worker died during {state.attempts} attempts")
                        journal.append({"event": "failed", "session": job.session,
                                        "reason": reason, "t": time.time()})
                        telemetry.emit("replay_scene_failed", scene=acquisition.id,
                                       reason=reason)
                        records[acquisition.id] = {"scene": acquisition.id, "status": "failed",
                                                   "reason": reason}
                        break
                    attempt = state.attempts + 1
                    journal.append({"event": "start", "session": job.session,
                                    "attempt": attempt, "pid": os.getpid(),
                                    "host": socket.gethostname(), "t": time.time()})
                    state.attempts = attempt
                    started = time.perf_counter()
                    try:
                        if pipeline is None:
                            pipeline = Pipeline(config, telemetry,
                                                out / "state" / job.partition)
                        result = pipeline.score(acquisition)
                        _write_result(out, acquisition.id, job, attempt, result)
                    except Exception as error:  # the scene is retried once, then skipped
                        message = f"{type(error).__name__}: {error}"
                        journal.append({"event": "error", "session": job.session,
                                        "attempt": attempt, "message": message,
                                        "t": time.time()})
                        state.last_error = message
                        if pipeline is not None:  # a fresh pipeline for the retry
                            pipeline.close()
                            pipeline = None
                        continue
                    wall = time.perf_counter() - started
                    journal.append({"event": "done", "session": job.session,
                                    "attempt": attempt, "wall_s": round(wall, 4),
                                    "t": time.time()})
                    records[acquisition.id] = {"scene": acquisition.id, "status": "scored",
                                               "attempt": attempt, "wall_s": wall,
                                               "mpx": result.input_mpx, "pid": os.getpid()}
                    break
    finally:
        if pipeline is not None:
            pipeline.close()
        telemetry.sync()
        telemetry.close()
    for scene_id in job.scene_ids:
        # Listed but not yielded by the source on the worker (unreadable there now).
        records.setdefault(scene_id, {"scene": scene_id, "status": "failed",
                                      "reason": "the worker's source did not yield it"})
    return [records[s] for s in job.scene_ids]


def _write_result(out: Path, scene_id: str, job: PartitionJob, attempt: int,
                  result: AcquisitionResult) -> None:
    record = {"format": FORMAT, "fingerprint": job.fingerprint, "scene": scene_id,
              "session": job.session, "attempt": attempt, "pid": os.getpid(),
              "host": socket.gethostname(), "result": result}
    write_bytes(result_path(out, scene_id), pickle.dumps(record, protocol=5))


# -- planning over the workers' scores ------------------------------------------------------------


# -- the driver -----------------------------------------------------------------------------------


@dataclass
class ReplayResult:
    out: Path
    run: RunResult
    scenes: list[dict[str, Any]]  # per scene: status, attempts, worker, decisions, chosen
    partitions: list[Partition]
    workers: int
    dashboard: str | None
    scheduler: str
    wall_s: float
    score_wall_s: float
    plan_wall_s: float
    session: int
    cluster_start_s: float  # of score_wall_s: starting or reaching the cluster
    tables: dict[str, Path] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [s for s in self.scenes if s["status"] == "failed"]

    def summary_lines(self) -> list[str]:
        scored = sum(s["status"] == "scored" for s in self.scenes)
        resumed = sum(s["status"] == "resumed" for s in self.scenes)
        mpx = sum(s["mpx"] for s in self.scenes if s["status"] != "failed")
        lines = [f"replay: {len(self.scenes)} scenes in {len(self.partitions)} partitions on "
                 f"{self.workers} worker{'s' if self.workers != 1 else ''} ({self.scheduler}), "
                 f"session {self.session}",
                 f"  scored {scored}, resumed {resumed}, failed {len(self.failed)}; "
                 f"{mpx:.2f} Mpx scored in {self.score_wall_s:.1f} s, planned in "
                 f"{self.plan_wall_s:.1f} s"]
        for scene in self.failed:
            lines.append(f"  skipped {scene['id']}: {scene['reason']}")
        # The run's own lines, less its throughput: that runner only planned, it scored
        # nothing (the scoring figure is the line above).
        lines += [line for line in self.run.summary_lines()[1:-1] if " Mpx in " not in line]
        lines.append(f"report: {self.out / 'replay.md'}")
        return lines


def fingerprint_of(config_path: Path, archive: Archive, partition_by: str = "footprint"
                   ) -> str:
    """What a result must match to be resumed: the config's bytes, the archive's scenes and
    how they are partitioned (a store holds what its partition's scenes committed)."""
    digest = hashlib.sha256(config_path.read_bytes())
    digest.update(json.dumps([s.id for s in archive.scenes]).encode())
    digest.update(partition_by.encode())
    return digest.hexdigest()


def replay(config_path: str | Path, archive: Sequence[str | Path], out: str | Path,
           scheduler: str | None = None, workers: int | None = None,
           echo: Callable[[str], None] = print, partition_by: str = "footprint"
           ) -> ReplayResult:
    """``onboard replay``: score the archive on Dask, plan every window over all places, write
    the tables and the report. ``scheduler``: a running ``dask.distributed`` scheduler's
    address; without one a local cluster of ``workers`` processes (default: one per core).
    ``partition_by``: see :func:`partition`."""
    started = time.perf_counter()
    config_path = Path(config_path)
    out = Path(out)
    config = load_config(config_path)
    found = discover(config, archive)
    parts = partition(found.scenes, partition_by)
    fingerprint = fingerprint_of(config_path, found, partition_by)
    session = _start_session(out, config_path, found, parts, fingerprint)
    echo(f"replay: {len(found.scenes)} scenes in {len(parts)} partitions -> {out}")
    shared = overlapping_partitions(parts)
    if shared:
        echo(f"replay: warning: {len(shared)} pairs of places overlap (e.g. {shared[0]}); "
             f"partitioned by place, their overlaps' references are not shared")

    score_started = time.perf_counter()
    records, used, dashboard, where, cluster_s = _score_on_dask(
        config_path, found, parts, out, session, fingerprint, scheduler, workers, echo)
    score_wall = time.perf_counter() - score_started

    plan_started = time.perf_counter()
    results: dict[str, AcquisitionResult] = {}
    skipped: dict[str, str] = {}
    meta: dict[str, dict[str, Any]] = {}
    for scene in found.scenes:
        record = load_result(out, scene.id, fingerprint)
        if record is None:
            skipped[scene.id] = records.get(scene.id, {}).get("reason", "not scored")
            continue
        results[scene.id] = record["result"]
        meta[scene.id] = record
    plan_dir = out / "plan"
    if plan_dir.exists():  # planned again from the scores: a deterministic, cheap step
        shutil.rmtree(plan_dir)
    runner = PassRunner(found.config, plan_dir, scored=results, skipped=skipped)
    try:
        run = runner.run()
    except BaseException:
        runner.close(quiet=True)
        raise
    chosen = dict(runner.chosen)
    runner.close()
    plan_wall = time.perf_counter() - plan_started

    products = _chosen_products(plan_dir, chosen)
    scenes = _scene_rows(found, parts, records, meta, products, session)
    result = ReplayResult(out, run, scenes, parts, used, dashboard, where,
                          time.perf_counter() - started, score_wall, plan_wall, session,
                          cluster_s)
    result.tables = write_tables(result, results, products)
    write_report(result, results)
    Journal(out / "sessions.jsonl").append({"event": "end", "session": session,
                                            "wall_s": round(result.wall_s, 3),
                                            "failed": [s["id"] for s in result.failed],
                                            "t": time.time()})
    return result


def _start_session(out: Path, config_path: Path, found: Archive, parts: list[Partition],
                   fingerprint: str) -> int:
    """Write (or check) the replay's index; a session number per start of the replay."""
    index_path = out / "replay.json"
    if index_path.exists():
        try:
            known = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise StorageError(index_path, f"cannot read the replay index: {error}") from error
        if known.get("fingerprint") != fingerprint:
            raise ConfigError(f"{out}: holds a replay of another config or archive "
                              f"({known.get('config')}); use another --out")
    sessions = Journal(out / "sessions.jsonl")
    session = 1 + sum(r.get("event") == "start" for r in sessions)
    write_json(index_path, {
        "format": FORMAT, "fingerprint": fingerprint, "config": str(config_path.resolve()),
        "kind": found.kind, "archive": [str(p) for p in found.paths],
        "scenes": [{"id": s.id, "place": s.place, "path": s.path,
                    "acquired": s.acquired.isoformat() if s.acquired else None,
                    "bounds": s.bounds, "mpx": s.mpx,
                    "partition": next(p.name for p in parts if s in p.scenes)}
                   for s in found.scenes],
        "partitions": {p.name: [s.id for s in p.scenes] for p in parts},
    })
    sessions.append({"event": "start", "session": session, "pid": os.getpid(),
                     "t": time.time()})
    return session


def _score_on_dask(config_path: Path, found: Archive, parts: list[Partition], out: Path,
                   session: int, fingerprint: str, scheduler: str | None,
                   workers: int | None, echo: Callable[[str], None]
                   ) -> tuple[dict[str, dict[str, Any]], int, str | None, str, float]:
    """Run one task per partition; a task that dies or raises is submitted again (it skips
    what is written) until each of its scenes is scored or given up."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as error:
        raise ConfigError(f"onboard replay needs the [replay] extra (dask, distributed, "
                          f"pyarrow): {error}") from error

    cluster = None
    started = time.perf_counter()
    if scheduler is None:
        count = workers or os.cpu_count() or 1
        # One thread per worker process: the pipeline runs its own reader, stage and
        # post-processing threads, and the engines their own.
        cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40)
        client = Client(cluster)
        where = "local cluster"
    else:
        client = Client(scheduler, timeout=30)
        where = f"scheduler {scheduler}"
    cluster_s = time.perf_counter() - started
    try:
        dashboard = client.dashboard_link
        echo(f"dask dashboard: {dashboard}")
        used = len(client.scheduler_info(n_workers=-1).get("workers", {})) or (workers or 0)
        records: dict[str, dict[str, Any]] = {}
        rounds: dict[str, int] = {}
        # Each submission makes progress (a scene is written or gets one attempt closer to
        # being given up), so a partition needs at most this many.
        limit = {p.name: MAX_ATTEMPTS * len(p.scenes) + 2 for p in parts}
        jobs = {p.name: PartitionJob(str(config_path.resolve()), found.kind,
                                     tuple(str(x) for x in found.paths), p.paths, p.name,
                                     tuple(s.id for s in p.scenes), str(out.resolve()),
                                     session, fingerprint) for p in parts}

        partition_of: dict[str, str] = {}  # task key -> partition

        def submit(name: str) -> Any:
            rounds[name] = rounds.get(name, 0) + 1
            key = f"replay-{session}-{name}-{rounds[name]}"
            partition_of[key] = name
            return client.submit(score_partition, jobs[name], key=key, pure=False)

        # The largest partitions first, so the last task to start is a short one.
        futures = as_completed([submit(p.name) for p in sorted(parts, key=lambda p: -p.mpx)])
        for future in futures:
            name = partition_of[future.key]
            try:
                for record in future.result():
                    records[record["scene"]] = record
                done = sum(r["status"] != "failed" for r in records.values())
                echo(f"  {name}: done ({done}/{len(found.scenes)} scenes)")
            except Exception as error:  # a dead worker (KilledWorker) or an escaped error
                if rounds[name] < limit[name]:
                    echo(f"  {name}: {type(error).__name__}: {error}; submitted again")
                    futures.add(submit(name))
                else:
                    for scene in jobs[name].scene_ids:
                        records.setdefault(scene, {"scene": scene, "status": "failed",
                                                   "reason": f"{type(error).__name__}: "
                                                             f"{error}"})
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return records, used, dashboard, where, cluster_s


# -- checking a replay against a sequential run --------------------------------------------------


def _close(a: Any, b: Any, tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=tol) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b


def compare_with_run(replay_out: str | Path, run_out: str | Path, tol: float = 1e-6
                     ) -> list[str]:
    """Where a replay's results differ from a sequential ``onboard run`` over the same scenes:
    acquisition and tile ids, decisions, reasons and scores (numbers to ``tol``), and every row
    of every pass's plan (candidates, bytes, values, what was chosen and why). Timings and the
    time-limited exact optimum are not compared. An empty list: identical."""
    ours, theirs = Path(replay_out) / "plan", Path(run_out)
    problems: list[str] = []

    def rows(folder: Path, pattern: str) -> dict[str, list[dict[str, Any]]]:
        return {p.name: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
                for p in sorted(folder.glob(pattern))}

    for pattern in ("scores-*.jsonl", "plan-*.jsonl"):
        a, b = rows(ours, pattern), rows(theirs, pattern)
        if a.keys() != b.keys():
            problems.append(f"{pattern}: replay has {sorted(a)}, the run has {sorted(b)}")
        for name in sorted(a.keys() & b.keys()):
            if len(a[name]) != len(b[name]):
                problems.append(f"{name}: {len(a[name])} rows, the run has {len(b[name])}")
                continue
            for i, (x, y) in enumerate(zip(a[name], b[name], strict=True)):
                if not _close(x, y, tol):
                    keys = sorted(k for k in x.keys() | y.keys()
                                  if not _close(x.get(k), y.get(k), tol))
                    problems.append(f"{name} row {i} ({x.get('tile_id')}): differs in {keys}")
    try:
        a_sum = json.loads((ours / "summary.json").read_text(encoding="utf-8"))
        b_sum = json.loads((theirs / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return [*problems, f"summary.json: {error}"]
    if [x["id"] for x in a_sum["acquisitions"]] != [x["id"] for x in b_sum["acquisitions"]]:
        problems.append("acquisitions differ in ids or order")
    for x, y in zip(a_sum["acquisitions"], b_sum["acquisitions"], strict=False):
        if x["decisions"] != y["decisions"] or x["chosen"] != y["chosen"]:
            problems.append(f"{x['id']}: decisions {x['decisions']} / chosen {x['chosen']} "
                            f"against {y['decisions']} / {y['chosen']}")
    keys = ("start", "budget_bytes", "planned_bytes", "chosen", "chosen_kinds", "candidates",
            "value", "downlink_everything_value", "downlink_everything_bytes")
    a_win, b_win = a_sum["plan"]["windows"], b_sum["plan"]["windows"]
    if len(a_win) != len(b_win):
        problems.append(f"{len(a_win)} passes planned, the run planned {len(b_win)}")
    for i, (x, y) in enumerate(zip(a_win, b_win, strict=False)):
        for key in keys:
            if not _close(x.get(key), y.get(key), tol):
                problems.append(f"pass {i}: {key} {x.get(key)} against {y.get(key)}")
    return problems


# -- what comes out: tables and the report --------------------------------------------------------


def _chosen_products(plan_dir: Path, chosen: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per downlinked tile: its product's kind, window, real bytes and value (plan audits)."""
    wanted = set(chosen.values())
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(plan_dir.glob("plan-*.jsonl"), key=lambda p: int(p.stem.split("-")[1])):
        window = int(path.stem.split("-")[1])
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("chosen") is not None and row["product_id"] in wanted:
                out[row["tile_id"]] = {"product_id": row["product_id"], "kind": row["kind"],
                                       "window": window, "bytes": int(row["bytes"]),
                                       "value": float(row["value"])}
    return out


def _scene_rows(found: Archive, parts: list[Partition], records: dict[str, dict[str, Any]],
                meta: dict[str, dict[str, Any]], products: dict[str, dict[str, Any]],
                session: int) -> list[dict[str, Any]]:
    part_of = {s.id: p.name for p in parts for s in p.scenes}
    rows = []
    for scene in found.scenes:
        written = meta.get(scene.id)
        result: AcquisitionResult | None = written["result"] if written else None
        mine = [p for tile, p in products.items() if tile.startswith(scene.id + "/")]
        status = "failed" if written is None else (
            "scored" if written["session"] == session else "resumed")
        rows.append({
            "id": scene.id, "place": scene.place, "partition": part_of[scene.id],
            "path": scene.path, "acquired": scene.acquired, "mpx": scene.mpx,
            "status": status,
            "reason": records.get(scene.id, {}).get("reason", "not scored")
            if written is None else None,
            "attempt": written["attempt"] if written else None,
            "session": written["session"] if written else None,
            "pid": written["pid"] if written else None,
            "tiles": len(result.scores) if result else 0,
            "decisions": result.counts() if result else {},
            "score_wall_s": result.timings_s.get("wall") if result else None,
            "chosen": len(mine), "planned_bytes": sum(p["bytes"] for p in mine),
            "planned_value": sum(p["value"] for p in mine),
        })
    return rows


def _value_names(results: dict[str, AcquisitionResult]) -> list[str]:
    names: dict[str, None] = {}
    for result in results.values():
        for score in result.scores:
            names.update(dict.fromkeys(score.values))
    return sorted(names)


def write_tables(result: ReplayResult, results: dict[str, AcquisitionResult],
                 products: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """``tiles.parquet`` (every tile's decision, scores and downlink), ``scenes.parquet`` (the
    pass summary per scene) and ``passes.parquet`` (each window's plan against its budget)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ConfigError(f"onboard replay needs the [replay] extra (pyarrow): {error}") \
            from error

    def write(name: str, table: Any) -> Path:
        path = result.out / name
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    stamp = pa.timestamp("us", tz="UTC")
    place_of = {s["id"]: (s["place"], s["partition"], s["acquired"]) for s in result.scenes}
    names = _value_names(results)
    columns: dict[str, list[Any]] = {k: [] for k in (
        "scene", "place", "partition", "acquired", "tile_id", "row", "col", "height", "width",
        "decision", "reasons", "aoi_weight", "product_kind", "product_window",
        "product_bytes", "product_value")}
    values: dict[str, list[float | None]] = {n: [] for n in names}
    for scene in result.scenes:
        scored = results.get(scene["id"])
        if scored is None:
            continue
        place, part, acquired = place_of[scene["id"]]
        for score in scored.scores:
            product = products.get(score.tile_id, {})
            for key, value in (("scene", scene["id"]), ("place", place), ("partition", part),
                               ("acquired", as_utc(acquired) if acquired else None),
                               ("tile_id", score.tile_id), ("row", score.window[0]),
                               ("col", score.window[1]), ("height", score.window[2]),
                               ("width", score.window[3]), ("decision", str(score.decision)),
                               ("reasons", "; ".join(score.reasons)),
                               ("aoi_weight", score.aoi_weight),
                               ("product_kind", product.get("kind")),
                               ("product_window", product.get("window")),
                               ("product_bytes", product.get("bytes")),
                               ("product_value", product.get("value"))):
                columns[key].append(value)
            for name in names:
                value = score.values.get(name)
                values[name].append(None if value is None else float(value))
    tiles = pa.table({**{k: pa.array(v, stamp if k == "acquired" else None)
                         for k, v in columns.items()},
                      **{n: pa.array(v, pa.float64()) for n, v in values.items()}})
    decisions = ("keep", "demote", "drop", "failed")
    scenes = pa.table({
        "scene": [s["id"] for s in result.scenes],
        "place": [s["place"] for s in result.scenes],
        "partition": [s["partition"] for s in result.scenes],
        "path": [s["path"] for s in result.scenes],
        "acquired": pa.array([as_utc(s["acquired"]) if s["acquired"] else None
                              for s in result.scenes], stamp),
        "mpx": [s["mpx"] for s in result.scenes],
        "status": [s["status"] for s in result.scenes],
        "reason": pa.array([s["reason"] for s in result.scenes], pa.string()),
        "attempt": pa.array([s["attempt"] for s in result.scenes], pa.int32()),
        "session": pa.array([s["session"] for s in result.scenes], pa.int32()),
        "tiles": [s["tiles"] for s in result.scenes],
        **{d: [s["decisions"].get(d, 0) for s in result.scenes] for d in decisions},
        "score_wall_s": pa.array([s["score_wall_s"] for s in result.scenes], pa.float64()),
        "chosen": [s["chosen"] for s in result.scenes],
        "planned_bytes": [s["planned_bytes"] for s in result.scenes],
        "planned_value": [s["planned_value"] for s in result.scenes],
    })
    windows = result.run.summary.get("plan", {}).get("windows", [])
    passes = pa.table({
        "window": list(range(len(windows))),
        "start": pa.array([datetime.fromisoformat(w["start"]) for w in windows], stamp),
        "budget_bytes": [w["budget_bytes"] for w in windows],
        "planned_bytes": [w["planned_bytes"] for w in windows],
        "chosen": [w["chosen"] for w in windows],
        "candidates": [w["candidates"] for w in windows],
        "value": [w["value"] for w in windows],
        "exact_optimum": pa.array([w["exact_optimum"] for w in windows], pa.float64()),
        "downlink_everything_value": [w["downlink_everything_value"] for w in windows],
        "downlink_everything_bytes": [w["downlink_everything_bytes"] for w in windows],
    })
    return {"tiles": write("tiles.parquet", tiles), "scenes": write("scenes.parquet", scenes),
            "passes": write("passes.parquet", passes)}


def scores_over_time(results: dict[str, AcquisitionResult], scenes: list[dict[str, Any]],
                     name: str) -> dict[str, list[tuple[datetime, float]]]:
    """Per place, the mean of score ``name`` over its usable tiles, scene by scene in time."""
    out: dict[str, list[tuple[datetime, float]]] = {}
    for scene in scenes:
        result = results.get(scene["id"])
        if result is None or scene["acquired"] is None:
            continue
        found = [s.values[name] for s in result.scores if s.usable and name in s.values]
        if found:
            out.setdefault(scene["place"], []).append(
                (as_utc(scene["acquired"]), float(np.mean(found))))
    for series in out.values():
        series.sort()
    return out


# Distinct, colour-blind-safe line colours (Okabe-Ito), cycled.
_LINE_COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
                 (213, 94, 0), (204, 121, 167), (235, 235, 235)]


def _line(image: np.ndarray, r0: int, c0: int, r1: int, c1: int,
          colour: tuple[int, int, int], width: int = 2) -> None:
    n = max(abs(r1 - r0), abs(c1 - c0), 1) + 1
    rows = np.linspace(r0, r1, n).round().astype(int)
    cols = np.linspace(c0, c1, n).round().astype(int)
    h, w = image.shape[:2]
    for dr in range(width):
        for dc in range(width):
            rr, cc = rows + dr, cols + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            image[rr[ok], cc[ok]] = colour


def chart_over_time(path: Path, series: dict[str, list[tuple[datetime, float]]],
                    title: str) -> Path:
    """One line per place over time, scores on [0, 1]: a PNG of the runtime's own drawing."""
    from onboard.runtime.downlink.quicklook import (
        PANEL_BACKGROUND,
        TEXT_COLOUR,
        draw_text,
        fill_rect,
        text_width,
    )
    from onboard.runtime.png import write_png

    legend_w = 16 + max([text_width(p, 1) for p in series] + [60])
    # Room right of the plot for the name at each series' last point, then the legend.
    w, h, left, top, plot_w, plot_h = 850 + legend_w, 380, 56, 40, 680, 290
    legend_x = left + plot_w + 100
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = PANEL_BACKGROUND
    draw_text(image, title, 10, 10, size=2)
    times = [t.timestamp() for pts in series.values() for t, _ in pts]
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    if t1 - t0 < 86400:
        t0, t1 = t0 - 43200, t1 + 43200
    grid = (70, 72, 78)
    for k in range(6):
        y = top + plot_h - int(plot_h * k / 5)
        fill_rect(image, y, left, 1, plot_w, grid)
        draw_text(image, f"{k / 5:.1f}", y - 3, 12, size=1)
    for year in range(datetime.fromtimestamp(t0, timezone.utc).year,
                      datetime.fromtimestamp(t1, timezone.utc).year + 2):
        moment = datetime(year, 1, 1, tzinfo=timezone.utc).timestamp()
        if t0 <= moment <= t1:
            x = left + int(plot_w * (moment - t0) / (t1 - t0))
            fill_rect(image, top, x, plot_h, 1, grid)
            draw_text(image, str(year), top + plot_h + 8, x - 12, size=1)
    for i, (place, points) in enumerate(sorted(series.items())):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        xy = [(top + plot_h - int(plot_h * min(max(v, 0.0), 1.0)),
               left + int(plot_w * (t.timestamp() - t0) / (t1 - t0))) for t, v in points]
        for (ra, ca), (rb, cb) in zip(xy, xy[1:], strict=False):
            _line(image, ra, ca, rb, cb, colour)
        for r, c in xy:
            fill_rect(image, r - 3, c - 3, 7, 7, colour)
        if xy:  # the place named at its last point: colours repeat past eight places
            draw_text(image, place, xy[-1][0] - 3, xy[-1][1] + 7, colour, size=1)
        ly = top + 12 * i
        fill_rect(image, ly, legend_x, 7, 7, colour)
        draw_text(image, place, ly, legend_x + 12, TEXT_COLOUR, size=1)
    return write_png(path, image)


def chart_downlink(path: Path, windows: list[dict[str, Any]]) -> Path:
    """Per contact window: its byte budget (outline), what was planned (bar) and what
    "downlink everything" would have sent into the same budget's time (grey)."""
    from onboard.runtime.downlink.quicklook import (
        PANEL_BACKGROUND,
        TEXT_COLOUR,
        draw_rect,
        draw_text,
        fill_rect,
    )
    from onboard.runtime.png import write_png

    n = max(len(windows), 1)
    bar = max(18, min(90, 640 // n))
    w, h, left, top, plot_h = max(760, 90 + n * (bar + 16)), 380, 70, 44, 270
    image = np.zeros((h, w, 3), np.uint8)
    image[:] = PANEL_BACKGROUND
    draw_text(image, "downlink per pass: planned bytes in the budget", 10, 10, size=2)
    top_bytes = max([max(x["budget_bytes"], x["planned_bytes"]) for x in windows] + [1])
    for k in range(5):
        y = top + plot_h - int(plot_h * k / 4)
        fill_rect(image, y, left, 1, w - left - 10, (70, 72, 78))
        draw_text(image, _bytes(top_bytes * k / 4), y - 3, 6, size=1)
    for i, x in enumerate(windows):
        col = left + 10 + i * (bar + 16)
        budget = int(plot_h * x["budget_bytes"] / top_bytes)
        planned = int(plot_h * x["planned_bytes"] / top_bytes)
        fill_rect(image, top + plot_h - planned, col, planned, bar, (0, 158, 115))
        draw_rect(image, top + plot_h - budget, col, budget, bar, (230, 159, 0), 2)
        share = x["planned_bytes"] / x["budget_bytes"] if x["budget_bytes"] else 0.0
        draw_text(image, f"{share:.0%}", top + plot_h - max(planned, budget) - 12, col,
                  TEXT_COLOUR, 1)
        draw_text(image, f"P{i}", top + plot_h + 8, col, TEXT_COLOUR, 1)
        draw_text(image, x["start"][:10], top + plot_h + 20 + 10 * (i % 2), col, TEXT_COLOUR, 1)
    fill_rect(image, h - 22, left, 7, 7, (0, 158, 115))
    draw_text(image, "planned", h - 22, left + 12, size=1)
    draw_rect(image, h - 22, left + 80, 7, 7, (230, 159, 0), 2)
    draw_text(image, "budget", h - 22, left + 92, size=1)
    return write_png(path, image)


def _bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def write_report(result: ReplayResult, results: dict[str, AcquisitionResult]) -> Path:
    """``replay.md`` with its charts: the scenes' pass summaries, each place's scores over time
    and the downlink planned against the budget."""
    out = result.out
    summary = result.run.summary
    plan = summary.get("plan", {})
    windows = plan.get("windows", [])
    mpx = sum(s["mpx"] for s in result.scenes if s["status"] != "failed")
    lines = ["# Replay", "",
             f"{len(result.scenes)} scenes in {len(result.partitions)} partitions (one reference "
             f"store each: scenes whose footprints overlap), scored on {result.workers} Dask "
             f"workers ({result.scheduler}), then every pass planned once over all places. "
             f"Session {result.session}.", "",
             f"- scoring: {mpx:.2f} Mpx in {result.score_wall_s:.1f} s "
             f"({mpx / max(result.score_wall_s, 1e-9):.2f} Mpx/s; of it "
             f"{result.cluster_start_s:.1f} s to start or reach the cluster); "
             f"planning {result.plan_wall_s:.1f} s; total {result.wall_s:.1f} s",
             f"- dashboard: {result.dashboard}",
             "- pass report of the plan (as `onboard run` writes it): `plan/report.md`; "
             "tables: `tiles.parquet`, `scenes.parquet`, `passes.parquet`", ""]
    failed = result.failed
    if failed:
        lines += ["## Skipped scenes", ""]
        lines += [f"- `{s['id']}`: {s['reason']}" for s in failed]
        lines.append("")
    lines += ["## Downlink against the budget", "", "![downlink](downlink.png)", "",
              "| pass | start | budget B | planned B | used | products | value | exact optimum"
              " | downlink everything |", "|---|---|---|---|---|---|---|---|---|"]
    for i, w in enumerate(windows):
        optimum = f"{w['exact_optimum']:.3f}" if w["exact_optimum"] is not None else "–"
        lines.append(f"| {i} | {w['start'][:19]} | {w['budget_bytes']} | {w['planned_bytes']} "
                     f"| {w['planned_bytes'] / max(w['budget_bytes'], 1):.0%} | {w['chosen']} "
                     f"{w['chosen_kinds']} | {w['value']:.3f} | {optimum} | "
                     f"{w['downlink_everything_value']:.3f} |")
    if plan:
        lines += ["", f"Value captured {plan['value']:.3f} against "
                      f"{plan['downlink_everything_value']:.3f} for \"downlink everything\" in "
                      f"the same budgets; {plan['chosen']} of {plan['candidate_tiles']} "
                      f"candidate tiles downlinked.", ""]
    chart_downlink(out / "downlink.png", windows)
    lines += ["## Scores over time, per place", ""]
    for name, title in (("change", "change score (mean over usable tiles)"),
                        ("clear_fraction", "clear fraction (mean over usable tiles)")):
        series = scores_over_time(results, result.scenes, name)
        if not series:
            continue
        chart_over_time(out / f"{name}-over-time.png", series, title)
        lines += [f"![{name}]({name}-over-time.png)", "",
                  f"| place | {name} by date |", "|---|---|"]
        for place, points in sorted(series.items()):
            lines.append(f"| {place} | " + ", ".join(f"{t:%Y-%m-%d} {v:.3f}"
                                                     for t, v in points) + " |")
        lines.append("")
    lines += ["## Scenes", "",
              "| scene | partition | status | attempt | tiles | keep | demote | drop | failed "
              "| downlinked | bytes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result.scenes:
        d = s["decisions"]
        lines.append(f"| {s['id']} | {s['partition']} | {s['status']} | {s['attempt'] or '–'} "
                     f"| {s['tiles']} | {d.get('keep', 0)} | {d.get('demote', 0)} | "
                     f"{d.get('drop', 0)} | {d.get('failed', 0)} | {s['chosen']} | "
                     f"{s['planned_bytes']} |")
    return write_text(out / "replay.md", "\n".join(lines) + "\n")


__all__ = ["Archive", "Partition", "PartitionJob", "ReplayResult", "SceneRef",
           "compare_with_run", "discover", "load_result", "overlapping_partitions",
           "partition", "replay",
           "replay_config", "score_partition"]
