"""Band names: STAC ``eo:common_name`` plus each sensor's own names.

Sources and models speak in common names (``blue``, ``nir``, ``swir16``) so that a model trained on
one sensor states what it needs in words another sensor understands.
"""

from __future__ import annotations

from dataclasses import dataclass

from onboard.runtime.errors import BandError


@dataclass(frozen=True)
class Band:
    """One spectral band of a sensor."""

    name: str  # the sensor's own name, e.g. "B02"
    common_name: str | None  # STAC eo:common_name, e.g. "blue"; None where STAC has none
    center_wavelength_um: float
    gsd_m: float  # native ground sampling distance


# Sentinel-2 MSI, in the order of the L1C product (B01..B12, B8A after B08).
SENTINEL2: tuple[Band, ...] = (
    Band("B01", "coastal", 0.443, 60.0),
    Band("B02", "blue", 0.490, 10.0),
    Band("B03", "green", 0.560, 10.0),
    Band("B04", "red", 0.665, 10.0),
    Band("B05", "rededge", 0.705, 20.0),
    Band("B06", "rededge", 0.740, 20.0),
    Band("B07", "rededge", 0.783, 20.0),
    Band("B08", "nir", 0.842, 10.0),
    Band("B8A", "nir08", 0.865, 20.0),
    Band("B09", "nir09", 0.945, 60.0),
    Band("B10", "cirrus", 1.375, 60.0),
    Band("B11", "swir16", 1.610, 20.0),
    Band("B12", "swir22", 2.190, 20.0),
)

SENTINEL2_BY_NAME = {band.name: band for band in SENTINEL2}

# Common names that identify exactly one Sentinel-2 band (rededge is ambiguous).
_COMMON_TO_S2 = {
    band.common_name: band.name
    for band in SENTINEL2
    if band.common_name and sum(b.common_name == band.common_name for b in SENTINEL2) == 1
}


def sentinel2_band(name: str) -> Band:
    """Look up a Sentinel-2 band by its own name (``B8A``, ``b02``) or unique common name."""
    key = name.strip().upper()
    if key in SENTINEL2_BY_NAME:
        return SENTINEL2_BY_NAME[key]
    s2 = _COMMON_TO_S2.get(name.strip().lower())
    if s2 is None:
        raise BandError(None, f"unknown Sentinel-2 band {name!r}")
    return SENTINEL2_BY_NAME[s2]


def common_name(name: str) -> str:
    """The STAC common name of a band given by any of its names, or the name itself."""
    try:
        band = sentinel2_band(name)
    except BandError:
        return name.lower()
    return band.common_name or band.name


def resolve_band_indices(available: list[str], wanted: list[str], source: str | None) -> list[int]:
    """Indices into ``available`` for each band of ``wanted``, matching own or common names.

    Raises :class:`BandError` naming the source and the missing band when one cannot be found.
    """
    own = [a.upper() for a in available]
    common = [common_name(a) for a in available]
    indices = []
    for band in wanted:
        if band.upper() in own:
            indices.append(own.index(band.upper()))
        elif band.lower() in common:
            indices.append(common.index(band.lower()))
        else:
            raise BandError(source, f"band {band!r} not found; the source has {available}")
    return indices
