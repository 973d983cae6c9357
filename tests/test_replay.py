"""`onboard replay`: the flight pipeline over an archive on Dask, checked against `onboard run`.

The archive is real imagery: the Paris crop of tests/data and the bundled Hong Kong sample (both
dates of each), given out of time order. Faults are real too: worker processes are SIGKILLed
while their scene is in flight, and a replay's whole process group is killed and started again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the [replay] extra (dask, distributed) is not "
                                          "installed")
pq = pytest.importorskip("pyarrow.parquet", reason="the [replay] extra (pyarrow) is missing")

from onboard.runtime import pipeline  # noqa: E402
from onboard.runtime.config import load_config  # noqa: E402
from onboard.runtime.errors import ConfigError  # noqa: E402
from onboard.runtime.replay import (  # noqa: E402
    compare_with_run,
    discover,
    overlapping_partitions,
    partition,
    replay,
    scene_dir,
)

REPO = Path(__file__).resolve().parents[1]
CLOUD = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
CHANGE = REPO / "models" / "change" / "change-13band-int8-ort.onboard"
PARIS = REPO / "tests" / "data" / "oscd" / "paris"
HONGKONG = REPO / "runtime" / "sample" / "hongkong"
ARCHIVE = [PARIS, HONGKONG]  # out of time order: the replay puts Hong Kong (2016-09) first
IN_TIME_ORDER = [HONGKONG, PARIS]
TIMEOUT_S = 120


def _config_text(paths: list[Path], change: bool = False) -> str:
    tiling = "tile = 128\nhalo = 64\n" if change else "tile = 64\nhalo = 16\n"
    text = (f'[source]\nkind = "oscd"\npaths = {json.dumps([str(p) for p in paths])}\n'
            f"[tiling]\n{tiling}[buffer]\nbatch = 16\n"
            f'[cloud]\nbundle = "{CLOUD}"\nthreads = 1\nbatch = 16\n'
            '[cloud.gate]\nmax_cloud_fraction = 0.6\naction = "demote"\n'
            "[planner]\nage_half_life_s = 2592000.0\n")
    if change:
        text += f'[change]\nbundle = "{CHANGE}"\nthreads = 1\nbatch = 4\n'
    for start in ("2016-12-01T12:00:00Z", "2018-04-01T12:00:00Z"):
        text += f"[[passes]]\nstart = {start}\nduration_s = 10\nbitrate_bps = 38400\n"
    return text


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _cli(config: Path, out: Path, *extra: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [shutil.which("onboard") or "onboard", "replay", str(config),
         *[str(p) for p in ARCHIVE], "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _journal(out: Path, scene: str) -> list[dict]:
    path = scene_dir(out, scene) / "journal.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("replay")


@pytest.fixture(scope="module")
def config(workdir):
    # The config's own [source] names nothing useful: the replay replaces it with the archive.
    return _write(workdir / "replay.toml", _config_text([REPO / "nowhere"]))


@pytest.fixture(scope="module")
def sequential(workdir):
    """`onboard run` over the same scenes, in the order the replay puts them in."""
    out = workdir / "sequential"
    config = _write(workdir / "sequential.toml", _config_text(IN_TIME_ORDER))
    result = pipeline.run(config, out)
    assert not result.fatal
    return out


@pytest.fixture(scope="module")
def local_replay(workdir, config):
    """The command as a user types it: the local cluster by default."""
    out = workdir / "local"
    process = _cli(config, out, "--workers", "2")
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, stderr
    return out, stdout, stderr


def test_the_local_default_equals_the_sequential_run(local_replay, sequential):
    out, stdout, stderr = local_replay
    assert "dask dashboard: http://" in stderr
    assert "4 scenes in 2 partitions on 2 workers (local cluster)" in stdout
    assert compare_with_run(out, sequential) == []
    index = json.loads((out / "replay.json").read_text())
    assert index["archive"] == [str(p) for p in IN_TIME_ORDER]
    assert index["partitions"] == {
        "hongkong": ["hongkong-20160927T000000", "hongkong-20180323T000000"],
        "paris": ["paris-20161130T000000", "paris-20171107T000000"]}


def test_the_tables_and_the_report(local_replay, sequential):
    out, _, _ = local_replay
    tiles = pq.read_table(out / "tiles.parquet").to_pylist()
    scores = [json.loads(line) for p in sorted(sequential.glob("scores-*.jsonl"))
              for line in p.read_text().splitlines()]
    assert len(tiles) == len(scores) == 2 * 16 + 2 * 4
    by_id = {t["tile_id"]: t for t in tiles}
    for score in scores:
        row = by_id[score["tile_id"]]
        assert row["decision"] == score["decision"]
        assert row["clear_fraction"] == pytest.approx(score["values"]["clear_fraction"],
                                                      abs=1e-6)
    summary = json.loads((sequential / "summary.json").read_text())
    passes = pq.read_table(out / "passes.parquet").to_pylist()
    assert [p["planned_bytes"] for p in passes] == [
        w["planned_bytes"] for w in summary["plan"]["windows"]]
    assert all(p["planned_bytes"] <= p["budget_bytes"] for p in passes)
    downlinked = [t for t in tiles if t["product_kind"] is not None]
    assert len(downlinked) == summary["plan"]["chosen"]
    scenes = pq.read_table(out / "scenes.parquet").to_pylist()
    assert [s["status"] for s in scenes] == ["scored"] * 4
    assert sum(s["planned_bytes"] for s in scenes) == sum(p["planned_bytes"] for p in passes)
    report = (out / "replay.md").read_text()
    for png in ("downlink.png", "clear_fraction-over-time.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_against_a_running_scheduler(workdir, config, sequential):
    from distributed import LocalCluster

    out = workdir / "scheduler"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as cluster:
        lines: list[str] = []
        result = replay(config, ARCHIVE, out, scheduler=cluster.scheduler_address,
                        echo=lines.append)
    assert result.scheduler == f"scheduler {cluster.scheduler_address}"
    assert result.workers == 2
    assert any(line.startswith("dask dashboard: http") for line in lines)
    assert [s["status"] for s in result.scenes] == ["scored"] * 4
    assert compare_with_run(out, sequential) == []


@pytest.fixture(scope="module")
def faulty_replay(workdir, config):
    """Kill the worker scoring Hong Kong date 2 once, and the one scoring Paris date 1 on both
    of its attempts, each while the scene is in flight (its start journalled, no result)."""
    out = workdir / "faulty"
    plan = {"hongkong-20180323T000000": 1, "paris-20161130T000000": 2}
    killed: dict[str, list[int]] = {scene: [] for scene in plan}
    written_before: dict[str, tuple[int, int]] = {}
    process = _cli(config, out, "--workers", "2")
    deadline = time.monotonic() + TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        for scene, kills in plan.items():
            records = _journal(out, scene)
            starts = [r for r in records if r["event"] == "start"]
            ended = {r.get("attempt") for r in records if r["event"] in ("done", "error")}
            if len(killed[scene]) < kills and starts and starts[-1]["attempt"] not in ended \
                    and len(starts) > len(killed[scene]):
                if scene.startswith("hongkong"):  # date 1 of its partition is written by now
                    first = scene_dir(out, "hongkong-20160927T000000") / "result.pkl"
                    info = first.stat()
                    written_before[first.name] = (info.st_ino, info.st_mtime_ns)
                try:
                    os.kill(starts[-1]["pid"], signal.SIGKILL)
                    killed[scene].append(starts[-1]["pid"])
                except ProcessLookupError:
                    pass
        time.sleep(0.002)
    stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    assert process.returncode == 0, stderr
    return out, stdout, killed, written_before


def test_a_worker_killed_mid_scene_is_retried_once(faulty_replay, sequential):
    out, stdout, killed, written_before = faulty_replay
    scene = "hongkong-20180323T000000"
    assert len(killed[scene]) == 1
    events = [(r["event"], r.get("attempt")) for r in _journal(out, scene)]
    assert events == [("start", 1), ("start", 2), ("done", 2)]
    assert (scene_dir(out, scene) / "result.pkl").exists()
    # The result written before the kill is the same file, untouched.
    first = scene_dir(out, "hongkong-20160927T000000") / "result.pkl"
    info = first.stat()
    assert written_before["result.pkl"] == (info.st_ino, info.st_mtime_ns)
    # The retried scene scored exactly as the sequential run scored it.
    for name in (f"scores-{scene}.jsonl", "scores-hongkong-20160927T000000.jsonl"):
        assert (out / "plan" / name).read_text() == (sequential / name).read_text()
    rows = {s["scene"]: s for s in pq.read_table(out / "scenes.parquet").to_pylist()}
    assert rows[scene]["attempt"] == 2 and rows[scene]["status"] == "scored"


def test_a_scene_that_fails_twice_is_reported_and_skipped(faulty_replay, sequential):
    out, stdout, killed, _ = faulty_replay
    scene = "paris-20161130T000000"
    assert len(killed[scene]) == 2
    events = [r["event"] for r in _journal(out, scene)]
    assert events == ["start", "start", "failed"]
    assert f"skipped {scene}: its worker died during 2 attempts" in stdout
    rows = {s["scene"]: s for s in pq.read_table(out / "scenes.parquet").to_pylist()}
    assert rows[scene]["status"] == "failed"
    assert [s for s, r in rows.items() if r["status"] == "failed"] == [scene]
    summary = json.loads((out / "plan" / "summary.json").read_text())
    assert [a["id"] for a in summary["acquisitions"]] == [  # in acquisition time
        "hongkong-20160927T000000", "paris-20171107T000000", "hongkong-20180323T000000"]
    assert any(e["error"] == "ReplaySkipped" and scene in e["message"]
               for e in summary["errors"])
    # Its partition went on without it: Paris date 2 scored as in the sequential run.
    name = "scores-paris-20171107T000000.jsonl"
    assert (out / "plan" / name).read_text() == (sequential / name).read_text()
    assert f"`{scene}`" in (out / "replay.md").read_text()


def test_a_stopped_replay_resumes_from_what_is_done(workdir, config, sequential):
    out = workdir / "resumed"
    scenes = ["hongkong-20160927T000000", "hongkong-20180323T000000",
              "paris-20161130T000000", "paris-20171107T000000"]
    process = _cli(config, out, "--workers", "2", start_new_session=True)
    deadline = time.monotonic() + TIMEOUT_S
    done: dict[str, tuple[int, int]] = {}
    while not done and time.monotonic() < deadline and process.poll() is None:
        for scene in scenes:
            path = scene_dir(out, scene) / "result.pkl"
            if path.exists():
                info = path.stat()
                done[scene] = (info.st_ino, info.st_mtime_ns)
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # the driver, the nannies and the workers
    process.communicate()
    assert done, "no scene was written before the stop"
    # Written scenes survive the stop; everything written is whole.
    done = {s: (p.stat().st_ino, p.stat().st_mtime_ns) for s in scenes
            if (p := scene_dir(out, s) / "result.pkl").exists()}
    result = replay(config, ARCHIVE, out, workers=2, echo=lambda line: None)
    assert result.session == 2
    for scene, stamp in done.items():
        path = scene_dir(out, scene) / "result.pkl"
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
        assert not [r for r in _journal(out, scene) if r.get("session") == 2]
    status = {s["id"]: s["status"] for s in result.scenes}
    assert {s for s, v in status.items() if v == "resumed"} == set(done)
    assert set(status.values()) <= {"resumed", "scored"}
    assert compare_with_run(out, sequential) == []


def test_the_change_stage_carries_its_store_through_a_partition(workdir):
    """Hong Kong's two dates through cloud and change: date 2 is scored against the references
    date 1 committed to its partition's store, exactly as in the sequential run."""
    config = _write(workdir / "change.toml", _config_text([REPO / "nowhere"], change=True))
    sequential = _write(workdir / "change-sequential.toml", _config_text([HONGKONG], True))
    run_out, replay_out = workdir / "change-run", workdir / "change-replay"
    pipeline.run(sequential, run_out)
    result = replay(config, [HONGKONG], replay_out, workers=1, echo=lambda line: None)
    assert compare_with_run(replay_out, run_out) == []
    assert (replay_out / "state" / "hongkong" / "reference" / "manifest.json").exists()
    tiles = pq.read_table(replay_out / "tiles.parquet").to_pylist()
    date2 = [t for t in tiles if t["scene"] == "hongkong-20180323T000000"]
    assert any(t["change"] is not None for t in date2)  # references from date 1 were found
    assert all(t["change"] is None for t in tiles if t["scene"] == "hongkong-20160927T000000")
    assert (replay_out / "change-over-time.png").exists()
    assert result.failed == []


def test_partitions_follow_overlapping_footprints(test_data, tmp_path):
    config = load_config(_write(tmp_path / "replay.toml", _config_text([REPO / "nowhere"])))
    sample = discover(config, [HONGKONG, PARIS]).scenes
    crop = discover(config, [test_data / "oscd" / "hongkong"]).scenes
    # The test crop of Hong Kong lies inside the sample's footprint: one store for both.
    parts = partition([*sample, *crop])
    groups = {p.name: [s.id for s in p.scenes] for p in parts}
    assert len(groups) == 2
    assert len(groups["hongkong"]) == 4 and len(groups["paris"]) == 2
    assert overlapping_partitions(parts) == []
    # ... but the two give the same acquisition ids, which a run cannot tell apart.
    with pytest.raises(ConfigError, match="both give acquisition"):
        discover(config, [HONGKONG, test_data / "oscd" / "hongkong"])


def test_the_flight_runtime_never_loads_dask():
    code = ("import sys, onboard.runtime.replay, onboard.runtime.pipeline, "
            "onboard.runtime.cli.replay\n"
            "loaded = {m.split('.')[0] for m in sys.modules} & {'dask', 'distributed', "
            "'pyarrow'}\nassert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
