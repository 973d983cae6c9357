"""The runtime config: TOML onto typed dataclasses, with errors that name the file and key."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

import onboard.runtime.pipeline  # noqa: F401 - registers the pipeline's and the stages' sections
from onboard.runtime.config import build, load_config, register_section, sections
from onboard.runtime.errors import ConfigError

GOOD = """
[source]
kind = "oscd"
paths = ["cities/hongkong"]
[cloud]
bundle = "bundles/cloud.onboard"
golden = "/opt/golden/cloud.onboard"
threads = 2
[cloud.gate]
max_cloud_fraction = 0.5
action = "demote"
count_shadow = true
[tiling]
tile = 128
halo = 8
[telemetry]
budget_bytes = 100000
"""


def test_a_full_config_maps_onto_dataclasses(tmp_path):
    path = tmp_path / "onboard.toml"
    path.write_text(GOOD)
    config = load_config(path)
    cloud = config.section("cloud")
    assert cloud.bundle == tmp_path / "bundles" / "cloud.onboard"
    assert str(cloud.golden) == "/opt/golden/cloud.onboard"
    assert cloud.threads == 2 and cloud.backend == "onnxruntime"
    assert cloud.gate.max_cloud_fraction == 0.5 and cloud.gate.action == "demote"
    assert cloud.gate.count_shadow is True
    assert (config.section("tiling").tile, config.section("tiling").halo) == (128, 8)
    assert config.section("source").paths == (tmp_path / "cities" / "hongkong",)
    assert config.section("telemetry").budget_bytes == 100000
    # A section the file does not have comes with its defaults.
    assert config.section("buffer").policy == "block"


@pytest.mark.parametrize(("text", "message"), [
    ("[cloud]\nbundel = 'x'\n", r"\[cloud\]: unknown key\(s\) \['bundel'\]"),
    ("[cloud]\nbundle = 'x'\nthreads = 'two'\n", r"\[cloud\]\.threads: expected an integer"),
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\naction = 'explode'\n",
     r"\[cloud\]\.gate\.action: expected one of \['drop', 'demote'\]"),
    # A string where a boolean belongs is an error, not a truthy value.
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\ncount_shadow = 'no'\n",
     r"count_shadow: expected true or false, got 'no'"),
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\nmax_cloud_fraction = true\n", "expected a number"),
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\nmax_cloud_fraction = 1.5\n", r"must be in \[0, 1\]"),
    ("[cloud]\nbundle = 'x'\n[cloud.gate]\nlimit = 1\n", r"\[cloud\]\.gate: unknown key"),
    ("[cloud]\ngolden = 'x'\n", r"\[cloud\]: missing key\(s\) \['bundle'\]"),
    ("[tiling]\ntile = 64\nhalo = 65\n", "halo must be in"),
    ("[tiling]\ntile = 100000\n", "tile must be in"),
    ("[source]\nkind = 'ftp'\n", r"\[source\]\.kind: expected one of"),
    ("[source]\npaths = 'a'\n", r"\[source\]\.paths: expected an array"),
    ("[clouds]\n", r"unknown section\(s\) \['clouds'\]"),
    ("tiling = 3\n", r"\[tiling\]: expected a table"),
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


@dataclass(frozen=True)
class _Inner:
    when: datetime
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Outer:
    name: str
    inner: _Inner
    tags: tuple[str, ...] = ()
    limit: float | None = None


def test_the_mapper_converts_nested_tables_lists_dates_and_optionals():
    value = build(_Outer, {"name": "a", "inner": {"when": "2018-03-23T10:00:00Z",
                                                  "weights": {"x": 1}},
                           "tags": ["p", "q"], "limit": 3}, "[outer]", Path("."))
    assert value.inner.when == datetime(2018, 3, 23, 10, tzinfo=timezone.utc)
    assert value.inner.weights == {"x": 1.0} and isinstance(value.inner.weights["x"], float)
    assert value.tags == ("p", "q") and value.limit == 3.0
    with pytest.raises(ConfigError, match=r"\[outer\]\.inner\.when: expected a date-time"):
        build(_Outer, {"name": "a", "inner": {"when": "soon"}}, "[outer]", Path("."))
    with pytest.raises(ConfigError, match=r"\[outer\]\.limit: expected a finite number"):
        build(_Outer, {"name": "a", "inner": {"when": "2018-01-01"}, "limit": float("nan")},
              "[outer]", Path("."))


def test_sections_are_registered_by_their_owners_and_config_imports_no_stage():
    import onboard.runtime.config as config_module

    assert {"source", "tiling", "buffer", "telemetry", "aoi", "cloud"} <= set(sections())
    imports = [line for line in Path(config_module.__file__).read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert imports and not any("stages" in line or "pipeline" in line for line in imports)
    with pytest.raises(TypeError, match="already registered"):
        register_section("cloud", _Outer)
