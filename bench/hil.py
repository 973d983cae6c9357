"""Hardware-in-loop: play the instrument against ``onboard serve`` and check what comes back.

    onboard bench --hil HOST:PORT [--line-rate PX_S ...] [--frames N]

The host cuts a scene into frames of whole lines, as a push-broom instrument delivers it, and
sends each frame when the instrument would have finished it at the given line rate (pixels of
13-band input per second). It measures, per frame, the end-to-end latency (from the moment the
frame was complete at the instrument to the moment its decisions are back), the sustained
throughput, the frames the board dropped (its queue was full) and the frames the link deferred
(they could not leave on time because the board was not reading), and checks that every result
equals a local ``Pipeline.score`` of the same frame with the same config.

Without ``--line-rate`` it first measures the board's capacity (frames sent one at a time),
then streams at half of it (no frame may be dropped; the results must equal the local run)
and at three times it (frames are dropped or deferred, and counted).
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.sources.tcp import (
    FrameHeader,
    ReceivedFrame,
    end_message,
    header_for,
    iter_replies,
    send_frame,
)
from onboard.runtime.windows import Window


@dataclass
class HilFrame:
    header: FrameHeader
    pixels: np.ndarray

    @property
    def pixels_2d(self) -> int:
        return self.header.shape[1] * self.header.shape[2]


def frames_of(scene: Any, prefix: str, lines: int | None = None, nodata: float | None = None,
              repeat: int = 1) -> list[HilFrame]:
    """``scene`` (all bands) cut into frames of ``lines`` full-width lines (default: one frame),
    ``repeat`` times over, each with its own id."""
    lines = lines or scene.height
    out = []
    for r in range(repeat):
        for k, row in enumerate(range(0, scene.height, lines)):
            frame = scene.read(Window(row, 0, min(lines, scene.height - row), scene.width))
            ident = f"{prefix}-r{r:02d}-f{k:03d}"
            out.append(HilFrame(header_for(frame, ident, place=prefix, nodata=nodata),
                                frame.pixels))
    return out


def sample_frames(repeat: int = 4) -> list[HilFrame]:
    """Both dates of the bundled sample (date 2 on date 1's grid, 0 = no data outside it),
    alternating, ``repeat`` times: 256 × 256 × 13-band frames."""
    from onboard.bench.measure import SAMPLE
    from onboard.runtime.sources.oscd import OscdScene

    first = OscdScene(SAMPLE / "imgs_1")
    second = OscdScene(SAMPLE / "imgs_2", grid=first.grid)
    a, b = frames_of(first, "hongkong1"), frames_of(second, "hongkong2", nodata=0)
    out = []
    for r in range(repeat):
        for f in (a[0], b[0]):
            out.append(HilFrame(replace(f.header, id=f"{f.header.place}-r{r:02d}"), f.pixels))
    return out


def local_results(config_path: Path, frames: list[HilFrame]) -> tuple[dict[str, list], float]:
    """Each frame's tile scores from a local pipeline built from the same config, and the
    local scoring rate (Mpx/s)."""
    from onboard.runtime.config import load_config
    from onboard.runtime.pipeline import Acquisition, Pipeline
    from onboard.runtime.telemetry import Telemetry

    out: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = Pipeline(load_config(config_path), Telemetry(keep=False), Path(tmp))
        try:
            t0 = time.perf_counter()
            for f in frames:
                scene = ReceivedFrame(f.header, f.pixels)
                result = pipeline.score(Acquisition(f.header.id, f.header.place, scene,
                                                    f.header.acquired))
                out[f.header.id] = [s.to_dict() for s in result.scores]
            seconds = time.perf_counter() - t0
        finally:
            pipeline.close()
    return out, sum(f.pixels_2d for f in frames) / 1e6 / seconds


@dataclass
class _Session:
    replies: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    hello: dict[str, Any] | None = None
    error: str | None = None
    got_hello: threading.Event = field(default_factory=threading.Event)


def _collect(sock: socket.socket, session: _Session) -> None:
    try:
        for reply in iter_replies(sock):
            if reply["type"] == "telemetry":
                continue
            if reply["type"] == "hello":
                session.hello = reply
                session.got_hello.set()
            session.replies.append((time.monotonic(), reply))
    except Exception as error:  # reported in the run's result, never swallowed
        session.error = f"{type(error).__name__}: {error}"
    finally:
        session.got_hello.set()


def _answered(session: _Session) -> int:
    return sum(1 for _, r in list(session.replies) if r["type"] in ("result", "dropped", "error"))


def stream(address: tuple[str, int], frames: list[HilFrame], line_rate_px_s: float | None,
           timeout_s: float = 120.0) -> dict[str, Any]:
    """Send ``frames`` at ``line_rate_px_s`` (None: each as soon as the last is answered) and
    gather the replies."""
    sock = socket.create_connection(address, timeout=timeout_s)
    session = _Session()
    reader = threading.Thread(target=_collect, args=(sock, session), daemon=True)
    reader.start()
    session.got_hello.wait(timeout_s)
    if session.hello is None:
        sock.close()
        raise ConnectionError(f"{address[0]}:{address[1]}: no hello from the server "
                              f"({session.error or 'timed out'})")
    due: dict[str, float] = {}
    sent_late: dict[str, float] = {}
    t0 = time.monotonic()
    elapsed_px = 0
    for f in frames:
        elapsed_px += f.pixels_2d
        if line_rate_px_s is None:
            # One at a time, at the board's own pace: its capacity.
            deadline = time.monotonic() + timeout_s
            while (_answered(session) < len(due) and session.error is None
                   and time.monotonic() < deadline):
                time.sleep(0.002)
            when = time.monotonic()
        else:
            when = t0 + elapsed_px / line_rate_px_s  # the frame's last line is read out
            pause = when - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        due[f.header.id] = when
        started = time.monotonic()
        send_frame(sock, replace(f.header, extra={"due": when}), f.pixels)
        sent_late[f.header.id] = started - when
    sock.sendall(end_message())
    reader.join(timeout_s)
    sock.close()
    return {"t0": t0, "due": due, "late_s": sent_late, "replies": session.replies,
            "hello": session.hello, "error": session.error}


def summarise(run: dict[str, Any], frames: list[HilFrame], label: str,
              line_rate_px_s: float | None, expected: dict[str, list] | None,
              check_all: bool = True) -> dict[str, Any]:
    by_id = {f.header.id: f for f in frames}
    results = {r["id"]: (t, r) for t, r in run["replies"] if r["type"] == "result"}
    dropped = [r["id"] for _, r in run["replies"] if r["type"] == "dropped"]
    errors = [r for _, r in run["replies"] if r["type"] == "error"]
    latencies = [t - run["due"][ident] for ident, (t, _) in results.items()]
    period = {ident: by_id[ident].pixels_2d / line_rate_px_s for ident in by_id} \
        if line_rate_px_s else {}
    # Deferred: it left the host more than one frame period (at least 50 ms) after it was
    # complete, because the board was not reading (TCP backpressure).
    deferred = [i for i, late in run["late_s"].items() if line_rate_px_s
                and late > max(period[i], 0.05)]
    last = max((t for t, _ in results.values()), default=run["t0"])
    scored_px = sum(by_id[i].pixels_2d for i in results)
    out: dict[str, Any] = {
        "label": label, "line_rate_px_s": line_rate_px_s or 0.0, "frames": len(frames),
        "frame_shape": list(frames[0].header.shape), "scored": len(results),
        "dropped": len(dropped), "deferred": len(deferred),
        "errors": [e.get("message") for e in errors], "client_error": run["error"],
        "sustained_mpx_s": scored_px / 1e6 / max(last - run["t0"], 1e-9),
        "latency_s": {"p50": float(np.percentile(latencies, 50)),
                      "p99": float(np.percentile(latencies, 99)),
                      "max": float(np.max(latencies))} if latencies else {},
        "board_scoring_s": {"p50": float(np.median([r["scored_s"] for _, r in
                                                     results.values()]))} if results else {},
        "board_waiting_s": {"p50": float(np.median([r["waited_s"] for _, r in
                                                     results.values()]))} if results else {},
    }
    if expected is not None:
        # Every scored frame must equal the local run, above capacity too (a drop must never
        # corrupt another frame); below capacity every frame must also have been scored.
        mismatched = [i for i, (_, r) in results.items() if r["tiles"] != expected.get(i)]
        out["scored_equal"] = not mismatched
        if mismatched:
            out["mismatch"] = f"{len(mismatched)} scored frames differ (first {mismatched[0]})"
        if check_all:
            missing = sorted(set(expected) - set(results))
            out["equal"] = not mismatched and not missing
            if missing:
                out["mismatch"] = (out.get("mismatch", "") + f"; {len(missing)} frames not "
                                   f"scored (dropped {len(dropped)})").lstrip("; ")
    return out


def run_hil(address: tuple[str, int], config_path: Path, frames: list[HilFrame] | None = None,
            line_rates: list[float] | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """The HIL campaign (see the module docstring); returns the report's ``hil`` section."""
    frames = frames or sample_frames()
    expected, local_mpx_s = local_results(config_path, frames)
    report: dict[str, Any] = {"address": f"{address[0]}:{address[1]}",
                              "frame_shape": list(frames[0].header.shape),
                              "local_scoring_mpx_s": local_mpx_s, "runs": []}
    calibration = stream(address, frames[: min(len(frames), 4)], None, timeout_s)
    report["hello"] = calibration["hello"]
    cal = summarise(calibration, frames[:4], "one at a time", None, None)
    board = cal["board_scoring_s"].get("p50")
    report["board_capacity_mpx_s"] = frames[0].pixels_2d / 1e6 / board if board else None
    if not line_rates:
        capacity = (report["board_capacity_mpx_s"] or local_mpx_s) * 1e6
        line_rates = [0.5 * capacity, 3.0 * capacity]
    capacity_px = (report["board_capacity_mpx_s"] or local_mpx_s) * 1e6
    for rate in line_rates:
        below = rate < capacity_px
        run = stream(address, frames, rate, timeout_s)
        label = f"{rate / capacity_px:.1f}× capacity"
        report["runs"].append(summarise(run, frames, label, rate, expected, check_all=below))
    return report
