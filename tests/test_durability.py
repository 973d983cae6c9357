"""The one write path: a kill at any moment leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onboard.runtime.durability import (
    PARTIAL_SUFFIX,
    Journal,
    atomic_path,
    move,
    partial_name,
    remove_partials,
    write_bytes,
    write_json,
    write_text,
)
from onboard.runtime.errors import OnboardError, StorageError

STATE_SIZE = 256 * 1024


def _version(number: int) -> bytes:
    """Version ``number`` of the state file: its number, then bytes that depend on it."""
    return b"%08d" % number + bytes([number % 251]) * (STATE_SIZE - 8)


WRITER = textwrap.dedent(f"""
    import sys
    from pathlib import Path
    from onboard.runtime.durability import Journal, write_bytes

    folder = Path(sys.argv[1])
    journal = Journal(folder / "journal.jsonl")
    number = len(journal.records)
    print("ready", flush=True)
    while True:
        number += 1
        write_bytes(folder / "state.bin",
                    b"%08d" % number + bytes([number % 251]) * ({STATE_SIZE} - 8))
        journal.append({{"number": number, "padding": "x" * 3000}})
""")


def _check_survivor(folder: Path) -> None:
    state = (folder / "state.bin").read_bytes()
    number = int(state[:8])
    assert state == _version(number), "the state file is neither the old nor the new version"
    records = Journal(folder / "journal.jsonl").records
    assert [r["number"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["padding"] == "x" * 3000 for r in records)
    # The file is written before its record: the kill may fall between the two.
    assert number in (len(records), len(records) + 1)


def test_a_writer_killed_at_random_points_leaves_old_or_new(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(20240611)
    folders = [tmp_path / f"w{i}" for i in range(8)]
    for folder in folders:
        folder.mkdir()
        write_bytes(folder / "state.bin", _version(0))
    kills = mid_write = 0
    for _ in range(8):
        children = [subprocess.Popen([sys.executable, str(script), str(folder)],
                                     stdout=subprocess.PIPE, text=True) for folder in folders]
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            # Short and random: some kills land mid-write, some between the writes.
            time.sleep(rng.uniform(0.0, 0.03))
            child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait()
            child.stdout.close()
            assert child.returncode == -signal.SIGKILL
            kills += 1
        for folder in folders:
            _check_survivor(folder)
            mid_write += bool(remove_partials(folder))
            # The journal is there once the first record was; nothing else is left.
            assert {p.name for p in folder.iterdir()} - {"journal.jsonl"} == {"state.bin"}
    assert kills >= 50
    assert mid_write > 0, "no kill landed inside a write: the test did not test it"
    # The writers got somewhere: this was not 64 kills before the first write.
    assert sum(len(Journal(f / "journal.jsonl").records) for f in folders) > len(folders)


def test_torn_last_journal_line_is_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.append({"n": 1})
    journal.append({"n": 2, "note": "a\rb"})  # a carriage return inside a value is fine
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(b'{"n": 3, "not')  # a crash mid-append
    again = Journal(path)
    assert again.records == [{"n": 1}, {"n": 2, "note": "a\rb"}]
    assert path.read_bytes() == whole  # cut off, so the next append starts a clean line
    again.append({"n": 3})
    assert [r["n"] for r in Journal(path)] == [1, 2, 3] and len(Journal(path)) == 3


@pytest.mark.parametrize("damage", [b"not json\n", b"[1, 2]\n", b'{"n": 2\rbroken\n', b"\n"])
def test_damage_in_the_middle_of_a_journal_is_an_error(tmp_path, damage):
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"n": 1}\n' + damage + b'{"n": 3}\n')
    with pytest.raises(StorageError) as caught:
        Journal(path)
    assert str(path) in str(caught.value) and "at byte 9" in str(caught.value)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, OnboardError)
    assert path.read_bytes().endswith(b'{"n": 3}\n')  # nothing cut off to "repair" it


def test_writing_under_a_file_names_the_path_and_leaves_nothing(tmp_path):
    # Root ignores permissions, so the failure here is a folder that is a regular file.
    blocker = tmp_path / "somefile"
    blocker.write_text("a file, not a folder")
    target = blocker / "x"
    for write in (lambda: write_bytes(target, b"data"), lambda: write_text(target, "data"),
                  lambda: write_json(target, {"a": 1}), lambda: Journal(target)):
        with pytest.raises(StorageError) as caught:
            write()
        assert str(target) in str(caught.value)
    assert sorted(tmp_path.iterdir()) == [blocker] and blocker.read_text() == \
        "a file, not a folder"


def test_a_failed_write_keeps_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"version": 1})
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text('{"version": 2')
        _ = 1 / 0  # the writer fails halfway
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(tmp_path.iterdir()) == [target]
    # The rename itself failing (a folder is in the way) is a StorageError too.
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inside").write_text("kept")
    with pytest.raises(StorageError, match="folder: cannot write"):
        write_bytes(tmp_path / "folder", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "state.json"]


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "product.json", "{}")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_remove_partials_removes_only_what_dead_writers_left(tmp_path):
    dead = tmp_path / f".product.tif.999999999.0badc0de{PARTIAL_SUFFIX}"
    dead.write_bytes(b"half a product")
    live = partial_name(tmp_path / "journal.jsonl")  # this process: maybe still writing
    live.write_bytes(b"being written")
    kept = [tmp_path / "product.tif", tmp_path / f"visible{PARTIAL_SUFFIX}",
            tmp_path / ".hidden"]
    for path in kept:
        path.write_bytes(b"keep")
    (tmp_path / f".folder.1.x{PARTIAL_SUFFIX}").mkdir()
    assert remove_partials(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and all(p.exists() for p in kept)
    assert remove_partials(tmp_path / "missing") == []
    assert partial_name(tmp_path / "a") != partial_name(tmp_path / "a")


def test_move_is_a_rename_and_names_what_failed(tmp_path):
    source = tmp_path / "in" / "scene.tif"
    source.parent.mkdir()
    source.write_bytes(b"scene")
    target = move(source, tmp_path / "quarantine" / "scene.tif")
    assert target.read_bytes() == b"scene" and not source.exists()
    with pytest.raises(StorageError) as caught:
        move(source, tmp_path / "quarantine" / "again.tif")
    assert str(source) in str(caught.value) and "cannot move" in str(caught.value)
