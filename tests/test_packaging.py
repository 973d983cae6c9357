"""Packaging: the installed distribution, its CLI, and a flight runtime free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    mapping = {"runtime": "onboard.runtime", "compile": "onboard.compile",
               "models": "onboard.models", "bench": "onboard.bench"}
    found = set()
    for top, name in mapping.items():
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_runtime_streams_a_scene_without_importing_torch(sample_pass):
    code = (
        "import sys\n"
        "import onboard.runtime as rt\n"
        "from onboard.runtime.sources.base import iter_tiles\n"
        f"pair = rt.OscdPair({str(sample_pass)!r})\n"
        "n = sum(1 for _ in iter_tiles(pair.before, 64, 8))\n"
        "assert n > 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'nncf', 'openvino'})\n"
        "print(n, bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_version_and_help():
    out = subprocess.run(["onboard", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("onboard ")
    helptext = subprocess.run(["onboard", "--help"], capture_output=True, text=True,
                              check=True).stdout
    assert "info" in helptext


def test_info_on_the_sample_pass(sample_pass):
    out = subprocess.run(["onboard", "info", str(sample_pass)], capture_output=True, text=True,
                         check=True).stdout
    assert "OSCD city, 2 dates" in out and "EPSG:4326" in out
    assert "B8A" in out and "19.25 m" in out and "57.76 m" in out  # 20 m and 60 m bands
    assert "tiles 64×64, ZSTD" in out


def test_info_json_on_a_geotiff(test_data):
    import json

    path = test_data / "oscd" / "paris" / "cm" / "paris-cm.tif"
    info = json.loads(subprocess.run(["onboard", "info", "--json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["kind"] == "geotiff" and info["size"] == {"height": 96, "width": 120}
    assert info["crs"] == "EPSG:4326" and info["bands"][0]["dtype"] == "uint8"


def test_info_on_a_bad_file_names_it_and_fails(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + bytes(50))
    result = subprocess.run(["onboard", "info", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "broken.tif" in result.stderr and "Traceback" not in result.stderr
