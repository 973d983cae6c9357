"""Georeferencing: a coordinate reference system and an affine pixel-to-world transform.

Read from and written to the GeoTIFF tags (ModelPixelScale, ModelTiepoint, ModelTransformation,
GeoKeyDirectory), so onboard needs neither GDAL nor PROJ on board.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onboard.runtime.errors import GeoreferenceError

TAG_MODEL_PIXEL_SCALE = 33550
TAG_MODEL_TIEPOINT = 33922
TAG_MODEL_TRANSFORMATION = 34264
TAG_GEO_KEY_DIRECTORY = 34735
TAG_GEO_DOUBLE_PARAMS = 34736
TAG_GEO_ASCII_PARAMS = 34737

_KEY_MODEL_TYPE = 1024
_KEY_RASTER_TYPE = 1025
_KEY_GEOGRAPHIC_TYPE = 2048
_KEY_PROJECTED_TYPE = 3072
_MODEL_PROJECTED = 1
_MODEL_GEOGRAPHIC = 2
_RASTER_PIXEL_IS_AREA = 1

_METRES_PER_DEGREE = 111_320.0


@dataclass(frozen=True)
class CRS:
    """A coordinate reference system known by its EPSG code."""

    epsg: int
    geographic: bool

    def __str__(self) -> str:
        return f"EPSG:{self.epsg}"

    @classmethod
    def from_epsg(cls, code: int) -> CRS:
        # EPSG codes for geographic 2D systems sit in 4000-4999; projected ones elsewhere.
        return cls(epsg=code, geographic=4000 <= code < 5000)


@dataclass(frozen=True)
class Affine:
    """x = a*col + b*row + c ; y = d*col + e*row + f (pixel corner convention, like GDAL)."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float

    @classmethod
    def from_origin(cls, west: float, north: float, xsize: float, ysize: float) -> Affine:
        return cls(xsize, 0.0, west, 0.0, -ysize, north)

    def __mul__(self, colrow: tuple[float, float]) -> tuple[float, float]:
        col, row = colrow
        return (self.a * col + self.b * row + self.c, self.d * col + self.e * row + self.f)

    def inverse(self) -> Affine:
        det = self.a * self.e - self.b * self.d
        if det == 0:
            raise GeoreferenceError(None, f"transform {self} is not invertible")
        ia, ib = self.e / det, -self.b / det
        id_, ie = -self.d / det, self.a / det
        return Affine(ia, ib, -(ia * self.c + ib * self.f), id_, ie, -(id_ * self.c + ie * self.f))

    def shifted(self, col_off: float, row_off: float) -> Affine:
        """The transform of a window whose top-left pixel is (col_off, row_off) here."""
        x, y = self * (col_off, row_off)
        return Affine(self.a, self.b, x, self.d, self.e, y)

    def scaled(self, factor: float) -> Affine:
        """The transform of the same footprint sampled ``factor`` times finer."""
        return Affine(
            self.a / factor, self.b / factor, self.c, self.d / factor, self.e / factor, self.f
        )

    @property
    def is_rectilinear(self) -> bool:
        return self.b == 0 and self.d == 0


@dataclass(frozen=True)
class Georef:
    """Where a raster sits on Earth."""

    crs: CRS | None
    transform: Affine

    def bounds(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(west, south, east, north) of a raster of this size."""
        corners = [self.transform * (c, r) for c in (0, width) for r in (0, height)]
        xs = [x for x, _ in corners]
        ys = [y for _, y in corners]
        return (min(xs), min(ys), max(xs), max(ys))

    def gsd_m(self, height: int) -> tuple[float, float]:
        """Approximate ground sampling distance (x, y) in metres at the raster's centre."""
        xsize = math.hypot(self.transform.a, self.transform.d)
        ysize = math.hypot(self.transform.b, self.transform.e)
        if self.crs is not None and self.crs.geographic:
            _, lat = self.transform * (0, height / 2)
            return (
                xsize * _METRES_PER_DEGREE * math.cos(math.radians(lat)),
                ysize * _METRES_PER_DEGREE,
            )
        return (xsize, ysize)

    def window(self, col_off: int, row_off: int) -> Georef:
        return Georef(self.crs, self.transform.shifted(col_off, row_off))

    def to_tags(self) -> list[tuple[int, str, int, Any, bool]]:
        """GeoTIFF tags for tifffile's ``extratags``."""
        t = self.transform
        tags: list[tuple[int, str, int, Any, bool]] = []
        if t.is_rectilinear and t.e < 0:
            tags.append((TAG_MODEL_PIXEL_SCALE, "d", 3, (t.a, -t.e, 0.0), True))
            tags.append((TAG_MODEL_TIEPOINT, "d", 6, (0.0, 0.0, 0.0, t.c, t.f, 0.0), True))
        else:
            matrix = (t.a, t.b, 0.0, t.c, t.d, t.e, 0.0, t.f, 0, 0, 0, 0, 0, 0, 0, 1.0)
            tags.append((TAG_MODEL_TRANSFORMATION, "d", 16, matrix, True))
        keys = [(_KEY_RASTER_TYPE, 0, 1, _RASTER_PIXEL_IS_AREA)]
        if self.crs is not None:
            if self.crs.geographic:
                keys.insert(0, (_KEY_MODEL_TYPE, 0, 1, _MODEL_GEOGRAPHIC))
                keys.append((_KEY_GEOGRAPHIC_TYPE, 0, 1, self.crs.epsg))
            else:
                keys.insert(0, (_KEY_MODEL_TYPE, 0, 1, _MODEL_PROJECTED))
                keys.append((_KEY_PROJECTED_TYPE, 0, 1, self.crs.epsg))
        directory = [1, 1, 0, len(keys)] + [v for key in keys for v in key]
        tags.append((TAG_GEO_KEY_DIRECTORY, "H", len(directory), tuple(directory), True))
        return tags


def read_georef(tags: dict[int, Any], path: str | Path | None = None) -> Georef | None:
    """Georeferencing from a TIFF page's tag values (code -> value), or None if it has none."""
    transform = None
    if TAG_MODEL_TRANSFORMATION in tags:
        m = tags[TAG_MODEL_TRANSFORMATION]
        if len(m) != 16:
            raise GeoreferenceError(path, f"ModelTransformation has {len(m)} values, not 16")
        transform = Affine(m[0], m[1], m[3], m[4], m[5], m[7])
    elif TAG_MODEL_PIXEL_SCALE in tags and TAG_MODEL_TIEPOINT in tags:
        scale = tags[TAG_MODEL_PIXEL_SCALE]
        tie = tags[TAG_MODEL_TIEPOINT]
        if len(scale) < 2 or len(tie) < 6:
            raise GeoreferenceError(path, "ModelPixelScale or ModelTiepoint is too short")
        if scale[0] <= 0 or scale[1] <= 0:
            raise GeoreferenceError(path, f"ModelPixelScale {tuple(scale)} is not positive")
        col, row, x, y = tie[0], tie[1], tie[3], tie[4]
        transform = Affine(scale[0], 0.0, x - col * scale[0], 0.0, -scale[1], y + row * scale[1])
    if transform is None:
        return None
    return Georef(_read_crs(tags.get(TAG_GEO_KEY_DIRECTORY), path), transform)


def _read_crs(directory: Any, path: str | Path | None) -> CRS | None:
    if directory is None:
        return None
    values = list(directory)
    if len(values) < 4 or len(values) < 4 + 4 * values[3]:
        raise GeoreferenceError(path, "GeoKeyDirectory is truncated")
    keys = {}
    for i in range(values[3]):
        key, location, _count, value = values[4 + 4 * i : 8 + 4 * i]
        if location == 0:  # value stored inline; others live in the params tags
            keys[key] = value
    for key in (_KEY_PROJECTED_TYPE, _KEY_GEOGRAPHIC_TYPE):
        code = keys.get(key)
        if code and code != 32767:  # 32767 = user-defined, which we do not interpret
            return CRS.from_epsg(int(code))
    return None


def to_lonlat(crs: CRS | None, xs: Any, ys: Any) -> tuple[Any, Any]:
    """Longitudes and latitudes (WGS84) of points given in ``crs``.

    Geographic systems are taken as WGS84 longitude/latitude already; projected ones (UTM for
    Sentinel-2) go through PROJ, imported only when needed.
    """
    if crs is None:
        raise GeoreferenceError(None, "no CRS: cannot place the points on the Earth")
    if crs.geographic:
        return xs, ys
    try:
        from pyproj import Transformer
        from pyproj.exceptions import CRSError
    except ImportError as error:  # pragma: no cover - pyproj is a runtime dependency
        raise GeoreferenceError(None, f"{crs}: reprojection needs pyproj ({error})") from error
    try:
        transformer = Transformer.from_crs(f"EPSG:{crs.epsg}", "EPSG:4326", always_xy=True)
    except CRSError as error:
        raise GeoreferenceError(None, f"{crs}: unknown to PROJ: {error}") from error
    return transformer.transform(xs, ys)
