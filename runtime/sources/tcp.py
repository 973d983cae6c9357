"""Frames over TCP: the hardware-in-loop wire protocol and the scene a received frame becomes.

A bench host plays the instrument and streams frames to ``onboard serve`` on the board; each
frame is one acquisition. The protocol is specified in ``docs/hil.md``; in short, every message
is a fixed 20-byte preamble (big-endian)::

    magic b"OBFR" | version u8 | kind u8 | reserved u16 | header_len u32 | payload_len u64

then ``header_len`` bytes of UTF-8 JSON (:class:`FrameHeader`) and ``payload_len`` bytes of
pixels, band-sequential (bands, height, width), C order, little-endian. The receiver checks the
preamble and the header against its limits *before* it allocates the payload, so a malformed or
oversized message costs it nothing but the 20 bytes and the header. Replies (server to client)
are JSON lines, one object per line.

Pixels are received into one buffer and read in place: a window read slices that buffer, with
no decoding and no copy beyond the band selection.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from onboard.runtime.bands import resolve_band_indices
from onboard.runtime.errors import ConfigError, ProtocolError, SceneError
from onboard.runtime.frame import Frame, valid_mask
from onboard.runtime.georef import CRS, Affine, Georef
from onboard.runtime.windows import Window

MAGIC = b"OBFR"
VERSION = 1
KIND_FRAME = 1
KIND_END = 2  # no more frames: the server answers what is queued, sends "end" and closes
KINDS = {KIND_FRAME: "frame", KIND_END: "end"}
PREAMBLE = struct.Struct(">4sBBHIQ")  # 20 bytes
MAX_HEADER_BYTES = 64 * 1024
MAX_BANDS = 256
MAX_SIDE = 65535
MAX_REPLY_BYTES = 16 * 2**20  # one reply line (a result of many tiles), client side
# On the wire always little-endian: every board onboard targets is, so no byte swap there.
DTYPES = {"uint8": "<u1", "uint16": "<u2", "int16": "<i2", "uint32": "<u4", "int32": "<i4",
          "float32": "<f4", "float64": "<f8"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; anything larger is refused before a byte of it is allocated."""

    max_frame_bytes: int = 256 * 2**20
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 1:
            raise ConfigError(f"max_frame_bytes must be positive, got {self.max_frame_bytes}")
        if not 64 <= self.max_header_bytes <= MAX_HEADER_BYTES:
            raise ConfigError(f"max_header_bytes must be in [64, {MAX_HEADER_BYTES}], got "
                             f"{self.max_header_bytes}")


@dataclass(frozen=True)
class FrameHeader:
    """What a frame is: its shape and type, band names, where it lies and when it was taken."""

    id: str  # the acquisition id: tile ids are "<id>/<row>_<col>"
    shape: tuple[int, int, int]  # (bands, height, width)
    dtype: str  # a key of DTYPES
    bands: tuple[str, ...]  # the sensor's own names (B02) or common names (blue)
    crs_epsg: int | None = None
    transform: tuple[float, float, float, float, float, float] | None = None  # GDAL order a..f
    gsd_m: float | None = None  # needed when there is no transform
    acquired: datetime | None = None
    nodata: float | None = None
    radiometric_offset: float = 0.0  # the DN offset the pixels carry
    place: str = ""  # default: the id
    extra: dict[str, Any] = field(default_factory=dict)  # echoed back (a client's send time)

    @property
    def payload_bytes(self) -> int:
        return math.prod(self.shape) * np.dtype(DTYPES[self.dtype]).itemsize

    def georef(self) -> Georef | None:
        if self.transform is None:
            return None
        crs = CRS.from_epsg(self.crs_epsg) if self.crs_epsg is not None else None
        return Georef(crs, Affine(*self.transform))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "place": self.place or self.id, "shape": list(self.shape),
                "dtype": self.dtype, "bands": list(self.bands), "crs_epsg": self.crs_epsg,
                "transform": None if self.transform is None else list(self.transform),
                "gsd_m": self.gsd_m,
                "acquired": None if self.acquired is None else self.acquired.isoformat(),
                "nodata": self.nodata, "radiometric_offset": self.radiometric_offset,
                "extra": self.extra}

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def parse(cls, data: bytes, payload_len: int, peer: str | None = None) -> FrameHeader:
        """The header in ``data``, checked field by field and against ``payload_len``; raises a
        (non-fatal) :class:`ProtocolError` naming the field."""
        def bad(problem: str) -> ProtocolError:
            return ProtocolError(peer, f"frame header: {problem}")

        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise bad(f"not UTF-8 JSON ({error})") from None
        if not isinstance(raw, dict):
            raise bad(f"must be a JSON object, got {type(raw).__name__}")
        ident = raw.get("id")
        if not isinstance(ident, str) or not _ID.match(ident):
            raise bad(f"id must be 1-128 characters of [A-Za-z0-9._:+-], got {ident!r}")
        shape = raw.get("shape")
        if (not isinstance(shape, list) or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
            raise bad(f"shape must be [bands, height, width] integers, got {shape!r}")
        if not 1 <= shape[0] <= MAX_BANDS or not all(1 <= v <= MAX_SIDE for v in shape[1:]):
            raise bad(f"shape {shape} outside [1, {MAX_BANDS}] bands and [1, {MAX_SIDE}] pixels "
                      f"a side")
        dtype = raw.get("dtype")
        if dtype not in DTYPES:
            raise bad(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        bands = raw.get("bands")
        if (not isinstance(bands, list) or len(bands) != shape[0]
                or not all(isinstance(b, str) and 0 < len(b) <= 32 for b in bands)
                or len(set(b.upper() for b in bands)) != len(bands)):
            raise bad(f"bands must be {shape[0]} distinct names (1-32 characters), got "
                      f"{bands!r}")
        epsg = raw.get("crs_epsg")
        if epsg is not None and (not isinstance(epsg, int) or isinstance(epsg, bool)
                                 or not 1024 <= epsg <= 999999):
            raise bad(f"crs_epsg must be an EPSG code or null, got {epsg!r}")
        transform = raw.get("transform")
        if transform is not None:
            if (not isinstance(transform, list) or len(transform) != 6
                    or not all(_finite(v) for v in transform)):
                raise bad(f"transform must be 6 finite numbers (a, b, c, d, e, f) or null, got "
                          f"{transform!r}")
            if transform[0] * transform[4] - transform[1] * transform[3] == 0:
                raise bad(f"transform {transform} is not invertible")
        gsd = raw.get("gsd_m")
        if gsd is not None and (not _finite(gsd) or gsd <= 0):
            raise bad(f"gsd_m must be a positive number or null, got {gsd!r}")
        if transform is None and gsd is None:
            raise bad("needs a transform or gsd_m: the stages need the ground sampling distance")
        acquired = raw.get("acquired")
        when = None
        if acquired is not None:
            try:
                # Python 3.10's fromisoformat does not read a trailing Z.
                when = datetime.fromisoformat(str(acquired).replace("Z", "+00:00"))
            except ValueError:
                raise bad(f"acquired must be ISO 8601 or null, got {acquired!r}") from None
        nodata = raw.get("nodata")
        if nodata is not None and not _finite(nodata):
            raise bad(f"nodata must be a finite number or null, got {nodata!r}")
        offset = raw.get("radiometric_offset", 0.0)
        if not _finite(offset):
            raise bad(f"radiometric_offset must be a number, got {offset!r}")
        place = raw.get("place") or ident
        if not isinstance(place, str) or not _ID.match(place):
            raise bad(f"place must be like an id, got {place!r}")
        extra = raw.get("extra") or {}
        if not isinstance(extra, dict):
            raise bad(f"extra must be an object, got {type(extra).__name__}")
        header = cls(ident, (shape[0], shape[1], shape[2]), dtype, tuple(bands), epsg,
                     None if transform is None else tuple(float(v) for v in transform),
                     None if gsd is None else float(gsd), when,
                     None if nodata is None else float(nodata), float(offset), place, extra)
        if header.payload_bytes != payload_len:
            raise bad(f"payload is {payload_len} bytes but shape {list(header.shape)} of "
                      f"{dtype} needs {header.payload_bytes}")
        return header


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def header_for(frame: Frame, ident: str, place: str = "", nodata: float | None = None,
               radiometric_offset: float = 0.0, **extra: Any) -> FrameHeader:
    """The header that describes ``frame`` (as a source read it) on the wire."""
    dtype = np.dtype(frame.pixels.dtype).name
    if dtype not in DTYPES:
        raise ProtocolError(None, f"{frame.source_id}: {dtype} pixels cannot be sent; the "
                                  f"protocol carries {sorted(DTYPES)}")
    georef = frame.georef
    transform = None
    if georef is not None:
        t = georef.transform
        transform = (t.a, t.b, t.c, t.d, t.e, t.f)
    return FrameHeader(ident, tuple(frame.pixels.shape), dtype, tuple(frame.bands),  # type: ignore[arg-type]
                       georef.crs.epsg if georef is not None and georef.crs else None, transform,
                       None if math.isnan(frame.gsd_m) else float(frame.gsd_m), frame.acquired,
                       nodata, radiometric_offset, place or ident, dict(extra))


# -- the wire -------------------------------------------------------------------------------------


def frame_message(header: FrameHeader, pixels: np.ndarray) -> tuple[bytes, memoryview]:
    """(preamble and header, payload) of one frame; the payload is a view of ``pixels`` when
    they are already contiguous little-endian of the header's dtype."""
    wire = np.dtype(DTYPES[header.dtype])
    if tuple(pixels.shape) != header.shape:
        raise ProtocolError(None, f"frame {header.id}: pixels {pixels.shape} but header shape "
                                  f"{list(header.shape)}")
    data = np.ascontiguousarray(pixels, wire)
    encoded = header.encode()
    if len(encoded) > MAX_HEADER_BYTES:
        raise ProtocolError(None, f"frame {header.id}: header of {len(encoded)} bytes exceeds "
                                  f"{MAX_HEADER_BYTES}")
    prefix = PREAMBLE.pack(MAGIC, VERSION, KIND_FRAME, 0, len(encoded), data.nbytes)
    return prefix + encoded, memoryview(data).cast("B")


def end_message() -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, KIND_END, 0, 0, 0)


def send_frame(sock: socket.socket, header: FrameHeader, pixels: np.ndarray) -> None:
    head, payload = frame_message(header, pixels)
    sock.sendall(head)
    sock.sendall(payload)


@dataclass(frozen=True)
class Prefix:
    """A message's preamble and header bytes, read and checked against the limits."""

    kind: int
    header: bytes
    payload_len: int


def recv_exact(sock: socket.socket, view: memoryview, peer: str | None, what: str,
               timeout_s: float | None = None, waiting: Callable[[], bool] | None = None) -> int:
    """Fill ``view`` from ``sock``; returns the bytes read, which is less than ``len(view)``
    only when the peer closed the connection (0: before the first byte).

    On a socket with a timeout (the server polls), a wait before the first byte goes on while
    ``waiting()`` is true (0 is returned once it is not); once bytes arrive the whole read must
    finish within ``timeout_s``, else a fatal :class:`ProtocolError`."""
    got = 0
    started: float | None = None
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            if got == 0 and waiting is not None:
                if waiting():
                    continue
                return 0
            if timeout_s is not None:
                started = time.monotonic() if started is None else started
                if time.monotonic() - started < timeout_s:
                    continue
            raise ProtocolError(peer, f"timed out after {got} of {len(view)} bytes of {what}",
                                fatal=True) from None
        except ConnectionError as error:  # reset or aborted: the peer went away
            raise ProtocolError(peer, f"disconnected after {got} of {len(view)} bytes of "
                                      f"{what} ({error.strerror or error})", fatal=True) from None
        except OSError as error:
            raise ProtocolError(peer, f"connection failed after {got} of {len(view)} bytes of "
                                      f"{what}: {error.strerror or error}", fatal=True) from None
        if n == 0:
            return got
        if started is None:
            started = time.monotonic()
        got += n
    return got


def read_prefix(sock: socket.socket, limits: Limits, peer: str | None = None,
                timeout_s: float | None = None, waiting: Callable[[], bool] | None = None
                ) -> Prefix | None:
    """The next message's preamble and header, or None when the peer closed the connection
    cleanly between messages (or ``waiting()`` turned false while idle). Framing errors (bad
    magic or version, sizes past the limits, a connection closed mid-message) are fatal
    :class:`ProtocolError`: the stream cannot be resynchronised."""
    raw = bytearray(PREAMBLE.size)
    got = recv_exact(sock, memoryview(raw), peer, "a preamble", timeout_s, waiting)
    if got == 0:
        return None
    if got < PREAMBLE.size:
        raise ProtocolError(peer, f"disconnected after {got} of {PREAMBLE.size} bytes of a "
                                  f"preamble", fatal=True)
    magic, version, kind, _, header_len, payload_len = PREAMBLE.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(peer, f"not an onboard frame message (magic {bytes(magic)!r}, "
                                  f"expected {MAGIC!r})", fatal=True)
    if version != VERSION:
        raise ProtocolError(peer, f"protocol version {version} is not supported (this server "
                                  f"speaks {VERSION})", fatal=True)
    if kind not in KINDS:
        raise ProtocolError(peer, f"unknown message kind {kind}", fatal=True)
    if header_len > limits.max_header_bytes:
        raise ProtocolError(peer, f"header of {header_len} bytes exceeds the "
                                  f"{limits.max_header_bytes}-byte limit", fatal=True)
    if payload_len > limits.max_frame_bytes:
        raise ProtocolError(peer, f"frame of {payload_len} bytes exceeds the "
                                  f"{limits.max_frame_bytes}-byte limit; refused unread",
                            fatal=True)
    if kind == KIND_END and (header_len or payload_len):
        raise ProtocolError(peer, "an end message carries no header or payload", fatal=True)
    header = bytearray(header_len)
    if recv_exact(sock, memoryview(header), peer, "a header", timeout_s) < header_len:
        raise ProtocolError(peer, f"disconnected inside a {header_len}-byte header", fatal=True)
    return Prefix(kind, bytes(header), payload_len)


def read_payload(sock: socket.socket, header: FrameHeader, peer: str | None = None,
                 timeout_s: float | None = None) -> np.ndarray:
    """The frame's pixels (bands, height, width), received straight into their array."""
    buffer = bytearray(header.payload_bytes)
    got = recv_exact(sock, memoryview(buffer), peer, f"frame {header.id}", timeout_s)
    if got < len(buffer):
        raise ProtocolError(peer, f"disconnected after {got} of {len(buffer)} bytes of frame "
                                  f"{header.id}", fatal=True)
    pixels = np.frombuffer(buffer, DTYPES[header.dtype]).reshape(header.shape)
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)


def skip_payload(sock: socket.socket, nbytes: int, peer: str | None = None,
                 timeout_s: float | None = None) -> None:
    """Read and discard ``nbytes`` in small chunks (a refused or dropped frame)."""
    scratch = memoryview(bytearray(min(nbytes, _CHUNK) or 1))
    left = nbytes
    while left:
        want = min(left, len(scratch))
        got = recv_exact(sock, scratch[:want], peer, "a skipped frame", timeout_s)
        if got < want:
            raise ProtocolError(peer, f"disconnected inside a skipped frame ({nbytes - left + got}"
                                      f" of {nbytes} bytes)", fatal=True)
        left -= want


def iter_replies(sock: socket.socket, peer: str | None = None) -> Iterator[dict[str, Any]]:
    """The server's JSON-line replies until it closes the connection."""
    pending = bytearray()
    while True:
        try:
            chunk = sock.recv(_CHUNK)
        except TimeoutError:
            raise ProtocolError(peer, "timed out waiting for a reply", fatal=True) from None
        if not chunk:
            return
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[: end + 1]
            yield json.loads(line)
        if len(pending) > MAX_REPLY_BYTES:
            raise ProtocolError(peer, f"reply line longer than {MAX_REPLY_BYTES} bytes",
                                fatal=True)


# -- a received frame as a scene ------------------------------------------------------------------


class ReceivedFrame:
    """A frame received whole, as a :class:`~onboard.runtime.sources.base.Scene`: window reads
    slice the received array in place."""

    def __init__(self, header: FrameHeader, pixels: np.ndarray, source_id: str = "") -> None:
        if tuple(pixels.shape) != header.shape:
            raise SceneError(source_id or header.id, f"pixels {pixels.shape} do not match the "
                                                     f"header shape {list(header.shape)}")
        self.header = header
        self.pixels = pixels
        self.source_id = source_id or f"tcp:{header.id}"
        self.count, self.height, self.width = header.shape
        self.bands = header.bands
        self.georef = header.georef()
        if header.gsd_m is not None:
            self.gsd_m = header.gsd_m
        else:
            assert self.georef is not None  # parse() requires one of the two
            self.gsd_m = float(min(self.georef.gsd_m(self.height)))
        self.acquired = header.acquired
        self.nodata = header.nodata
        self.dtype = pixels.dtype

    def __repr__(self) -> str:
        return f"ReceivedFrame({self.header.id!r}, {self.count}×{self.height}×{self.width})"

    def read(self, window: Window, bands: Sequence[str] | None = None) -> Frame:
        r0, c0, h, w = window.row_off, window.col_off, window.height, window.width
        if r0 < 0 or c0 < 0 or h <= 0 or w <= 0 or r0 + h > self.height or c0 + w > self.width:
            raise SceneError(self.source_id,
                             f"window {window} is outside the {self.height}×{self.width} frame")
        if bands is None:
            indices = list(range(self.count))
        else:
            indices = resolve_band_indices(list(self.bands), list(bands), self.source_id)
        pixels = self.pixels[indices, r0 : r0 + h, c0 : c0 + w]
        return Frame(pixels=pixels, bands=tuple(self.bands[i] for i in indices),
                     gsd_m=self.gsd_m,
                     georef=None if self.georef is None else self.georef.window(c0, r0),
                     acquired=self.acquired, source_id=self.source_id,
                     valid=valid_mask(pixels, self.nodata))
