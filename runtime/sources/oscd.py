"""OSCD-style scenes: one GeoTIFF per band at mixed resolutions, resampled onto one 10 m grid.

Resampling is nearest-neighbour on purpose: it keeps every value a real digital number of the
sensor, which the cloud and change models were trained on, and costs nothing on board.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np

from onboard.runtime.bands import SENTINEL2, resolve_band_indices
from onboard.runtime.errors import BandError, GeoreferenceError, SceneError
from onboard.runtime.frame import Frame, valid_mask
from onboard.runtime.georef import Georef
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.windows import Window

_BAND_FILE = re.compile(r"(?:^|_)(B\d\d|B8A)\.tiff?$", re.IGNORECASE)
ALL_BANDS = tuple(band.name for band in SENTINEL2)


class OscdScene:
    """One date of an OSCD city folder (``imgs_1``), every band on a common 10 m grid.

    ``grid`` puts the scene on another scene's grid (the first date's, for a pair); pixels that
    fall outside this date's footprint read as 0 and are marked invalid.
    """

    def __init__(
        self,
        folder: str | Path,
        bands: list[str] | tuple[str, ...] = ALL_BANDS,
        grid: tuple[Georef, int, int] | None = None,
        acquired: datetime | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.source_id = str(self.folder)
        if not self.folder.is_dir():
            raise SceneError(self.folder, "not a folder of band files")
        files = {}
        for path in sorted(self.folder.iterdir()):
            match = _BAND_FILE.search(path.name)
            if match:
                files[match.group(1).upper()] = path
        missing = [b for b in bands if b.upper() not in files]
        if missing:
            raise BandError(
                self.folder, f"missing band file(s) {missing}; found {sorted(files)}"
            )
        self.bands = tuple(b.upper() for b in bands)
        self.band_files = {b: files[b] for b in self.bands}
        self._scenes = {b: GeoTiffScene(files[b], bands=[b]) for b in self.bands}
        for band, scene in self._scenes.items():
            if scene.count != 1:
                raise BandError(scene.path, f"band file for {band} holds {scene.count} bands")
            if scene.georef is None:
                raise GeoreferenceError(scene.path, "band file has no georeferencing")
        if grid is None:
            finest = min(self._scenes.values(), key=lambda s: s.gsd_m)
            grid = (finest.georef, finest.height, finest.width)  # type: ignore[assignment]
        self.georef, self.height, self.width = grid
        self.gsd_m = float(min(self.georef.gsd_m(self.height)))
        if acquired is None and self.folder.name in ("imgs_1", "imgs_2"):
            acquired = _read_dates(self.folder.parent)[int(self.folder.name[-1]) - 1]
        self.acquired = acquired
        self.dtype = np.result_type(*(s.dtype for s in self._scenes.values()))
        self._maps = {b: self._index_map(s) for b, s in self._scenes.items()}

    def _index_map(self, scene: GeoTiffScene) -> tuple[np.ndarray, np.ndarray]:
        """For each target row and column, the source row and column (-1 outside the source)."""
        assert scene.georef is not None
        target, source = self.georef.transform, scene.georef.transform.inverse()
        if not (target.is_rectilinear and source.is_rectilinear):
            raise GeoreferenceError(scene.path, "rotated grids are not supported")
        xs = target.c + (np.arange(self.width) + 0.5) * target.a
        ys = target.f + (np.arange(self.height) + 0.5) * target.e
        cols = np.floor(source.a * xs + source.c).astype(np.int64)
        rows = np.floor(source.e * ys + source.f).astype(np.int64)
        cols[(cols < 0) | (cols >= scene.width)] = -1
        rows[(rows < 0) | (rows >= scene.height)] = -1
        return rows, cols

    @property
    def grid(self) -> tuple[Georef, int, int]:
        return (self.georef, self.height, self.width)

    def read(self, window: Window, bands: list[str] | tuple[str, ...] | None = None) -> Frame:
        """The frame under ``window``; only ``bands`` (own or common names) when given, whose
        files alone are then read."""
        r0, c0, h, w = window.row_off, window.col_off, window.height, window.width
        if r0 < 0 or c0 < 0 or r0 + h > self.height or c0 + w > self.width:
            raise SceneError(self.folder, f"window {window} is outside the scene")
        names = self.bands if bands is None else tuple(
            self.bands[i] for i in resolve_band_indices(list(self.bands), list(bands),
                                                        self.source_id))
        out = np.zeros((len(names), h, w), dtype=self.dtype)
        inside = np.ones((h, w), dtype=bool)
        for i, band in enumerate(names):
            rows, cols = self._maps[band]
            rows, cols = rows[r0 : r0 + h], cols[c0 : c0 + w]
            row_ok, col_ok = rows >= 0, cols >= 0
            inside &= row_ok[:, None] & col_ok[None, :]
            if not row_ok.any() or not col_ok.any():
                continue
            sr0, sr1 = rows[row_ok].min(), rows[row_ok].max() + 1
            sc0, sc1 = cols[col_ok].min(), cols[col_ok].max() + 1
            src = self._scenes[band].read_pixels(Window(sr0, sc0, sr1 - sr0, sc1 - sc0))[0]
            ri = np.where(row_ok, rows - sr0, 0)
            ci = np.where(col_ok, cols - sc0, 0)
            out[i] = src[np.ix_(ri, ci)]
        valid = valid_mask(out) & inside
        out[:, ~inside] = 0
        return Frame(
            pixels=out,
            bands=names,
            gsd_m=self.gsd_m,
            georef=self.georef.window(c0, r0),
            acquired=self.acquired,
            source_id=self.source_id,
            valid=valid,
        )

    def native_gsd_m(self) -> dict[str, float]:
        """Each band's own ground sampling distance, as stored."""
        return {b: float(min(s.georef.gsd_m(s.height))) for b, s in self._scenes.items()}  # type: ignore[union-attr]

    def close(self) -> None:
        for scene in self._scenes.values():
            scene.close()


class OscdPair:
    """Both dates of an OSCD city, the second resampled onto the first date's grid."""

    def __init__(self, city: str | Path, bands: list[str] | tuple[str, ...] = ALL_BANDS) -> None:
        self.city = Path(city)
        self.name = self.city.name
        dates = _read_dates(self.city)
        self.before = OscdScene(self.city / "imgs_1", bands, acquired=dates[0])
        self.after = OscdScene(self.city / "imgs_2", bands, grid=self.before.grid,
                               acquired=dates[1])
        self.height, self.width = self.before.height, self.before.width

    def read(self, window: Window) -> tuple[Frame, Frame]:
        return self.before.read(window), self.after.read(window)

    def change_mask(self) -> np.ndarray | None:
        """True where the human label says "change" (files hold 1 = no change, 2 = change)."""
        path = self.city / "cm" / f"{self.name}-cm.tif"
        if not path.exists():
            return None
        with GeoTiffScene(path, bands=["change"]) as scene:
            mask = scene.read_pixels(Window(0, 0, scene.height, scene.width))[0]
        if mask.shape != (self.height, self.width):
            raise SceneError(path, f"change mask is {mask.shape}, the scene "
                                   f"{(self.height, self.width)}")
        return mask == 2

    def close(self) -> None:
        self.before.close()
        self.after.close()


def _read_dates(city: Path) -> tuple[datetime | None, datetime | None]:
    path = city / "dates.txt"
    if not path.exists():
        return (None, None)
    found: dict[str, datetime] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        try:
            found[key.strip()] = datetime.strptime(value.strip(), "%Y%m%d")
        except ValueError:
            raise SceneError(path, f"cannot read date in line {line!r}") from None
    return (found.get("date_1"), found.get("date_2"))


def open_scene(path: str | Path, bands: list[str] | None = None) -> GeoTiffScene | OscdScene:
    """A GeoTIFF file or a folder of per-band GeoTIFFs, as a scene."""
    path = Path(path)
    if path.is_dir():
        return OscdScene(path, tuple(bands) if bands else ALL_BANDS)
    return GeoTiffScene(path, bands=bands)
