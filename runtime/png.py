"""A minimal PNG writer (zlib + struct only) for quick-look images of masks and scenes.

The flight runtime has no imaging library; quick-looks are 8-bit greyscale or RGB.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from onboard.runtime.errors import ProductWriteError, SceneError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray, path: str | Path | None = None) -> bytes:
    """PNG bytes of a uint8 (H, W) greyscale or (H, W, 3) RGB array; ``path`` is for errors."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise SceneError(path, f"PNG needs uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        colour_type = 0
    elif image.ndim == 3 and image.shape[2] == 3:
        colour_type = 2
    else:
        raise SceneError(path, f"PNG needs (H, W) or (H, W, 3) pixels, got {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise SceneError(path, f"PNG cannot be empty, got {image.shape}")
    rows = np.ascontiguousarray(image).reshape(h, -1)
    # Filter type 0 (none) on every row.
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG file."""
    path = Path(path)
    data = encode_png(image, path)
    try:
        path.write_bytes(data)
    except OSError as error:
        raise ProductWriteError(path, f"cannot write PNG ({error})") from error
