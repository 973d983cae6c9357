"""The PNG writer: files that a real decoder reads back pixel for pixel."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from onboard.runtime.png import encode_png, write_png


def _decode(data: bytes) -> tuple[int, int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    w, h, depth, colour, *_ = header
    assert depth == 8
    return w, h, colour, zlib.decompress(idat)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3)])
def test_round_trip(tmp_path, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, image)
    w, h, colour, raw = _decode(path.read_bytes())
    assert (h, w) == shape[:2]
    assert colour == (0 if len(shape) == 2 else 2)
    rows = np.frombuffer(raw, np.uint8).reshape(h, -1)
    assert (rows[:, 0] == 0).all()
    assert np.array_equal(rows[:, 1:].reshape(shape), image)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="q.png.*H, W"):
        encode_png(np.zeros((2, 2, 4), np.uint8), "q.png")
    with pytest.raises(ValueError, match="empty"):
        encode_png(np.zeros((0, 2), np.uint8))


def test_write_failure_names_file(tmp_path):
    with pytest.raises(OSError, match="missing"):
        write_png(tmp_path / "missing" / "x.png", np.zeros((2, 2), np.uint8))
