"""The one write path of the runtime: a crash leaves the old file or the new one, never half.

Every file onboard writes itself (products, bundles, engine caches, spool and store state) goes
through :func:`atomic_path` / :func:`write_bytes`: the data goes to a temporary file beside the
destination, is fsync'd, renamed over the destination, and the folder is fsync'd so the rename
itself survives a power cut. Append-only records go through :class:`Journal`, whose torn last
line (a crash mid-append) is dropped on the next open.

This is the only module of the runtime that renames files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onboard.runtime.errors import StorageError

PARTIAL_SUFFIX = ".partial"


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def partial_name(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: hidden, in the same folder
    (a rename across filesystems is not atomic), unique to this call (two threads may write the
    same file), with the writer's process id so that :func:`remove_partials` spares live ones."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _writer_alive(partial: Path) -> bool:
    """Whether the process that named ``partial`` still runs (so it may still be writing)."""
    parts = partial.name[: -len(PARTIAL_SUFFIX)].split(".")
    if len(parts) < 3 or not parts[-2].isdigit():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except (ProcessLookupError, OverflowError):
        return False  # gone, or a number no process can have
    except PermissionError:
        return True  # another user's process
    return True


_deferred = threading.local()


@contextlib.contextmanager
def deferred_folder_sync() -> Iterator[None]:
    """Within the block, renames made by :func:`atomic_path` on this thread fsync their folder
    once, at the end of the block, instead of once per file: for writing many files (a pass's
    products) before anything refers to them. Nothing may refer to those files (a queue entry,
    a journal record) before the block ends."""
    outer = getattr(_deferred, "folders", None)
    if outer is not None:  # nested: the outermost block syncs
        yield
        return
    _deferred.folders = folders = set()
    try:
        yield
    finally:
        _deferred.folders = None
        for folder in sorted(folders):
            fsync_dir(folder)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; on a clean exit it is fsync'd and
    renamed into place, on any error it is removed and ``path`` is left as it was.

    Errors from the file system come out as :class:`StorageError` naming ``path``; a failure to
    clean up never hides the error that caused it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StorageError(path, f"cannot create its folder: {_reason(error)}") from error
    tmp = partial_name(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, StorageError):
            raise StorageError(path, f"cannot write: {_reason(error)}") from error
        raise
    folders = getattr(_deferred, "folders", None)
    if folders is None:
        fsync_dir(path.parent)
    else:
        folders.add(str(path.parent))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``, atomically and durably."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=2, default=str) + "\n")


def move(source: str | Path, target: str | Path) -> Path:
    """Move ``source`` to ``target`` durably: a rename within one filesystem (both folders
    fsync'd), a copy-then-rename and delete across filesystems."""
    source, target = Path(source), Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except OSError as error:
            if error.errno != errno.EXDEV:  # another filesystem: rename cannot cross it
                raise
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            source.unlink()
    except OSError as error:
        raise StorageError(source, f"cannot move to {target}: {_reason(error)}") from error
    fsync_dir(target.parent)
    fsync_dir(source.parent)
    return target


def remove_partials(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a killed writer left in ``folder`` (not recursive).

    Only files of this module's naming are touched, and not those of a writer still running
    (a pid reused since is only garbage kept until the next call); returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX) \
                and entry.is_file() and not _writer_alive(entry):
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


class Journal:
    """An append-only file of JSON records, one per line, each fsync'd before ``append``
    returns.

    A crash mid-append leaves a torn last line: it never happened, and it is cut off when the
    journal is opened. Damage anywhere else is an error, never silently skipped.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(self.path, f"cannot create its folder: {_reason(error)}") from error
        self.records: list[dict[str, Any]] = self._load()

    def _load(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            raw = self.path.read_bytes()
        except OSError as error:
            raise StorageError(self.path, f"cannot read journal: {_reason(error)}") from error
        records: list[dict[str, Any]] = []
        good_end = 0
        # Split on newlines only: a stray carriage return inside a damaged line must not make
        # it look like a torn end and cut off the good records after it.
        for body in raw.split(b"\n")[:-1]:
            line = body + b"\n"
            try:
                record = json.loads(line)
            except ValueError:
                raise StorageError(self.path, f"corrupt journal line at byte {good_end}") from None
            if not isinstance(record, dict):
                raise StorageError(self.path, f"journal line at byte {good_end} is not a record")
            records.append(record)
            good_end += len(line)
        if good_end != len(raw):
            try:
                with open(self.path, "r+b") as handle:
                    handle.truncate(good_end)
                    os.fsync(handle.fileno())
            except OSError as error:
                raise StorageError(self.path, f"cannot repair journal: {_reason(error)}") from error
        return records

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def append(self, record: dict[str, Any]) -> None:
        """Add ``record`` durably; on failure the journal is left as it was."""
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        new = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as error:
            raise StorageError(self.path, f"cannot open journal: {_reason(error)}") from error
        try:
            size = os.fstat(fd).st_size
            failure = cause = None
            try:
                written = os.write(fd, line)
                if written == len(line):
                    os.fsync(fd)
                else:  # the disk filled up mid-line
                    failure = f"short write ({written} of {len(line)} bytes)"
            except OSError as error:
                failure, cause = _reason(error), error
            if failure is not None:
                # A half-written line would be glued to the next record and then read as
                # damage in the middle; cut it off while we still know where it started.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise StorageError(self.path, f"cannot append to journal: {failure}") from cause
        finally:
            os.close(fd)
        if new:
            fsync_dir(self.path.parent)
        self.records.append(record)
