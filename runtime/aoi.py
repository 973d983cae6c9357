"""An area of interest: GeoJSON polygons that weight the tiles inside them.

OPS-SAT's SmartCam weights acquisitions over an area of interest; here a tile whose centre lies
inside any polygon gets the configured weight, and the planner values it accordingly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onboard.runtime.config import register_section
from onboard.runtime.errors import ConfigError
from onboard.runtime.georef import Georef, to_lonlat


@dataclass(frozen=True)
class AoiConfig:
    """``[aoi]``: a GeoJSON file (WGS84 longitude/latitude, as GeoJSON requires)."""

    geojson: Path | None = None
    weight: float = 2.0  # value multiplier inside; 1 outside

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1000.0:
            raise ConfigError(f"aoi weight must be in (0, 1000], got {self.weight}")


register_section("aoi", AoiConfig, doc="area of interest")


class AreaOfInterest:
    """Polygons (outer rings with holes) in longitude/latitude."""

    def __init__(self, polygons: list[list[np.ndarray]], weight: float, source: str = "") -> None:
        self.polygons = polygons
        self.weight = weight
        self.source = source

    @classmethod
    def load(cls, config: AoiConfig) -> AreaOfInterest | None:
        if config.geojson is None:
            return None
        path = config.geojson
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: area-of-interest file not found") from None
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: not readable GeoJSON: {error}") from error
        polygons = [_rings(g, path) for g in _geometries(data, path)]
        polygons = [p for group in polygons for p in group]
        if not polygons:
            raise ConfigError(f"{path}: no Polygon or MultiPolygon in the GeoJSON")
        return cls(polygons, config.weight, str(path))

    def weights(self, georef: Georef | None, centres_colrow: np.ndarray) -> np.ndarray:
        """The weight of each tile, from its centre (col, row) on the acquisition's grid."""
        if georef is None:
            return np.ones(len(centres_colrow))
        t = georef.transform
        cols, rows = centres_colrow[:, 0], centres_colrow[:, 1]
        xs = t.a * cols + t.b * rows + t.c
        ys = t.d * cols + t.e * rows + t.f
        lon, lat = to_lonlat(georef.crs, xs, ys)
        inside = np.zeros(len(cols), bool)
        for rings in self.polygons:
            hit = _inside(rings[0], np.asarray(lon), np.asarray(lat))
            for hole in rings[1:]:
                hit &= ~_inside(hole, np.asarray(lon), np.asarray(lat))
            inside |= hit
        return np.where(inside, self.weight, 1.0)


def _geometries(data: Any, path: Path) -> list[dict[str, Any]]:
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "FeatureCollection":
        return [g for f in data.get("features", []) for g in _geometries(f, path)]
    if kind == "Feature":
        return _geometries(data.get("geometry") or {}, path)
    if kind in ("Polygon", "MultiPolygon"):
        return [data]
    if kind == "GeometryCollection":
        return [g for item in data.get("geometries", []) for g in _geometries(item, path)]
    raise ConfigError(f"{path}: unsupported GeoJSON object {kind!r}")


def _rings(geometry: dict[str, Any], path: Path) -> list[list[np.ndarray]]:
    coords = geometry.get("coordinates")
    polygons = coords if geometry["type"] == "MultiPolygon" else [coords]
    out = []
    for polygon in polygons:
        try:
            rings = [np.asarray(ring, float)[:, :2] for ring in polygon]
        except (TypeError, ValueError, IndexError) as error:
            raise ConfigError(f"{path}: malformed polygon coordinates: {error}") from error
        if not rings or any(len(r) < 4 for r in rings):
            raise ConfigError(f"{path}: malformed polygon coordinates: a ring needs at least "
                              f"four positions")
        out.append(rings)
    return out


def _inside(ring: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd ray casting of points against one closed ring."""
    inside = np.zeros(x.shape, bool)
    x0, y0 = ring[:-1, 0], ring[:-1, 1]
    x1, y1 = ring[1:, 0], ring[1:, 1]
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
        crosses = (ay > y) != (by > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            at = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < at)
    return inside
