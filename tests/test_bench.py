"""``onboard bench``: the quick matrix on the shipped cloud bundles, the HIL client against a
loopback server, and the energy meter. No timing is asserted: only that every figure is
measured, written and charted, and that results over the link equal a local run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

import onboard.runtime.stages  # noqa: F401 - registers the stage sections
from onboard.bench.hil import run_hil, sample_frames
from onboard.bench.power import EnergyMeter
from onboard.runtime.cli import main
from onboard.runtime.config import load_config
from onboard.runtime.pipeline import SAMPLE_CONFIG
from onboard.runtime.serve import FrameServer, ServeOptions

REPO = Path(__file__).resolve().parents[1]
CLOUD_BUNDLES = sorted((REPO / "models" / "cloud").glob("*.onboard"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_bench_on_the_cloud_bundles(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out), *map(str, CLOUD_BUNDLES)]) == 0
    printed = capsys.readouterr().out
    assert "Mpx/s" in printed
    result = json.loads((out / "bench.json").read_text())
    rows = result["matrix"]
    bundles = [r for r in rows if not r.get("peer_of")]
    assert {r["bundle"] for r in bundles} == {p.name for p in CLOUD_BUNDLES}
    for row in bundles:
        assert "error" not in row and "skipped" not in row, row
        assert row["mpx_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["peak_rss_mb"] > 0 and row["size_kb"] > 0
        # Ratios against the same model in PyTorch eager and ukis-csmask through our engine.
        assert f"{row['model']} (PyTorch eager)" in row["vs"]
        assert any(name.startswith("ukis-csmask") for name in row["vs"])
        # Energy is measured where the board says, and otherwise n/a with the reason.
        if row["energy_source"] in ("rapl", "jetson-ina3221"):
            assert row["energy_j_per_mpx"] > 0
        else:
            assert row["energy_j_per_mpx"] is None and row["energy_source"]
    peers = {r["model"] for r in rows if r.get("peer_of")}
    assert {"cloud-4band (PyTorch eager)", "ukis-csmask-4b (same engine)", "s2cloudless"} <= peers
    e2e = result["end_to_end"]["runs"]
    assert e2e and all(r["mpx_per_s"] > 0 and r["timings_s"]["cloud"] > 0 for r in e2e)
    text = (out / "bench.md").read_text()
    assert "| model | backend | precision | threads |" in text and "## End to end" in text
    for name in ("throughput.png", "latency.png", "end_to_end.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_hil_equals_a_local_run_over_loopback():
    """Stream the sample to a loopback server below and above its capacity: below, every
    frame is scored and equals the local run; above, every frame is still answered (scored or
    dropped, none lost) and the scored ones equal too."""
    with tempfile.TemporaryDirectory() as tmp:
        server = FrameServer(load_config(SAMPLE_CONFIG), Path(tmp) / "state",
                             ServeOptions(port=0, queue_frames=2)).start()
        try:
            report = run_hil(server.address, SAMPLE_CONFIG, sample_frames(3))
        finally:
            server.shutdown()
    assert report["board_capacity_mpx_s"] > 0 and report["hello"]["protocol"] == 1
    below, above = report["runs"]
    assert below["line_rate_px_s"] < above["line_rate_px_s"]
    for run in (below, above):
        assert run["frames"] == 6 and run["scored"] + run["dropped"] == 6
        assert run["errors"] == [] and run["client_error"] is None
        assert run["scored_equal"], run.get("mismatch")
        assert run["latency_s"]["p50"] > 0 and run["sustained_mpx_s"] > 0
    assert below["equal"], below.get("mismatch")
    assert "equal" not in above  # above capacity drops are counted, not failed


def test_energy_is_measured_or_says_why():
    meter = EnergyMeter()
    with meter.measure() as energy:
        sum(range(100000))
    if meter.available is None:
        assert energy.joules is not None and energy.joules >= 0
    else:
        assert energy.joules is None and energy.source == meter.available
        assert energy.per_mpx(1.0) is None and energy.describe().startswith("n/a")
