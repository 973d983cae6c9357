"""A Frame: pixels with everything needed to know what they are and where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from onboard.runtime.bands import common_name, resolve_band_indices
from onboard.runtime.errors import BandError, InvalidPixelsError
from onboard.runtime.georef import Georef


@dataclass
class Frame:
    """Pixels (bands, height, width) of one acquisition, or of one tile of it."""

    pixels: np.ndarray
    bands: tuple[str, ...]  # the sensor's own names (B02) or common names (blue)
    gsd_m: float
    georef: Georef | None = None
    acquired: datetime | None = None
    source_id: str = ""
    # False where a pixel is NaN, infinite, nodata or saturated in any band.
    valid: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3:
            raise BandError(
                self.source_id, f"pixels must be (bands, height, width), got {self.pixels.shape}"
            )
        if self.pixels.shape[0] != len(self.bands):
            raise BandError(
                self.source_id,
                f"{self.pixels.shape[0]} bands of pixels but {len(self.bands)} band names",
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.pixels.shape[1]), int(self.pixels.shape[2]))

    @property
    def common_names(self) -> tuple[str, ...]:
        return tuple(common_name(b) for b in self.bands)

    def select(self, wanted: list[str]) -> Frame:
        """The same frame with only ``wanted`` bands (own or common names), in that order."""
        idx = resolve_band_indices(list(self.bands), wanted, self.source_id)
        return replace(self, pixels=self.pixels[idx], bands=tuple(self.bands[i] for i in idx))

    def invalid_fraction(self) -> float:
        return 0.0 if self.valid is None else float(1.0 - self.valid.mean())

    def require_valid(self, max_invalid_fraction: float) -> None:
        """Raise :class:`InvalidPixelsError` when too many pixels cannot be trusted."""
        fraction = self.invalid_fraction()
        if fraction > max_invalid_fraction:
            raise InvalidPixelsError(
                self.source_id,
                f"{fraction:.1%} of pixels are NaN, nodata or saturated "
                f"(limit {max_invalid_fraction:.1%})",
            )


def valid_mask(pixels: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """Pixels that are finite, not nodata and not saturated in every band.

    Integer data is saturated at its dtype's maximum (a saturated Sentinel-2 L1C detector reads
    65535 in uint16); float data is invalid where NaN or infinite.
    """
    if np.issubdtype(pixels.dtype, np.floating):
        bad = ~np.isfinite(pixels)
    else:
        bad = pixels == np.iinfo(pixels.dtype).max
    if nodata is not None:
        bad |= pixels == nodata
    return ~bad.any(axis=0)
