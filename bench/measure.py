"""What every benchmark shares: fresh-process measurements, latency statistics, real tiles."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "runtime" / "sample" / "hongkong"
RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency_stats(seconds: list[float], per_call: int = 1) -> dict[str, float]:
    """p50, p99 and minimum in ms per call and per tile of a list of call times."""
    ms = np.asarray(seconds, np.float64) * 1e3
    p50, p99, low = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)),
                     float(ms.min()))
    return {"p50_ms": p50 / per_call, "p99_ms": p99 / per_call, "min_ms": low / per_call,
            "calls": len(seconds)}


def timed_calls(fn: Any, calls: int, budget_s: float | None = None,
                least: int = 3) -> list[float]:
    """Seconds of each of ``calls`` calls of ``fn``; past ``budget_s`` it stops once ``least``
    calls are in (a 2 s-per-tile peer must not take minutes of a quick run)."""
    import time

    times: list[float] = []
    started = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if budget_s is not None and len(times) >= least \
                and time.perf_counter() - started > budget_s:
            break
    return times


def in_child(module: str, spec: dict[str, Any], threads: int | None = None,
             timeout_s: float = 900) -> dict[str, Any]:
    """``python -m module --child SPEC`` in a fresh process (so that its peak RSS and its
    thread pools are its own); its last stdout line is the JSON result, or an ``error``."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    load = os.getloadavg()[0]
    try:
        out = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)],
                             capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:g} s", "load_avg_1m": round(load, 2)}
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {out.returncode}",
                "load_avg_1m": round(load, 2)}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_avg_1m"] = round(load, 2)
    return result


@cache
def sample_scene_dn() -> tuple[np.ndarray, tuple[str, ...]]:
    """All 13 bands of the bundled sample's first date (real Sentinel-2 L1C DN, 256 × 256)."""
    from onboard.runtime.sources.oscd import OscdScene
    from onboard.runtime.windows import Window

    scene = OscdScene(SAMPLE / "imgs_1")
    frame = scene.read(Window(0, 0, scene.height, scene.width))
    return frame.pixels, frame.bands


def sample_tiles(bands: list[str], n: int, size: int) -> np.ndarray:
    """``n`` real (len(bands), size, size) DN tiles cut from the sample (flipped and rolled
    copies, tiled up when ``size`` exceeds it)."""
    from onboard.runtime.bands import resolve_band_indices

    pixels, names = sample_scene_dn()
    chosen = pixels[resolve_band_indices(list(names), bands, "sample")]
    reps = -(-size // chosen.shape[1])
    base = np.tile(chosen, (1, reps, reps))[:, :size, :size]
    out = np.empty((n, len(bands), size, size), pixels.dtype)
    for i in range(n):
        tile = np.roll(base, (37 * i, 61 * i), axis=(1, 2))
        out[i] = tile[:, ::-1] if i % 2 else tile
    return out
