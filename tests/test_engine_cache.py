"""The engine cache: a cached engine is used only when it is whole and verified, whatever killed
the process that wrote it.

Everything runs the real OpenVINO engine on the shipped INT8 OpenVINO cloud bundle: its compiled
model is exported into the cache and imported from it. (TensorRT keeps its plans in the same
:class:`EngineCache`; it cannot run on this machine.)

The kill test SIGKILLs processes that build and store the cache over one folder at random
points, ``ONBOARD_CACHE_KILLS`` times (default 50); after each kill the next open either imports
a verified entry or rebuilds, its outputs equal the uncached engine's, and nothing partial is
left. The processes are forked from one process that has already imported OpenVINO, so a trial
costs the time to the kill, not an interpreter start.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from onboard.runtime.durability import PARTIAL_SUFFIX
from onboard.runtime.engines import open_engine
from onboard.runtime.engines.cache import SUFFIX, EngineCache
from onboard.runtime.telemetry import Telemetry

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "models" / "cloud" / "cloud-4band-int8-ov.onboard"
KILLS = int(os.environ.get("ONBOARD_CACHE_KILLS", "50"))


@pytest.fixture(scope="module")
def tile() -> np.ndarray:
    # Real reflectance-like input, the bundle's tile size, a fixed seed: the same bytes for the
    # cached and the uncached engine.
    return np.random.default_rng(7).uniform(0.0, 0.4, (1, 4, 256, 256)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(tile: np.ndarray) -> np.ndarray:
    with open_engine(BUNDLE, "openvino", threads=1, warmup=0) as engine:
        return engine.run(tile)


def _open(cache: Path, telemetry: Telemetry | None = None):
    return open_engine(BUNDLE, "openvino", threads=1, warmup=0, cache_dir=cache,
                       telemetry=telemetry)


def _events(telemetry: Telemetry) -> list[str]:
    return [e["event"] for e in telemetry.events]


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(PARTIAL_SUFFIX)] \
        if folder.is_dir() else []


def test_the_second_open_imports_the_cached_engine_with_the_same_outputs(
        tmp_path: Path, tile: np.ndarray, reference: np.ndarray) -> None:
    telemetry = Telemetry()
    with _open(tmp_path, telemetry) as first:
        assert not first.from_cache and "engine_built" in _events(telemetry)
        assert np.array_equal(first.run(tile), reference)
    [entry] = tmp_path.glob(f"*{SUFFIX}")
    assert entry.name.startswith(first.bundle.sha256[:16])
    telemetry = Telemetry()
    with _open(tmp_path, telemetry) as second:
        assert second.from_cache and "engine_built" not in _events(telemetry)
        assert second.describe()["from_cache"] is True
        assert np.array_equal(second.run(tile), reference)
    # Other threads, another key: the cache never hands a blob built for other properties.
    with open_engine(BUNDLE, "openvino", threads=2, warmup=0, cache_dir=tmp_path) as third:
        assert not third.from_cache
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 2


@pytest.mark.parametrize("damage", ["cut", "flip", "header", "empty"])
def test_a_damaged_entry_is_reported_and_rebuilt_never_imported(
        tmp_path: Path, tile: np.ndarray, reference: np.ndarray, damage: str) -> None:
    _open(tmp_path).close()
    [entry] = tmp_path.glob(f"*{SUFFIX}")
    data = bytearray(entry.read_bytes())
    if damage == "cut":  # OpenVINO itself imports this blob one byte short without complaint
        data = data[:-1]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "header":
        data[:20] = b"x" * 20
    else:
        data = bytearray()
    entry.write_bytes(bytes(data))
    telemetry = Telemetry()
    with _open(tmp_path, telemetry) as engine:
        assert not engine.from_cache
        assert np.array_equal(engine.run(tile), reference)
    damaged = [e for e in telemetry.events if e["event"] == "engine_cache_damaged"]
    assert [e["path"] for e in damaged] == [str(entry)]
    assert "engine_built" in _events(telemetry)
    with _open(tmp_path) as again:  # the rebuilt entry replaced the damaged one
        assert again.from_cache


def test_a_verified_entry_that_does_not_import_is_rebuilt(tmp_path: Path, tile: np.ndarray,
                                                          reference: np.ndarray) -> None:
    """Whole and verified, but not an OpenVINO blob (another build's, say): rebuilt, reported."""
    _open(tmp_path).close()
    [entry] = tmp_path.glob(f"*{SUFFIX}")
    cache = EngineCache(tmp_path)
    key = entry.name[: -len(SUFFIX)]
    cache.store(key, b"not a compiled model" * 50)
    assert cache.load(key) == b"not a compiled model" * 50
    telemetry = Telemetry()
    with _open(tmp_path, telemetry) as engine:
        assert not engine.from_cache
        assert np.array_equal(engine.run(tile), reference)
    assert "engine_cache_unusable" in _events(telemetry)
    assert "engine_built" in _events(telemetry)


def test_a_cache_that_cannot_be_written_leaves_the_engine_running_uncached(
        tmp_path: Path, tile: np.ndarray, reference: np.ndarray) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    telemetry = Telemetry()
    with _open(blocker / "cache", telemetry) as engine:
        assert not engine.from_cache
        assert np.array_equal(engine.run(tile), reference)
    unusable = [e for e in telemetry.events if e["event"] == "engine_cache_unusable"]
    assert len(unusable) == 1 and "not-a-folder" in unusable[0]["message"]


def test_the_cache_checks_length_digest_and_header(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    assert cache.load("k") is None and cache.damaged == []
    path = cache.store("model GPU.0 (sm 87)/x", b"\x00" * 10 + b"blob")
    assert path.parent == tmp_path and "/" not in path.name[:-len(SUFFIX)]
    assert cache.load("model GPU.0 (sm 87)/x") == b"\x00" * 10 + b"blob"
    path.write_bytes(path.read_bytes() + b"!")
    assert cache.load("model GPU.0 (sm 87)/x") is None and cache.damaged == [path]


def _wait_for_partial(folder: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with os.scandir(folder) if folder.is_dir() else contextlib.nullcontext([]) as entries:
            if any(e.name.endswith(PARTIAL_SUFFIX) for e in entries):
                return True
        time.sleep(0.0002)  # leave the builder the CPU
    return False


# -- SIGKILL at random points -------------------------------------------------------------------

# A process that imports OpenVINO once and forks a builder on each "fork" line; "reap PID"
# waits for a killed builder and reports how it ended. A builder opens the engine over the cache
# (build and store, or import) in a loop, dropping the entry now and then so that it is built
# and stored again: kills land while compiling, exporting, writing, renaming or importing.
_ZYGOTE = textwrap.dedent("""
    import os, random, sys
    from pathlib import Path
    import numpy as np
    import openvino  # noqa: F401 - imported once, before the forks
    from onboard.runtime.engines import open_engine
    from onboard.runtime.engines.cache import SUFFIX

    bundle, cache, log = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    print("ready", flush=True)
    for line in sys.stdin:
        command, arg = line.split()
        if command == "reap":
            _, status = os.waitpid(int(arg), 0)
            print(os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status),
                  flush=True)
            continue
        pid = os.fork()
        if pid:
            print(pid, flush=True)
            continue
        try:
            rng = random.Random(int(arg))
            while True:
                engine = open_engine(bundle, "openvino", threads=1, warmup=0, cache_dir=cache)
                engine.close()
                if rng.random() < 0.6:
                    for entry in cache.glob("*" + SUFFIX):
                        entry.unlink()
        except BaseException:
            import traceback
            with open(log, "a") as handle:
                traceback.print_exc(file=handle)
            os._exit(3)
""")


def test_kills_while_building_and_storing_the_cache_never_load_a_half_written_engine(
        tmp_path: Path, tile: np.ndarray, reference: np.ndarray) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "builder.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(BUNDLE), str(cache), str(log)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env, cwd=tmp_path)
    assert zygote.stdin is not None and zygote.stdout is not None
    rng = random.Random(2026)
    seen = {"imported": 0, "rebuilt": 0, "partial_left": 0, "entry_present": 0}
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for trial in range(KILLS):
            zygote.stdin.write(f"fork {trial}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            if trial % 2:
                # Anywhere: a builder cycle is about 0.1 s here, kills spread over two.
                time.sleep(rng.uniform(0.0, 0.2))
            else:
                # In the few milliseconds a store takes: as soon as its temporary file shows.
                _wait_for_partial(cache, timeout=1.0)
            os.kill(pid, signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            ended = int(zygote.stdout.readline())
            assert ended == signal.SIGKILL, \
                f"trial {trial}: the builder ended with {ended}, not SIGKILL: " \
                f"{log.read_text() if log.exists() else ''}"

            seen["partial_left"] += bool(_partials(cache))
            seen["entry_present"] += bool(list(cache.glob(f"*{SUFFIX}")))
            telemetry = Telemetry()
            with _open(cache, telemetry) as engine:
                assert not _partials(cache), f"trial {trial}: partial files after the open"
                events = _events(telemetry)
                # Written atomically: an entry is whole or absent, never damaged.
                assert "engine_cache_damaged" not in events, f"trial {trial}: {telemetry.events}"
                assert "engine_cache_unusable" not in events, f"trial {trial}"
                assert engine.from_cache != ("engine_built" in events)
                seen["imported" if engine.from_cache else "rebuilt"] += 1
                assert np.array_equal(engine.run(tile), reference), f"trial {trial}"
            [entry] = cache.glob(f"*{SUFFIX}")
            assert EngineCache(cache).load(entry.name[: -len(SUFFIX)]) is not None
    finally:
        zygote.kill()
        zygote.wait()
    print(f"\n{KILLS} kills: {seen}")
    assert seen["imported"] + seen["rebuilt"] == KILLS
    # The kills did land mid-store (a temporary file left behind), not only between stores.
    assert seen["partial_left"] >= 1


def test_a_config_cache_dir_reaches_the_engine_of_the_stage(tmp_path: Path) -> None:
    """``[cloud] cache_dir`` (relative to the config file) is where the stage's engine keeps its
    compiled model: the second stage built from the same config imports it."""
    from onboard.runtime.config import config_from_dict
    from onboard.runtime.stages.base import StageContext
    from onboard.runtime.stages.cloud import build_cloud_stage

    config = config_from_dict({"cloud": {"bundle": str(BUNDLE), "backend": "openvino",
                                         "threads": 1, "cache_dir": "engines"}}, base=tmp_path)
    section = config.section("cloud")
    assert section.cache_dir == tmp_path / "engines"
    telemetry = Telemetry(None)
    stages = [build_cloud_stage(section, StageContext(telemetry, tmp_path / "state"))
              for _ in range(2)]
    try:
        assert [s.engine.from_cache for s in stages] == [False, True]
        assert list((tmp_path / "engines").iterdir())
    finally:
        for stage in stages:
            stage.engine.close()
