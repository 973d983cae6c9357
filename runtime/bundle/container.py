"""Model bundles: one file holding a manifest and the engine files, the unit that is uplinked.

A bundle is a zip archive with stored (uncompressed) members: ``manifest.json`` first, then the
engine files it names. The manifest records a SHA-256 for every other member, and the archive's
comment is a fixed-length trailer holding the SHA-256 of every byte before it. Between the two,
one flipped byte anywhere in the file (header, member, manifest or trailer) is refused before any
engine parses it: a model that loads with a damaged weight runs and silently gives wrong answers,
which on orbit is worse than not running.

Only the standard library is used, so a board can verify a bundle before any ML runtime loads.
The manifest's schema is in :mod:`onboard.runtime.bundle.manifest`.

A signed bundle also holds ``signature.json`` (after the manifest): a signature over the
manifest's SHA-256, made and checked by :mod:`onboard.runtime.bundle.signature`. It is the one
member the manifest does not list, because it signs the manifest; the trailer covers it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO

from onboard.runtime.bundle.manifest import MANIFEST, Manifest
from onboard.runtime.durability import atomic_path
from onboard.runtime.errors import (
    BundleChecksumError,
    BundleFormatError,
    BundleNotFoundError,
)

SUFFIX = ".onboard"
SIGNATURE = "signature.json"  # the detached signature member of a signed bundle
_MAX_SIGNATURE_BYTES = 4096
# The archive comment: this prefix and 64 hex digits, the SHA-256 of all bytes before the
# comment's two-byte length field. Fixed length, so a damaged length field is noticed too.
TRAILER_PREFIX = b"onboard-bundle sha256:"
TRAILER_SIZE = len(TRAILER_PREFIX) + 64
_EOCD = b"PK\x05\x06"
_CHUNK = 1 << 20
# Zip timestamps are fixed so the same members always give the same bytes (and bundle hash).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_bundle(path: str | Path, manifest: Manifest,
                 members: dict[str, bytes | Path],
                 signer: Callable[[str], bytes] | None = None) -> Path:
    """Write ``members`` and ``manifest`` as one bundle at ``path``, atomically.

    Fills ``manifest.files`` with each member's SHA-256 (and ``manifest.created`` if empty),
    refuses a manifest that does not validate or names an engine file that is not among the
    members, and only replaces ``path`` once the whole file is written and synced. ``signer``
    (e.g. :meth:`~onboard.runtime.bundle.signature.SigningKey.sign_manifest`) turns the
    manifest's SHA-256 into the signature member.
    """
    path = Path(path)
    for name in members:
        _check_member_name(name, path)
        if name in (MANIFEST, SIGNATURE):
            raise BundleFormatError(path, f"{name} is written by write_bundle, not a member")
    manifest.files = {name: _sha256_of(src) for name, src in sorted(members.items())}
    if not manifest.created:
        manifest.created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    text = manifest.to_json()
    written = Manifest.from_json(text, path)
    _check_engines(written, set(members), path)
    manifest.schema_version = written.schema_version
    signature = None if signer is None else signer(hashlib.sha256(text.encode()).hexdigest())
    return _write_archive(path, text.encode(), signature, members)


def write_signed(bundle: Bundle, signature: bytes, path: str | Path | None = None) -> Path:
    """``bundle`` with ``signature`` as its signature member, at ``path`` (default: in place).

    The manifest and every member are copied byte for byte (a manifest is not re-serialised:
    its SHA-256 is what the signature signs)."""
    members: dict[str, bytes | Path] = {name: bundle.read(name) for name in bundle.members}
    return _write_archive(Path(path) if path is not None else bundle.path,
                          bundle.manifest_bytes, signature, members)


def _write_archive(path: Path, manifest: bytes, signature: bytes | None,
                   members: dict[str, bytes | Path]) -> Path:
    # A failed or killed write leaves any previous bundle at ``path`` as it was.
    with atomic_path(path) as tmp, open(tmp, "w+b") as handle:
        with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr(zipfile.ZipInfo(MANIFEST, _ZIP_TIME), manifest)
            if signature is not None:
                archive.writestr(zipfile.ZipInfo(SIGNATURE, _ZIP_TIME), signature)
            for name in sorted(members):
                _write_member(archive, name, members[name])
        _append_trailer(handle, path)
    return path


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a file that ends like a bundle (cheap; does not verify it)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size < 22 + TRAILER_SIZE:
            return False
        with open(path, "rb") as handle:
            handle.seek(-TRAILER_SIZE, os.SEEK_END)
            return handle.read().startswith(TRAILER_PREFIX)
    except OSError:
        return False


class Bundle:
    """A verified bundle. Use :meth:`open`; every checksum is checked before it returns."""

    def __init__(self, path: Path, manifest: Manifest, sha256: str,
                 manifest_bytes: bytes = b"", signature: bytes | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.sha256 = sha256  # of the whole file
        self.manifest_bytes = manifest_bytes  # as stored: what a signature signs
        self.signature = signature  # the signature member, unparsed; None when unsigned

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open and verify a bundle: trailer, archive, schema version, manifest, every member."""
        path = Path(path)
        if not path.is_file():
            raise BundleNotFoundError(f"{path}: no such bundle file")
        whole, body_ok, trailer_found = _verify_trailer(path)
        if not body_ok:
            if not trailer_found and not _has_manifest(path) and not _starts_like_bundle(path):
                raise BundleFormatError(
                    path, f"not an onboard bundle (no {MANIFEST} and no bundle trailer)")
            problem = _diagnose(path) if trailer_found else \
                "no bundle trailer at the end: the file is truncated or its end is damaged"
            raise BundleChecksumError(
                path, f"checksum mismatch: {problem}; the file is damaged (e.g. on uplink) "
                      "and must not be used: send it again")
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise BundleFormatError(path, f"not a readable zip archive: {error}") from error
        with archive:
            names = [info.filename for info in archive.infolist()]
            if MANIFEST not in names:
                raise BundleFormatError(path, f"no {MANIFEST} in the bundle")
            if len(set(names)) != len(names):
                raise BundleFormatError(path, "a member name occurs twice")
            manifest_bytes = archive.read(MANIFEST)
            manifest = Manifest.from_json(manifest_bytes, path)
            signature = _read_signature(archive, names, path)
            members = set(names) - {MANIFEST, SIGNATURE}
            missing = sorted(set(manifest.files) - members)
            if missing:
                raise BundleFormatError(
                    path, f"member {missing[0]!r} is listed in the manifest but missing from "
                          "the file")
            unlisted = sorted(members - set(manifest.files))
            if unlisted:
                raise BundleFormatError(
                    path, f"member {unlisted[0]!r} has no checksum in the manifest; refusing it")
            _check_engines(manifest, members, path)
            for name in sorted(members):
                _check_name_and_digest(archive, name, manifest.files[name], path)
        return cls(path, manifest, whole, manifest_bytes, signature)

    @property
    def members(self) -> list[str]:
        return sorted(self.manifest.files)

    def read(self, member: str) -> bytes:
        """A member's bytes, checked again against the manifest (the file may change on disk)."""
        if member not in self.manifest.files:
            raise BundleFormatError(self.path, f"no member {member!r}; it has {self.members}")
        try:
            with zipfile.ZipFile(self.path) as archive:
                data = archive.read(member)
        except (zipfile.BadZipFile, OSError, KeyError) as error:
            raise BundleChecksumError(
                self.path, f"member {member!r} can no longer be read: {error}") from error
        if hashlib.sha256(data).hexdigest() != self.manifest.files[member]:
            raise BundleChecksumError(
                self.path, f"member {member!r} changed on disk since the bundle was opened")
        return data

    def extract(self, directory: str | Path) -> Path:
        """Write every member (and the manifest) under ``directory``, verified; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).write_text(self.manifest.to_json(), encoding="utf-8")
        if self.signature is not None:
            (directory / SIGNATURE).write_bytes(self.signature)
        for member in self.members:
            target = directory / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(member))
        return directory

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.path)!r}, {m.name} {m.version}, {m.task}, {m.precision})"


# -- checks ------------------------------------------------------------------------------------

def _read_signature(archive: zipfile.ZipFile, names: list[str], path: Path) -> bytes | None:
    if SIGNATURE not in names:
        return None
    info = archive.getinfo(SIGNATURE)
    if info.file_size > _MAX_SIGNATURE_BYTES:
        raise BundleFormatError(path, f"{SIGNATURE} holds {info.file_size} bytes; a signature "
                                      f"has at most {_MAX_SIGNATURE_BYTES}")
    try:
        return archive.read(SIGNATURE)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BundleChecksumError(path, f"member {SIGNATURE!r} is damaged: {error}") from error


def _check_engines(manifest: Manifest, members: set[str], path: Path) -> None:
    for backend, member in manifest.engines.items():
        if member not in members:
            raise BundleFormatError(
                path, f"engine file {member!r} for backend {backend!r} is missing from the bundle")
        if backend == "openvino":
            weights = str(PurePosixPath(member).with_suffix(".bin"))
            if weights not in members:
                raise BundleFormatError(
                    path, f"OpenVINO weights {weights!r} (beside {member!r}) are missing from "
                          "the bundle")


def _check_member_name(name: str, path: Path) -> None:
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts \
            or str(pure) != name:
        raise BundleFormatError(path, f"member name {name!r} is not a plain relative path")


# -- container ---------------------------------------------------------------------------------

def _sha256_of(source: bytes | Path) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_member(archive: zipfile.ZipFile, name: str, source: bytes | Path) -> None:
    info = zipfile.ZipInfo(name, _ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    if isinstance(source, (bytes, bytearray, memoryview)):
        archive.writestr(info, bytes(source))
        return
    info.file_size = Path(source).stat().st_size
    large = info.file_size > 0x7FFFFFFF
    with open(source, "rb") as src, archive.open(info, "w", force_zip64=large) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def _append_trailer(handle: IO[bytes], path: Path) -> None:
    handle.seek(-22, os.SEEK_END)
    if handle.read(4) != _EOCD:
        raise BundleFormatError(path, "internal error: the zip end record is not where expected")
    end = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    digest = hashlib.sha256()
    remaining = end - 2  # everything before the comment-length field
    while remaining:
        chunk = handle.read(min(_CHUNK, remaining))
        digest.update(chunk)
        remaining -= len(chunk)
    handle.seek(end - 2)
    handle.write(TRAILER_SIZE.to_bytes(2, "little") + TRAILER_PREFIX
                 + digest.hexdigest().encode("ascii"))


def _verify_trailer(path: Path) -> tuple[str, bool, bool]:
    """(sha256 of the whole file, body matches trailer, a trailer prefix was found)."""
    size = path.stat().st_size
    whole = hashlib.sha256()
    body = hashlib.sha256()
    body_len = max(size - TRAILER_SIZE - 2, 0)
    with open(path, "rb") as handle:
        remaining = body_len
        while remaining:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            body.update(chunk)
            whole.update(chunk)
            remaining -= len(chunk)
        tail = handle.read()
    whole.update(tail)
    found = TRAILER_PREFIX in tail
    ok = (size >= 22 + TRAILER_SIZE
          and tail[:2] == TRAILER_SIZE.to_bytes(2, "little")
          and tail[2:2 + len(TRAILER_PREFIX)] == TRAILER_PREFIX
          and tail[2 + len(TRAILER_PREFIX):] == body.hexdigest().encode("ascii"))
    return whole.hexdigest(), ok, found


def _has_manifest(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return MANIFEST in archive.namelist()
    except Exception:
        return False


def _starts_like_bundle(path: Path) -> bool:
    # write_bundle puts the manifest first: its local header survives truncation.
    with open(path, "rb") as handle:
        header = handle.read(30 + len(MANIFEST))
    return header[:4] == b"PK\x03\x04" and header[30:] == MANIFEST.encode()


def _diagnose(path: Path) -> str:
    """Which part of a bundle whose trailer does not match is damaged, as far as can be told."""
    # Any exception here only means "damaged": the caller refuses the bundle either way.
    try:
        archive = zipfile.ZipFile(path)
    except Exception:
        return "the zip structure is damaged"
    with archive:
        manifest: Manifest | None = None
        try:
            manifest = Manifest.from_json(archive.read(MANIFEST), path)
        except Exception:
            return f"member {MANIFEST!r} is damaged"
        for name in archive.namelist():
            if name in (MANIFEST, SIGNATURE):
                continue
            try:
                _check_name_and_digest(archive, name, manifest.files.get(name, ""), path)
            except Exception:
                return f"member {name!r} is damaged"
    return "the archive headers or the trailer are damaged (the members themselves verify)"


def _check_name_and_digest(archive: zipfile.ZipFile, name: str, expected: str,
                           path: Path) -> None:
    _check_member_name(name, path)
    digest = hashlib.sha256()
    try:
        with archive.open(name) as member:
            while chunk := member.read(_CHUNK):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BundleChecksumError(path, f"member {name!r} is damaged: {error}") from error
    if digest.hexdigest() != expected:
        raise BundleChecksumError(
            path, f"member {name!r}: SHA-256 {digest.hexdigest()} does not match the manifest's "
                  f"{expected or '(none)'}")
