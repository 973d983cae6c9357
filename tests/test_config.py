"""The runtime config: TOML onto typed dataclasses, with errors that name the file and key."""

from __future__ import annotations

import pytest

from onboard.runtime.config import load_config
from onboard.runtime.errors import ConfigError

GOOD = """
telemetry = "telemetry.jsonl"
[cloud]
bundle = "bundles/cloud.onboard"
golden = "/opt/golden/cloud.onboard"
threads = 2
[cloud.gate]
max_cloud_fraction = 0.5
action = "demote"
[tiling]
tile = 128
overlap = 8
"""


def test_a_full_config_maps_onto_dataclasses(tmp_path):
    path = tmp_path / "onboard.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.cloud.bundle == tmp_path / "bundles" / "cloud.onboard"
    assert str(config.cloud.golden) == "/opt/golden/cloud.onboard"
    assert config.cloud.threads == 2 and config.cloud.backend == "onnxruntime"
    assert config.cloud_gate.max_cloud_fraction == 0.5 and config.cloud_gate.action == "demote"
    assert (config.tiling.tile, config.tiling.overlap) == (128, 8)
    assert config.telemetry == tmp_path / "telemetry.jsonl"


@pytest.mark.parametrize(("text", "message"), [
    ("[cloud]\nbundel = 'x'\n", r"\[cloud\]: unknown key\(s\) \['bundel'\]"),
    ("[cloud]\nbundle = 'x'\nthreads = 'two'\n", r"\[cloud\]\.threads: expected an integer"),
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\naction = 'explode'\n", "action must be one of"),
    ("[tiling]\ntile = 64\noverlap = 64\n", "overlap must be in"),
    ("[clouds]\n", r"unknown section\(s\) \['clouds'\]"),
    ("[cloud\n", "not valid TOML"),
])
def test_bad_configs_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(caught.value).startswith(str(path))


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: config file not found"):
        load_config(tmp_path / "nope.toml")
