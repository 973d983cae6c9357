"""pytest-benchmark micro-benchmarks of the HIL link and the engines (``pytest bench/
--benchmark-only``; outside the default test run, whose testpaths is tests/)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from onboard.bench.measure import REPO, sample_scene_dn
from onboard.runtime.sources.tcp import (
    FrameHeader,
    Limits,
    ReceivedFrame,
    read_payload,
    read_prefix,
    send_frame,
)
from onboard.runtime.windows import CoreGrid


@pytest.fixture(scope="module")
def frame():
    pixels, bands = sample_scene_dn()
    big = np.tile(pixels, (1, 4, 4))  # 1024 × 1024 × 13 uint16: 27 MB, a strip of a scene
    header = FrameHeader("bench", tuple(big.shape), "uint16", bands, gsd_m=10.0)
    return header, big


def test_frame_over_loopback(benchmark, frame):
    """One 1024² × 13 frame through a socket pair: preamble, header, payload into its array."""
    header, pixels = frame
    a, b = socket.socketpair()

    def round_trip():
        sender = threading.Thread(target=send_frame, args=(a, header, pixels))
        sender.start()
        prefix = read_prefix(b, Limits())
        got = read_payload(b, FrameHeader.parse(prefix.header, prefix.payload_len))
        sender.join()
        return got

    with a, b:
        got = benchmark(round_trip)
    np.testing.assert_array_equal(got, pixels)
    benchmark.extra_info["mpx"] = pixels.shape[1] * pixels.shape[2] / 1e6


def test_windows_of_a_received_frame(benchmark, frame):
    """What the pipeline's reader does with a received frame: every tile window (256, halo
    16) of the stage's four bands."""
    header, pixels = frame
    scene = ReceivedFrame(header, pixels)
    grid = list(CoreGrid(scene.height, scene.width, 256, 16))

    def read_all():
        return sum(scene.read(p.window, ["blue", "green", "red", "nir"]).pixels.shape[0]
                   for p in grid)

    assert benchmark(read_all) == 4 * len(grid)


@pytest.mark.parametrize("bundle", ["cloud-4band-int8-ort", "cloud-4band-int8-ov"])
def test_cloud_engine_batch(benchmark, bundle):
    """The INT8 cloud engine on 4 real 256² tiles, 2 threads."""
    from onboard.bench.measure import sample_tiles
    from onboard.runtime.engines import open_engine

    backend = "openvino" if bundle.endswith("-ov") else "onnxruntime"
    pytest.importorskip(backend)
    engine = open_engine(REPO / "models" / "cloud" / f"{bundle}.onboard", backend, threads=2,
                         batch_size=4, warmup=2)
    x = np.stack([engine.input_spec.normalise(t)
                  for t in sample_tiles(list(engine.input_spec.bands), 4, 256)])
    try:
        out = benchmark(engine.run, x.astype(np.float32))
    finally:
        engine.close()
    assert out.shape[0] == 4
    benchmark.extra_info["mpx"] = 4 * 256 * 256 / 1e6
