"""Fuzzing that lasts: hypothesis drives damaged inputs into every reader a hostile or unlucky
link reaches (TIFF, bundle, config, the hardware-in-loop frame header). Each must answer with an
:class:`OnboardError` naming the problem, or read the input, never a traceback of another kind.

The budget is small in the default run; ``ONBOARD_FUZZ_EXAMPLES`` raises it for a campaign.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onboard.runtime.bundle import Bundle
from onboard.runtime.config import config_from_dict
from onboard.runtime.errors import BundleError, ConfigError, OnboardError
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.tcp import FrameHeader
from onboard.runtime.windows import Window

REPO = Path(__file__).resolve().parents[1]
TIFF = REPO / "tests" / "data" / "oscd" / "paris" / "imgs_1" / "paris_B02.tif"
BUNDLE = REPO / "models" / "cloud" / "cloud-4band-int8-ort.onboard"
EXAMPLES = int(os.environ.get("ONBOARD_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# (offset, new byte) pairs, biased to the header where the layout lives.
_EDITS = st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=8)


def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for offset, value in edits:
        out[offset % len(out)] = value
    return bytes(out[:cut] if cut else out)


@FUZZ
@given(edits=_EDITS, cut=st.one_of(st.none(), st.integers(8, 4096)))
def test_a_damaged_tiff_is_read_or_refused_cleanly(tmp_path, edits, cut):
    path = tmp_path / "damaged.tif"
    path.write_bytes(_mutated(TIFF.read_bytes(), edits, cut))
    try:
        with GeoTiffScene(path) as scene:
            scene.read(Window(0, 0, min(scene.height, 64), min(scene.width, 64)))
    except OnboardError as error:
        assert str(path) in str(error)  # the message names the file


@FUZZ
@given(position=st.integers(0, 10**9), value=st.integers(1, 255))
def test_every_changed_byte_of_a_bundle_is_refused(tmp_path, position, value):
    data = bytearray(BUNDLE.read_bytes())
    index = position % len(data)
    data[index] ^= value  # a real change of that byte
    path = tmp_path / "damaged.onboard"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as caught:
        Bundle.open(path)
    assert str(path) in str(caught.value)


_TOML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_SECTIONS = st.sampled_from(["source", "tiling", "buffer", "telemetry", "cloud", "change",
                             "planner", "products", "storage", "link", "aoi", "signatures",
                             "cfdp", "passes", "nonsense"])


@FUZZ
@given(data=st.dictionaries(_SECTIONS, _TOML_VALUES, max_size=4))
def test_any_config_is_mapped_or_refused_with_a_config_error(data):
    import onboard.runtime.pipeline  # noqa: F401 - registers every section

    try:
        config_from_dict(data, where="fuzz.toml")
    except ConfigError as error:
        assert str(error).startswith("fuzz.toml")


def _header_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


@FUZZ
@given(header=st.one_of(
    st.binary(max_size=200),
    st.builds(_header_bytes, _TOML_VALUES),
    st.builds(_header_bytes, st.fixed_dictionaries(
        {"id": st.text(max_size=10), "shape": st.lists(st.integers(-5, 10**6), max_size=4),
         "dtype": st.sampled_from(["uint16", "float32", "int64", "bogus"]),
         "bands": st.lists(st.text(max_size=5), max_size=4)},
        optional={"transform": st.lists(st.floats(), max_size=7),
                  "crs_epsg": st.integers(-1, 10**6), "acquired": st.text(max_size=12),
                  "nodata": st.floats()}))),
    payload=st.integers(0, 10**9))
def test_any_frame_header_is_parsed_or_refused_with_a_protocol_error(header, payload):
    try:
        parsed = FrameHeader.parse(header, payload)
    except OnboardError:
        return
    assert parsed.payload_bytes == payload  # accepted only when it matches its payload
