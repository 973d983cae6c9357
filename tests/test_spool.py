"""The spool: each complete file once, in arrival order, surviving a crash; bad files set aside."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from onboard.runtime.errors import OnboardError, SpoolError, StorageError
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.spool import Spool, SpoolItem
from onboard.runtime.telemetry import Telemetry


def _arrive(spool_dir, source, name, t):
    """An instrument writing ``name`` atomically (temporary name, then rename) at time ``t``."""
    tmp = spool_dir / f"{name}.part"
    shutil.copy(source, tmp)
    os.utime(tmp, ns=(t, t))
    tmp.rename(spool_dir / name)


@pytest.fixture
def scene_files(test_data):
    return sorted((test_data / "oscd" / "paris" / "imgs_1").glob("*.tif"))


def _read(item: SpoolItem) -> dict:
    with GeoTiffScene(item.path) as scene:
        return {"pixels": scene.height * scene.width}


def test_files_are_handled_once_in_arrival_order(tmp_path, scene_files):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    base = 1_700_000_000_000_000_000
    # names deliberately out of time order
    for i, name in enumerate(["c.tif", "a.tif", "b.tif"]):
        _arrive(spool_dir, scene_files[i], name, base + i * 10**9)
    (spool_dir / "d.tif.part").write_bytes(b"II*\x00half written")  # not yet renamed
    spool = Spool(spool_dir, settle_s=0)
    handled = spool.drain(_read)
    assert [i.path.name for i in handled] == ["c.tif", "a.tif", "b.tif"]
    assert spool.drain(_read) == []
    _arrive(spool_dir, scene_files[3], "e.tif", base + 10 * 10**9)
    assert [i.path.name for i in Spool(spool_dir, settle_s=0).drain(_read)] == ["e.tif"]


def test_files_still_being_written_are_not_picked_up(tmp_path, scene_files):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    shutil.copy(scene_files[0], spool_dir / "fresh.tif")  # mtime: now
    spool = Spool(spool_dir, settle_s=30)
    assert spool.pending() == []
    old = 1_700_000_000_000_000_000
    os.utime(spool_dir / "fresh.tif", ns=(old, old))
    assert [i.path.name for i in spool.pending()] == ["fresh.tif"]


def test_bad_file_is_quarantined_reported_and_the_rest_go_on(tmp_path, scene_files):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    base = 1_700_000_000_000_000_000
    _arrive(spool_dir, scene_files[0], "1.tif", base)
    (spool_dir / "2.tif").write_bytes(scene_files[1].read_bytes()[:300])  # truncated
    os.utime(spool_dir / "2.tif", ns=(base + 1, base + 1))
    _arrive(spool_dir, scene_files[2], "3.tif", base + 2)
    events = []
    spool = Spool(spool_dir, settle_s=0, telemetry=Telemetry())
    handled = spool.drain(_read)
    events = spool.telemetry.events
    assert [i.path.name for i in handled] == ["1.tif", "3.tif"]
    assert (spool_dir / "quarantine" / "2.tif").exists() and not (spool_dir / "2.tif").exists()
    rejected = [e for e in events if e["event"] == "spool.rejected"]
    assert len(rejected) == 1 and "2.tif" in rejected[0]["error"]
    assert rejected[0]["error_type"] == "CorruptTiffError"
    journal = [json.loads(line) for line in spool.journal_path.read_text().splitlines()]
    assert [(j["file"], j["state"]) for j in journal] == [
        ("1.tif", "done"), ("2.tif", "rejecting"), ("2.tif", "rejected"), ("3.tif", "done")]


CRASHING_CONSUMER = textwrap.dedent("""
    import os, sys
    from onboard.runtime.sources.spool import Spool
    spool = Spool(sys.argv[1], settle_s=0)
    crash_after = int(sys.argv[2])
    for n, item in enumerate(spool.pending()):
        with open(sys.argv[3], "a") as log:
            log.write(item.path.name + "\\n")
        if n == crash_after:
            os._exit(9)  # dies mid-file, before recording it
        spool.done(item)
""")


def test_restart_after_crash_resumes_without_skipping_or_repeating(tmp_path, scene_files):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    base = 1_700_000_000_000_000_000
    names = [f"{i:02d}.tif" for i in range(6)]
    for i, name in enumerate(names):
        _arrive(spool_dir, scene_files[i], name, base + i)
    log = tmp_path / "processed.log"
    script = tmp_path / "consumer.py"
    script.write_text(CRASHING_CONSUMER)
    crashed = subprocess.run([sys.executable, str(script), str(spool_dir), "2", str(log)])
    assert crashed.returncode == 9
    # a crash while appending leaves a partial journal line: it must be ignored, not fatal
    with open(spool_dir / ".onboard" / "journal.jsonl", "a") as fh:
        fh.write('{"key": "03.tif:')
    finished = subprocess.run([sys.executable, str(script), str(spool_dir), "99", str(log)])
    assert finished.returncode == 0
    attempts = log.read_text().split()
    # 00, 01 done; 02 started when the process died, so it is handled again; then the rest
    assert attempts == names[:3] + names[2:]
    done = [json.loads(line)["file"] for line in
            (spool_dir / ".onboard" / "journal.jsonl").read_text().splitlines()]
    assert done == names  # every file recorded exactly once, in order
    assert Spool(spool_dir, settle_s=0).pending() == []


def test_corrupt_journal_is_a_clear_error(tmp_path):
    spool_dir = tmp_path / "spool"
    (spool_dir / ".onboard").mkdir(parents=True)
    (spool_dir / ".onboard" / "journal.jsonl").write_text("not json\n")
    with pytest.raises(StorageError, match="journal.jsonl.*corrupt journal line"):
        Spool(spool_dir)
    (spool_dir / ".onboard" / "journal.jsonl").write_text('{"state": "done"}\n')
    with pytest.raises(StorageError, match="journal.jsonl.*record 1 has no 'key'"):
        Spool(spool_dir)


def test_missing_spool_folder(tmp_path):
    with pytest.raises(SpoolError, match="does not exist"):
        Spool(tmp_path / "nope")
    assert issubclass(SpoolError, OnboardError)


REJECT_THEN_DIE = textwrap.dedent("""
    import os, sys
    import onboard.runtime.sources.spool as spool_module
    from onboard.runtime.sources.spool import Spool

    def die(*args, **kwargs):
        os._exit(9)  # killed after the rejection is journalled, before the file moves

    spool = Spool(sys.argv[1], settle_s=0)
    spool_module.move = die
    item = spool.pending()[0]
    spool.reject(item, ValueError("band 3 is all zeros"))
""")


def test_a_kill_between_journalling_and_quarantining_is_finished_on_open(tmp_path, scene_files):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    _arrive(spool_dir, scene_files[0], "bad.tif", 1_700_000_000_000_000_000)
    (spool_dir / "quarantine").mkdir()
    (spool_dir / "quarantine" / "bad.tif").write_bytes(b"an earlier bad.tif, kept")
    # A writer killed mid-write leaves a temporary file in the state folder.
    leftover = spool_dir / ".onboard" / ".journal.jsonl.999999999.0badc0de.partial"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half")
    script = tmp_path / "reject.py"
    script.write_text(REJECT_THEN_DIE)
    assert subprocess.run([sys.executable, str(script), str(spool_dir)]).returncode == 9
    assert (spool_dir / "bad.tif").exists()  # the kill came before the move

    spool = Spool(spool_dir, settle_s=0)
    assert not leftover.exists()
    assert not (spool_dir / "bad.tif").exists() and spool.pending() == []
    assert (spool_dir / "quarantine" / "bad.tif").read_bytes() == b"an earlier bad.tif, kept"
    assert (spool_dir / "quarantine" / "bad.1.tif").read_bytes() == scene_files[0].read_bytes()
    states = [(r["state"], r.get("error")) for r in spool.journal.records]
    assert states == [("rejecting", "band 3 is all zeros"), ("rejected", "band 3 is all zeros")]
    assert spool.journal.records[-1]["recovered"] is True
    assert spool.telemetry.events[-1]["event"] == "spool.rejected"
    # Finished once: opening again changes nothing.
    assert len(Spool(spool_dir, settle_s=0).journal.records) == 2
