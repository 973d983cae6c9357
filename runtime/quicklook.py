"""Quick-look PNGs of scenes and masks, for people on the ground."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onboard.runtime.png import write_png

# Class colours: index = class value; 255 (no data) is magenta.
PALETTE = np.array([
    [40, 40, 40], [250, 250, 250], [30, 60, 200], [230, 150, 30], [40, 170, 60],
    [200, 40, 40], [150, 80, 200], [90, 200, 200],
], dtype=np.uint8)
NODATA_COLOUR = np.array([255, 0, 255], dtype=np.uint8)


def class_rgb(mask: np.ndarray) -> np.ndarray:
    """(H, W) class values -> (H, W, 3) colours."""
    rgb = PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
    rgb[mask == 255] = NODATA_COLOUR
    return rgb


def stretch_rgb(pixels: np.ndarray, percentiles: tuple[float, float] = (2, 98)) -> np.ndarray:
    """(3, H, W) red, green, blue of any dtype -> (H, W, 3) uint8, stretched per band."""
    out = np.empty((*pixels.shape[1:], 3), dtype=np.uint8)
    for i in range(3):
        band = pixels[i].astype(np.float32)
        finite = band[np.isfinite(band)]
        lo, hi = np.percentile(finite, percentiles) if finite.size else (0.0, 1.0)
        scaled = (band - lo) / max(hi - lo, 1e-6) * 255
        out[..., i] = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    return out


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    path = Path(path)
    write_png(path, class_rgb(mask))
    return path
