"""pytest-benchmark: tile streaming throughput (run with `pytest bench/ --benchmark-only`).

The full Sentinel-2-tile-sized run with peak RSS is `python -m onboard.bench.stream_scene`.
"""

from __future__ import annotations

import pytest

from onboard.bench.stream_scene import write_scene
from onboard.runtime.sources.base import iter_tiles
from onboard.runtime.sources.geotiff import GeoTiffScene


@pytest.fixture(scope="module")
def scene_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "scene.tif"
    write_scene(path, 2048, 13, 256)
    return path


@pytest.mark.parametrize("overlap", [0, 32])
def test_stream_tiles(benchmark, scene_path, overlap):
    def stream():
        with GeoTiffScene(scene_path) as scene:
            return sum(1 for _ in iter_tiles(scene, 256, overlap))

    tiles = benchmark(stream)
    assert tiles >= 64
    benchmark.extra_info["mpx"] = 2048 * 2048 / 1e6
