"""A multi-band GeoTIFF scene, read window by window from its strips or tiles."""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from onboard.runtime.bands import resolve_band_indices
from onboard.runtime.errors import (
    BandError,
    CorruptTiffError,
    GeoreferenceError,
    NotATiffError,
    SceneError,
)
from onboard.runtime.frame import Frame, valid_mask
from onboard.runtime.georef import Georef, read_georef
from onboard.runtime.windows import Window

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_CACHE_BYTES = 64 * 2**20

# What a scene may declare before any pixel is read. A header is a few bytes anyone can change:
# without these limits a 1 KB file declaring 100 000 × 100 000 px is believed, and the reader,
# the stitched product and its preview are sized from it until the kernel kills the process.
MAX_SCENE_PIXELS = 2**30  # per band: 32 768 × 32 768 px (a Sentinel-2 tile is 10 980²)
MAX_BANDS = 1024  # hyperspectral imagers have a few hundred
MAX_SEGMENT_BYTES = 256 * 2**20  # one strip or tile, decoded: what one read may allocate


class GeoTiffScene:
    """One GeoTIFF holding all bands of a scene (chunky or planar, tiled or striped).

    Only the segments under a requested window are read and decoded; a small cache keeps recently
    decoded segments so that overlapping tiles do not decode the same data twice.
    """

    def __init__(
        self,
        path: str | Path,
        bands: list[str] | None = None,
        nodata: float | None = None,
        acquired: datetime | None = None,
        max_pixels: int = MAX_SCENE_PIXELS,
    ) -> None:
        self.path = Path(path)
        self.source_id = str(self.path)
        self.nodata = nodata
        self.max_pixels = max_pixels
        self._tif = _open_tiff(self.path)
        try:
            self._init_layout()
            self._init_metadata(bands, acquired)
        except Exception:
            self._tif.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = 0

    def _init_layout(self) -> None:
        # Malformed tags come out of tifffile as whatever its parsing hit (TypeError, zip
        # length mismatches...): each is a damaged file, never a traceback.
        try:
            self._check_layout()
        except SceneError:
            raise
        except Exception as error:
            raise CorruptTiffError(
                self.path, f"malformed image layout tags: {type(error).__name__}: {error}"
            ) from error

    def _check_layout(self) -> None:
        page = self._tif.pages.first
        self._page = page
        planes, depth, length, width, samples = (int(v) for v in page.shaped)
        if depth != 1:
            raise SceneError(self.path, f"volumetric TIFFs (depth {depth}) are not scenes")
        if length <= 0 or width <= 0 or planes <= 0 or samples <= 0:
            raise CorruptTiffError(self.path, f"declares an empty image ({width} × {length} px, "
                                              f"{planes * samples} bands)")
        if page.dtype is None:
            raise CorruptTiffError(self.path, f"unsupported sample format "
                                              f"({page.bitspersample} bits per sample)")
        size = os.path.getsize(self.path)
        self._check_declared_size(length, width, planes * samples, page.dtype, size)
        if page.compression != 1:
            try:
                page.decode  # noqa: B018 - raises here if the codec is not available
            except Exception as error:  # tifffile raises several types for this
                raise CorruptTiffError(self.path, f"cannot decode: {error}") from error
        self.height, self.width = length, width
        self.count = planes * samples
        self.dtype = page.dtype
        self._planar = planes > 1
        if page.is_tiled:
            self._seg_h, self._seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            rows = int(page.rowsperstrip)
            if rows <= 0:
                raise CorruptTiffError(self.path, f"RowsPerStrip is {rows}: strips must hold "
                                                  "at least one row")
            self._seg_h, self._seg_w = min(rows, self.height), self.width
        if self._seg_h <= 0 or self._seg_w <= 0:
            raise CorruptTiffError(
                self.path, f"segments of {self._seg_w} × {self._seg_h} px hold no pixels")
        seg_bytes = self._seg_h * self._seg_w * (1 if self._planar else self.count) \
            * self.dtype.itemsize
        if seg_bytes > MAX_SEGMENT_BYTES:
            raise SceneError(
                self.path, f"one {'tile' if page.is_tiled else 'strip'} of {self._seg_w} × "
                           f"{self._seg_h} px decodes to {_size(seg_bytes)}, more than the "
                           f"{_size(MAX_SEGMENT_BYTES)} a read may allocate")
        self._down = math.ceil(self.height / self._seg_h)
        self._across = math.ceil(self.width / self._seg_w)
        offsets, counts = page.dataoffsets, page.databytecounts
        expected = (planes if self._planar else 1) * self._down * self._across
        if len(offsets) != expected or len(counts) != expected:
            raise CorruptTiffError(
                self.path, f"{len(offsets)} data segments and {len(counts)} byte counts where "
                           f"the layout needs {expected}"
            )
        ends = [o + c for o, c in zip(offsets, counts, strict=True) if c]
        if ends and max(ends) > size:
            raise CorruptTiffError(
                self.path,
                f"truncated: image data runs to byte {max(ends)} but the file has {size} bytes",
            )
        if page.compression == 1:
            self._check_uncompressed_counts(counts)

    def _check_declared_size(self, height: int, width: int, bands: int, dtype: np.dtype,
                             size: int) -> None:
        """Refuse a header whose image cannot be what the file holds, before any allocation."""
        pixels = height * width
        declared = pixels * bands * np.dtype(dtype).itemsize
        claim = f"declares {width} × {height} px × {bands} band(s) ({_size(declared)} of " \
                f"pixels) in a {_size(size)} file"
        if pixels > self.max_pixels:
            raise SceneError(self.path, f"implausible image size: {claim}; the limit is "
                                        f"{self.max_pixels:,} px per band")
        if bands > MAX_BANDS:
            raise SceneError(self.path, f"implausible image size: {claim}; the limit is "
                                        f"{MAX_BANDS} bands")

    def _check_uncompressed_counts(self, counts: Any) -> None:
        """Uncompressed segments hold every byte they decode to (sparse ones hold none)."""
        samples = 1 if self._planar else self.count
        for index, count in enumerate(counts):
            if not count:
                continue
            row = (index % (self._down * self._across)) // self._across
            rows = self._seg_h if self._page.is_tiled else \
                min(self._seg_h, self.height - row * self._seg_h)
            needed = rows * self._seg_w * samples * self.dtype.itemsize
            if count < needed:
                raise CorruptTiffError(
                    self.path, f"implausible image size: uncompressed segment {index} stores "
                               f"{count} bytes but the declared {self.width} × {self.height} px "
                               f"image needs {needed}")

    def _init_metadata(self, bands: list[str] | None, acquired: datetime | None) -> None:
        page = self._page
        meta = _onboard_metadata(page)
        names = bands or meta.get("bands") or [f"band{i + 1}" for i in range(self.count)]
        if len(names) != self.count:
            raise BandError(
                self.path, f"{len(names)} band names given for {self.count} bands in the file"
            )
        self.bands = tuple(names)
        tags = {tag.code: tag.value for tag in page.tags.values()}
        try:
            self.georef: Georef | None = read_georef(tags, self.path)
        except GeoreferenceError:
            raise
        except Exception as error:  # malformed tag values
            raise GeoreferenceError(self.path, f"unreadable GeoTIFF tags: {error}") from error
        if self.georef is not None:
            self.gsd_m = float(min(self.georef.gsd_m(self.height)))
        else:
            self.gsd_m = float(meta.get("gsd_m", float("nan")))
        when = acquired or meta.get("acquired")
        self.acquired = datetime.fromisoformat(when) if isinstance(when, str) else when
        self.tile_shape = (self._seg_h, self._seg_w) if page.is_tiled else None
        self.compression = page.compression.name if hasattr(page.compression, "name") else str(
            page.compression
        )

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> GeoTiffScene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GeoTiffScene({str(self.path)!r}, {self.count}×{self.height}×{self.width})"

    def read(self, window: Window, bands: list[str] | tuple[str, ...] | None = None) -> Frame:
        """The frame under ``window``; only ``bands`` (own or common names) when given, and a
        planar file then decodes only those planes."""
        indices = None if bands is None else resolve_band_indices(list(self.bands), list(bands),
                                                                 self.source_id)
        pixels = self.read_pixels(window, indices)
        names = self.bands if indices is None else tuple(self.bands[i] for i in indices)
        return Frame(
            pixels=pixels,
            bands=names,
            gsd_m=self.gsd_m,
            georef=None if self.georef is None else self.georef.window(
                window.col_off, window.row_off
            ),
            acquired=self.acquired,
            source_id=self.source_id,
            valid=valid_mask(pixels, self.nodata),
        )

    def read_pixels(self, window: Window, indices: list[int] | None = None) -> np.ndarray:
        """Pixels (bands, height, width) under ``window``, which must lie inside the scene;
        only the bands at ``indices`` (in that order) when given."""
        r0, c0, h, w = window.row_off, window.col_off, window.height, window.width
        if r0 < 0 or c0 < 0 or r0 + h > self.height or c0 + w > self.width or h <= 0 or w <= 0:
            raise SceneError(
                self.path, f"window {window} is outside the {self.height}×{self.width} scene"
            )
        wanted = list(range(self.count)) if indices is None else list(indices)
        out = np.empty((len(wanted), h, w), dtype=self.dtype)
        # A planar file decodes only the planes asked for; a chunky one decodes every band.
        planes = wanted if self._planar else [0]
        for ty in range(r0 // self._seg_h, (r0 + h - 1) // self._seg_h + 1):
            for tx in range(c0 // self._seg_w, (c0 + w - 1) // self._seg_w + 1):
                sy, sx = ty * self._seg_h, tx * self._seg_w
                # overlap of the segment and the window, in image coordinates
                y0, y1 = max(r0, sy), min(r0 + h, sy + self._seg_h, self.height)
                x0, x1 = max(c0, sx), min(c0 + w, sx + self._seg_w, self.width)
                for slot, plane in enumerate(planes):
                    index = (plane * self._down + ty) * self._across + tx
                    seg = self._segment(index)  # (seg_h, seg_w, samples)
                    block = seg[y0 - sy : y1 - sy, x0 - sx : x1 - sx]
                    target = out[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0]
                    if self._planar:
                        target[slot] = block[..., 0]
                    else:
                        target[:] = np.moveaxis(block[..., wanted], -1, 0)
        return out

    def _segment(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is not None:
            self._cache.move_to_end(index)
            return cached
        page = self._page
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        samples = 1 if self._planar else self.count
        if count == 0:  # sparse TIFF: an empty segment reads as zeros
            seg = np.zeros((self._seg_h, self._seg_w, samples), dtype=self.dtype)
        else:
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
            if len(data) != count:
                raise CorruptTiffError(self.path, f"truncated: segment {index} is incomplete")
            try:
                decoded, _, shape = page.decode(data, index)
            except Exception as error:  # codecs raise their own types
                raise CorruptTiffError(
                    self.path, f"segment {index} at byte {offset} cannot be decoded: {error}"
                ) from error
            if decoded is None:
                raise CorruptTiffError(self.path, f"segment {index} decoded to nothing")
            try:
                seg = decoded.reshape(shape[1:])  # drop depth: (length, width, samples)
            except ValueError as error:
                raise CorruptTiffError(
                    self.path, f"segment {index} decoded to {decoded.size} values where its "
                               f"shape {shape} needs {math.prod(shape)}") from error
            row = (index % (self._down * self._across)) // self._across
            rows = min(self._seg_h, self.height - row * self._seg_h)
            if seg.shape[0] < rows or seg.shape[1] != self._seg_w or seg.shape[2] != samples \
                    or seg.dtype != self.dtype:
                raise CorruptTiffError(
                    self.path, f"segment {index} decoded to {seg.shape} {seg.dtype}, not the "
                               f"declared {rows} × {self._seg_w} px × {samples} {self.dtype}")
        self._cache[index] = seg
        self._cache_bytes += seg.nbytes
        while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return seg


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise SceneError(path, "file not found") from None
    except OSError as error:
        raise SceneError(path, f"cannot be read: {error.strerror or error}") from error
    if magic not in _TIFF_MAGIC:
        raise NotATiffError(path, f"not a TIFF file (starts with {magic!r})")
    try:
        tif = tifffile.TiffFile(path)
        _ = tif.pages.first.shaped
    except Exception as error:  # tifffile raises TiffFileError, ValueError, struct.error...
        raise CorruptTiffError(path, f"corrupt or truncated TIFF: {error}") from error
    if len(tif.pages) == 0:
        tif.close()
        raise CorruptTiffError(path, "TIFF has no images")
    return tif


def _onboard_metadata(page: Any) -> dict[str, Any]:
    """The metadata onboard's product writer stores in ImageDescription, if present."""
    try:
        meta = json.loads(page.description or "{}")
    except ValueError:
        return {}
    value = meta.get("onboard") if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else {}
