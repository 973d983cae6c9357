"""Model bundles: one file holding a manifest and the engine files, the unit that is uplinked.

A bundle is a zip archive with stored (uncompressed) members: ``manifest.json`` first, then the
engine files it names. The manifest records a SHA-256 for every other member, and the archive's
comment is a fixed-length trailer holding the SHA-256 of every byte before it. Between the two,
one flipped byte anywhere in the file (header, member, manifest or trailer) is refused before any
engine parses it: a model that loads with a damaged weight runs and silently gives wrong answers,
which on orbit is worse than not running.

Only the standard library is used, so a board can verify a bundle before any ML runtime loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from onboard.runtime.errors import (
    BundleChecksumError,
    BundleFormatError,
    BundleNotFoundError,
    BundleSchemaError,
    EngineInputError,
)

SCHEMA_VERSION = 1
TASKS = ("cloud", "change", "superres", "segmentation")
BACKENDS = ("onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
OUTPUT_KINDS = ("classes", "values")
INPUT_DTYPES = ("float32", "float16")
LAYOUTS = ("NCHW",)

MANIFEST = "manifest.json"
SUFFIX = ".onboard"
# The archive comment: this prefix and 64 hex digits, the SHA-256 of all bytes before the
# comment's two-byte length field. Fixed length, so a damaged length field is noticed too.
TRAILER_PREFIX = b"onboard-bundle sha256:"
TRAILER_SIZE = len(TRAILER_PREFIX) + 64
_EOCD = b"PK\x05\x06"
_CHUNK = 1 << 20
# Zip timestamps are fixed so the same members always give the same bytes (and bundle hash).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass
class InputSpec:
    """What the model takes: bands by STAC common name, and DN -> model input per band."""

    bands: list[str]
    scale: list[float]
    offset: list[float]
    tile_size: int  # the tile edge the model was trained at, in pixels
    gsd_m: float  # the ground sampling distance it was trained at
    dtype: str = "float32"  # the model input's dtype
    layout: str = "NCHW"

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Raw DN ``(C,H,W)`` or ``(N,C,H,W)`` -> float32 model input, ``DN * scale + offset``."""
        array = np.asarray(pixels)
        if array.ndim not in (3, 4):
            raise EngineInputError(
                f"pixels must be (C,H,W) or (N,C,H,W), got shape {array.shape}")
        if array.shape[-3] != len(self.bands):
            raise EngineInputError(
                f"pixels have {array.shape[-3]} bands on axis -3, the model takes "
                f"{len(self.bands)} ({', '.join(self.bands)})")
        scale = np.asarray(self.scale, np.float32).reshape(-1, 1, 1)
        offset = np.asarray(self.offset, np.float32).reshape(-1, 1, 1)
        return (array.astype(np.float32, copy=False) * scale + offset).astype(np.float32,
                                                                             copy=False)


@dataclass
class OutputSpec:
    """What the model gives: class scores (the caller argmaxes) or physical values."""

    kind: str  # "classes" | "values"
    channels: int
    classes: dict[int, str] = field(default_factory=dict)
    scale_factor: int = 1  # output grid / input grid, e.g. 2 for x2 super-resolution
    description: str = ""


@dataclass
class Manifest:
    """Everything the runtime and the operators need to know about a bundle."""

    name: str
    version: str
    task: str
    input: InputSpec
    output: OutputSpec
    precision: str  # "fp32" | "fp16" | "int8"
    engines: dict[str, str]  # backend -> member; openvino: the .xml, its .bin beside it
    metrics: dict[str, float] = field(default_factory=dict)
    toolchain: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # member -> sha256, by write_bundle
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["output"]["classes"] = {str(k): v for k, v in self.output.classes.items()}
        ordered = {"schema_version": data.pop("schema_version"), **data}
        return json.dumps(ordered, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, path: str | Path | None = None) -> Manifest:
        """Parse and validate a manifest; raises :class:`BundleSchemaError` naming the problem."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleSchemaError(path, f"{MANIFEST} is not valid JSON: {error}") from error
        return _manifest_from_dict(data, path)


def write_bundle(path: str | Path, manifest: Manifest,
                 members: dict[str, bytes | Path]) -> Path:
    """Write ``members`` and ``manifest`` as one bundle at ``path``, atomically.

    Fills ``manifest.files`` with each member's SHA-256 (and ``manifest.created`` if empty),
    refuses a manifest that does not validate or names an engine file that is not among the
    members, and only replaces ``path`` once the whole file is written and synced.
    """
    path = Path(path)
    for name in members:
        _check_member_name(name, path)
        if name == MANIFEST:
            raise BundleFormatError(path, f"{MANIFEST} is written by write_bundle, not a member")
    manifest.files = {name: _sha256_of(src) for name, src in sorted(members.items())}
    if not manifest.created:
        manifest.created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    text = manifest.to_json()
    _check_engines(Manifest.from_json(text, path), set(members), path)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
                archive.writestr(zipfile.ZipInfo(MANIFEST, _ZIP_TIME), text.encode())
                for name in sorted(members):
                    _write_member(archive, name, members[name])
            _append_trailer(handle, path)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); a bundle is for others to read, as any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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

    def __init__(self, path: Path, manifest: Manifest, sha256: str) -> None:
        self.path = path
        self.manifest = manifest
        self.sha256 = sha256  # of the whole file

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
            manifest = Manifest.from_json(archive.read(MANIFEST), path)
            members = set(names) - {MANIFEST}
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
        return cls(path, manifest, whole)

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
        for member in self.members:
            target = directory / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read(member))
        return directory

    def __repr__(self) -> str:
        m = self.manifest
        return f"Bundle({str(self.path)!r}, {m.name} {m.version}, {m.task}, {m.precision})"


# -- manifest validation ---------------------------------------------------------------------

_TOP_FIELDS = {"schema_version", "name", "version", "task", "input", "output", "precision",
               "engines", "metrics", "toolchain", "files", "created", "extra"}
_INPUT_FIELDS = {"bands", "scale", "offset", "tile_size", "gsd_m", "dtype", "layout"}
_OUTPUT_FIELDS = {"kind", "channels", "classes", "scale_factor", "description"}


def _manifest_from_dict(data: Any, path: str | Path | None) -> Manifest:
    def fail(problem: str) -> BundleSchemaError:
        return BundleSchemaError(path, f"{MANIFEST}: {problem}")

    if not isinstance(data, dict):
        raise fail("must be a JSON object")
    version = data.get("schema_version")
    # Checked first: a newer manifest may have fields this runtime cannot know.
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise fail(f"schema version {version} is newer than this runtime understands "
                   f"({SCHEMA_VERSION}); update onboard on board before uplinking this bundle")
    unknown = set(data) - _TOP_FIELDS
    if unknown:
        raise fail(f"unknown field(s) {sorted(unknown)} for schema version {version}")
    for key in ("name", "version", "task", "precision"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise fail(f"{key!r} must be a non-empty string")
    if data["task"] not in TASKS:
        raise fail(f"unknown task {data['task']!r}; this runtime runs {', '.join(TASKS)}")
    if data["precision"] not in PRECISIONS:
        raise fail(f"precision must be one of {PRECISIONS}, got {data['precision']!r}")

    engines = _str_dict(data.get("engines"), "engines", fail)
    if not engines:
        raise fail("'engines' names no engine file")
    for backend in engines:
        if backend not in BACKENDS:
            raise fail(f"unknown backend {backend!r} in 'engines'; known: {', '.join(BACKENDS)}")
    if "openvino" in engines and not engines["openvino"].endswith(".xml"):
        raise fail(f"the openvino engine must be an IR .xml file, got {engines['openvino']!r}")
    files = _str_dict(data.get("files", {}), "files", fail)
    for member, digest in files.items():
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise fail(f"files[{member!r}] is not a lowercase hex SHA-256")
    toolchain = _str_dict(data.get("toolchain", {}), "toolchain", fail)
    metrics = data.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise fail("'metrics' must map names to numbers")
    extra = data.get("extra", {})
    if not isinstance(extra, dict):
        raise fail("'extra' must be an object")
    created = data.get("created", "")
    if not isinstance(created, str):
        raise fail("'created' must be a string")

    return Manifest(
        name=data["name"], version=data["version"], task=data["task"],
        input=_input_from_dict(data.get("input"), fail),
        output=_output_from_dict(data.get("output"), fail),
        precision=data["precision"], engines=engines,
        metrics={str(k): float(v) for k, v in metrics.items()}, toolchain=toolchain,
        files=files, schema_version=version, created=created, extra=extra)


def _check_object(data: Any, name: str, fields: set[str], fail: Any) -> None:
    """``data`` is a JSON object with no field outside ``fields``."""
    if not isinstance(data, dict):
        raise fail(f"'{name}' must be an object")
    unknown = set(data) - fields
    if unknown:
        raise fail(f"unknown {name} field(s) {sorted(unknown)}")


def _input_from_dict(data: Any, fail: Any) -> InputSpec:
    _check_object(data, "input", _INPUT_FIELDS, fail)
    bands = data.get("bands")
    if not isinstance(bands, list) or not bands or not all(
            isinstance(b, str) and b for b in bands):
        raise fail("input.bands must be a non-empty list of band names")
    for key in ("scale", "offset"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) != len(bands) or not all(
                _finite_number(v) for v in values):
            raise fail(f"input.{key} must be {len(bands)} finite numbers, one per band")
    if any(v == 0 for v in data["scale"]):
        raise fail("input.scale must not be 0 (the band would be ignored)")
    tile = data.get("tile_size")
    if not isinstance(tile, int) or isinstance(tile, bool) or tile < 1:
        raise fail(f"input.tile_size must be a positive integer, got {tile!r}")
    gsd = data.get("gsd_m")
    if not _finite_number(gsd) or gsd <= 0:
        raise fail(f"input.gsd_m must be a positive number, got {gsd!r}")
    dtype = data.get("dtype", "float32")
    if dtype not in INPUT_DTYPES:
        raise fail(f"input.dtype must be one of {INPUT_DTYPES}, got {dtype!r}")
    layout = data.get("layout", "NCHW")
    if layout not in LAYOUTS:
        raise fail(f"input.layout must be one of {LAYOUTS}, got {layout!r}")
    return InputSpec(bands=list(bands), scale=[float(v) for v in data["scale"]],
                     offset=[float(v) for v in data["offset"]], tile_size=tile,
                     gsd_m=float(gsd), dtype=dtype, layout=layout)


def _output_from_dict(data: Any, fail: Any) -> OutputSpec:
    _check_object(data, "output", _OUTPUT_FIELDS, fail)
    kind = data.get("kind")
    if kind not in OUTPUT_KINDS:
        raise fail(f"output.kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    channels = data.get("channels")
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise fail(f"output.channels must be a positive integer, got {channels!r}")
    raw = data.get("classes", {})
    if not isinstance(raw, dict):
        raise fail("output.classes must map class values to names")
    classes: dict[int, str] = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise fail(f"output.classes key {key!r} is not an integer") from None
        # A single-channel output is a sigmoid score for two classes.
        if not 0 <= index < max(channels, 2) or not isinstance(value, str):
            raise fail(f"output.classes[{key!r}] is out of range for {channels} channel(s)")
        classes[index] = value
    if kind == "classes" and not classes:
        raise fail("output.classes must name the classes when output.kind is 'classes'")
    factor = data.get("scale_factor", 1)
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise fail(f"output.scale_factor must be a positive integer, got {factor!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("output.description must be a string")
    return OutputSpec(kind=kind, channels=channels, classes=classes, scale_factor=factor,
                      description=description)


def _str_dict(value: Any, key: str, fail: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise fail(f"{key!r} must map strings to strings")
    return dict(value)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


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
            if name == MANIFEST:
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
