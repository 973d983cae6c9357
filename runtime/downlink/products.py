"""Products: what the downlink can send of one tile, each made in memory at its own cost.

Four kinds, cheapest first:

- ``thumbnail``: an RGB PNG, block-averaged ``thumbnail_scale`` times and stretched;
- ``mask``: named uint8 layers (the cloud class mask; later stages add theirs) as a zstd GeoTIFF;
- ``full``: every band, lossless: tiled zstd GeoTIFF with the horizontal predictor;
- ``near_lossless``: every band in LERC (its own zstd layer behind it), every decoded value within
  ``max_error_dn`` of the original;
- ``superres``: what the super-resolution bundle of ``[superres]`` makes of the tile (see
  :mod:`onboard.runtime.stages.superres`): its output bands at its ``scale_factor`` times their
  sampling, both as its manifest states them (:class:`SuperResOutput`), lossless zstd. Not in the
  default kinds: it costs a model run, so a config asks for it.

A maker returns a :class:`Product`: the encoded bytes with kind, media type, suffix and metadata,
so the size the planner records is the real compressed size, known before anything is written.
:meth:`ProductMaker.estimate_bytes` gives the size before making, for the plan; see
:class:`SizeModel` for how it learns. Writing (:meth:`Product.write`, :func:`write_geotiff`) goes
through :mod:`onboard.runtime.durability`, so a crash or a full disk never leaves a half product
where the downlink queue could pick it up.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from onboard.runtime.bands import SENTINEL2_BY_NAME, resolve_band_indices, sentinel2_band
from onboard.runtime.config import register_section
from onboard.runtime.downlink.quicklook import stretch_rgb
from onboard.runtime.durability import atomic_path, write_bytes
from onboard.runtime.errors import BandError, ConfigError, ProductWriteError, StorageError
from onboard.runtime.frame import Frame
from onboard.runtime.georef import Georef
from onboard.runtime.png import encode_png
from onboard.runtime.windows import Window

PRODUCT_KINDS = ("thumbnail", "mask", "full", "near_lossless", "superres")
# What the planner chooses from unless products.kinds says otherwise.
DEFAULT_KINDS = ("thumbnail", "mask", "full", "near_lossless")
COMPRESSIONS = ("zstd", "deflate", "lerc", "none")
GEOTIFF_MEDIA_TYPE = "image/tiff; application=geotiff"
PNG_MEDIA_TYPE = "image/png"


@dataclass(frozen=True)
class ProductConfig:
    """``[products]``: which kinds the planner may choose from and how each is made."""

    kinds: tuple[str, ...] = DEFAULT_KINDS
    max_error_dn: float = 2.0  # near_lossless: no decoded value is further than this from the DN
    thumbnail_scale: int = 4  # thumbnail pixels are the mean of scale × scale tile pixels
    thumbnail_bands: tuple[str, ...] = ("red", "green", "blue")
    compression_level: int = 3  # zstd; 9 saves ~2 % on Sentinel-2 tiles at 4x the time
    tile: int = 256  # internal GeoTIFF tile size (a multiple of 16)
    # What the [superres] bundle makes (its output bands, superres pixels per input pixel along
    # each axis). None: as its manifest states, which a run takes; a value given is a check,
    # and a run refuses a bundle that disagrees with it rather than plan the wrong size.
    superres_bands: tuple[str, ...] | None = None
    superres_scale: int | None = None

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in PRODUCT_KINDS]
        if unknown or not self.kinds:
            raise ConfigError(f"products.kinds must be some of {list(PRODUCT_KINDS)}, got "
                              f"{list(self.kinds)}")
        if len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(f"products.kinds names a kind twice: {list(self.kinds)}")
        if not 0.0 <= self.max_error_dn <= 1000.0:
            raise ConfigError(f"products.max_error_dn must be in [0, 1000], got "
                              f"{self.max_error_dn}")
        if not 1 <= self.thumbnail_scale <= 64:
            raise ConfigError(f"products.thumbnail_scale must be in [1, 64], got "
                              f"{self.thumbnail_scale}")
        if len(self.thumbnail_bands) != 3:
            raise ConfigError(f"products.thumbnail_bands must name 3 bands (red, green, blue), "
                              f"got {list(self.thumbnail_bands)}")
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"products.compression_level must be in [1, 22] (zstd), got "
                              f"{self.compression_level}")
        if self.tile < 16 or self.tile % 16:
            raise ConfigError(f"products.tile must be a positive multiple of 16, got {self.tile}")
        if self.superres_bands is not None and not self.superres_bands:
            raise ConfigError("products.superres_bands must name a band (or be left out: the "
                              "[superres] bundle's)")
        if self.superres_scale is not None and not 1 <= self.superres_scale <= 8:
            raise ConfigError(f"products.superres_scale must be in [1, 8] (or be left out: the "
                              f"[superres] bundle's), got {self.superres_scale}")


@dataclass(frozen=True)
class SuperResOutput:
    """What a super-resolution bundle makes, as its manifest states it: the planner sizes
    ``superres`` products by it, and each product records it (scale factor, provenance)."""

    scale_factor: int  # output pixels per input pixel, along each axis
    bands: tuple[str, ...]  # its output bands (the bundle's names, or the scene's for them)
    bundle: str = ""  # "name@version" of the bundle, for the product's provenance

    def check(self, config: ProductConfig, where: str) -> None:
        """Refuse a ``[products]`` section whose superres_scale or superres_bands disagree
        with the bundle: its products would be planned at the wrong size."""
        if config.superres_scale is not None and config.superres_scale != self.scale_factor:
            raise ConfigError(f"{where}: products.superres_scale = {config.superres_scale} but "
                              f"the [superres] bundle {self.bundle} makes x{self.scale_factor}; "
                              "leave superres_scale out to take the bundle's")
        stated = config.superres_bands
        if stated is not None and [_band_key(b) for b in stated] != [_band_key(b)
                                                                     for b in self.bands]:
            raise ConfigError(f"{where}: products.superres_bands = {list(config.superres_bands)}"
                              f" but the [superres] bundle {self.bundle} makes "
                              f"{list(self.bands)}; leave superres_bands out to take the "
                              "bundle's")


def _band_key(name: str) -> str:
    """One name per Sentinel-2 band, whichever of its names is given (blue and B02 agree; the
    red-edge bands share a common name, so their own names are compared)."""
    try:
        return sentinel2_band(name).name
    except BandError:
        return name.strip().lower()


def superres_band_names(output: SuperResOutput, available: Iterable[str]) -> tuple[str, ...]:
    """The scene's own names for the bands a super-resolution bundle makes (B02 for its blue),
    which its products carry and the size model learns under; the bundle's names where the
    scene lacks one (no product can be made of it then, but it can be sized)."""
    available = list(available)
    try:
        return tuple(available[i] for i in resolve_band_indices(available, list(output.bands),
                                                                None))
    except BandError:
        return output.bands


# Without a bundle to ask (a maker on its own): the x2 bundle's output.
DEFAULT_SUPERRES = SuperResOutput(2, ("blue", "green", "red", "nir"))


register_section("products", ProductConfig, doc="product kinds and how they are encoded")


@dataclass(frozen=True, eq=False)
class Product:
    """One encoded product of one tile, in memory.

    ``shape`` and ``georef`` are those of the tile's grid on the acquisition (the footprint the
    STAC Item describes), also for the thumbnail, whose own pixel size is in ``metadata``.
    """

    kind: str
    data: bytes = field(repr=False)
    media_type: str
    suffix: str
    roles: tuple[str, ...]
    shape: tuple[int, int]
    georef: Georef | None
    acquired: datetime | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def multihash(self) -> str:
        """SHA-256 as a multihash in hex (``1220`` + digest), as STAC's ``file:checksum``."""
        return "1220" + self.sha256

    def write(self, path: str | Path) -> Path:
        """Write the product to ``path`` atomically; :class:`ProductWriteError` on failure,
        with ``path`` left as it was."""
        path = Path(path)
        try:
            return write_bytes(path, self.data)
        except ProductWriteError:
            raise
        except StorageError as error:
            raise ProductWriteError(path, f"cannot write product: {error.problem}") from error


def product_id(tile_id: str, kind: str) -> str:
    """A file-name-safe id of a tile's product: ``<acquisition>/<row>_<col>`` -> the same with
    every character outside ``[A-Za-z0-9._-]`` as ``_``, then ``-<kind>``."""
    safe = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_"
                   for ch in tile_id).strip("._")
    return f"{safe or 'tile'}-{kind}"


def crop(frame: Frame, window: Window) -> Frame:
    """The part of ``frame`` under ``window`` (in the frame's coordinates): a tile's core,
    which is what its products should hold, so neighbouring products do not overlap."""
    rows, cols = window.slices
    return replace(
        frame,
        pixels=frame.pixels[:, rows, cols],
        georef=None if frame.georef is None else frame.georef.window(window.col_off,
                                                                     window.row_off),
        valid=None if frame.valid is None else frame.valid[rows, cols],
    )


# ---------------------------------------------------------------------------------------------
# GeoTIFF encoding


def _geotiff_options(dtype: np.dtype, compression: str, level: int | None,
                     max_error: float | None) -> dict[str, Any]:
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if compression == "none":
        return {}
    if compression == "lerc":
        # LERC quantises to steps of 2 * max_error; its zstd layer then takes what is left.
        return {"compression": "lerc",
                "compressionargs": {"level": float(max_error or 0.0), "compression": "zstd"}}
    # Horizontal differencing makes smooth imagery compress far better; floats need the
    # floating-point predictor.
    options: dict[str, Any] = {"compression": compression,
                               "predictor": 3 if dtype.kind == "f" else 2}
    if level is not None:
        options["compressionargs"] = {"level": level}
    return options


def _tiff_tags(bands: list[str] | tuple[str, ...], georef: Georef | None, acquired: datetime | None,
               source_id: str, extra: dict[str, Any] | None) -> tuple[str, list[Any]]:
    meta: dict[str, Any] = {"bands": list(bands), "source_id": source_id}
    if acquired is not None:
        meta["acquired"] = acquired.isoformat()
    if georef is not None:
        meta["crs"] = str(georef.crs) if georef.crs else None
    meta.update(extra or {})
    extratags = list(georef.to_tags()) if georef is not None else []
    extratags.append((42112, "s", 0, _gdal_metadata(bands), True))
    return json.dumps({"onboard": meta}), extratags


def _write_tiff(target: Any, pixels: np.ndarray | Iterable[np.ndarray],
                shape: tuple[int, int, int], dtype: np.dtype, tile: int, description: str,
                extratags: list[Any], options: dict[str, Any], planar: str = "separate") -> None:
    with tifffile.TiffWriter(target, bigtiff=_needs_bigtiff(shape, dtype)) as tif:
        single = shape[0] == 1
        if single and isinstance(pixels, np.ndarray):
            pixels = pixels[0]
        contig = planar == "contig" and not single
        if contig and isinstance(pixels, np.ndarray):
            pixels = np.moveaxis(pixels, 0, -1)
        tif.write(
            pixels,
            shape=shape[1:] if single else (*shape[1:], shape[0]) if contig else shape,
            dtype=dtype,
            tile=(tile, tile),
            planarconfig=None if single else planar,
            photometric="minisblack",
            description=description,
            metadata=None,
            extratags=extratags,
            **options,
        )


def encode_geotiff(
    pixels: np.ndarray,
    bands: list[str] | tuple[str, ...],
    georef: Georef | None,
    *,
    compression: str = "zstd",
    level: int | None = None,
    max_error: float | None = None,
    tile: int = 256,
    acquired: datetime | None = None,
    source_id: str = "",
    extra: dict[str, Any] | None = None,
) -> bytes:
    """(bands, height, width) pixels as the bytes of a tiled, compressed, planar GeoTIFF.

    The internal tile shrinks to the image (rounded up to 16) so a small tile product is not
    padded to 256 × 256."""
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.shape[0] != len(bands):
        raise BandError(source_id or None,
                        f"{pixels.shape[0]} bands of pixels but {len(bands)} band names")
    dtype = pixels.dtype
    tile = min(tile, 16 * -(-max(pixels.shape[1:]) // 16))
    description, extratags = _tiff_tags(bands, georef, acquired, source_id, extra)
    buffer = io.BytesIO()
    _write_tiff(buffer, np.ascontiguousarray(pixels), pixels.shape, dtype, tile, description,
                extratags, _geotiff_options(dtype, compression, level, max_error))
    return buffer.getvalue()


def write_geotiff(
    path: str | Path,
    pixels: np.ndarray | Iterable[np.ndarray],
    bands: list[str] | tuple[str, ...],
    georef: Georef | None,
    *,
    shape: tuple[int, int, int] | None = None,
    dtype: np.dtype | type | None = None,
    compression: str = "zstd",
    level: int | None = None,
    max_error: float | None = None,
    tile: int = 256,
    acquired: datetime | None = None,
    source_id: str = "",
    extra: dict[str, Any] | None = None,
    planar: str = "separate",
) -> Path:
    """Write (bands, height, width) pixels as a tiled, compressed, planar GeoTIFF, atomically.

    ``pixels`` may also be an iterator of tiles (each ``tile`` × ``tile``, band by band, rows
    then columns, edge tiles padded) with ``shape`` and ``dtype`` given, to write scenes larger
    than memory: those are streamed to the temporary file rather than encoded in memory.
    ``planar="contig"`` stores the bands pixel-interleaved instead, each tile then
    ``(tile, tile, bands)`` with every band, rows then columns: the order in which a tiled
    producer (:class:`~onboard.runtime.windows.StreamingStitcher`) finishes them, so a
    many-band scene streams through a band of rows rather than whole bands.
    """
    path = Path(path)
    if isinstance(pixels, np.ndarray):
        if pixels.ndim == 2:
            pixels = pixels[None]
        shape, dtype = pixels.shape, pixels.dtype
    elif shape is None or dtype is None:
        raise ConfigError("shape and dtype are required when pixels is an iterator of tiles")
    if shape[0] != len(bands):
        raise BandError(path, f"{shape[0]} bands of pixels but {len(bands)} band names")
    dtype = np.dtype(dtype)
    options = _geotiff_options(dtype, compression, level, max_error)
    description, extratags = _tiff_tags(bands, georef, acquired, source_id, extra)
    if planar not in ("separate", "contig"):
        raise ConfigError(f"planar must be 'separate' or 'contig', got {planar!r}")
    try:
        with atomic_path(path) as tmp:
            _write_tiff(tmp, pixels, shape, dtype, tile, description, extratags, options,
                        planar)
    except ProductWriteError:
        raise
    except StorageError as error:
        raise ProductWriteError(path, f"cannot write product: {error.problem}") from error
    return path


def _needs_bigtiff(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    return int(np.prod(shape)) * dtype.itemsize > 3 * 2**30


def _gdal_metadata(bands: list[str] | tuple[str, ...]) -> str:
    """Band descriptions as GDAL reads them (tag 42112), so GDAL tools show band names."""
    items = "".join(
        f'<Item name="DESCRIPTION" sample="{i}" role="description">{name}</Item>'
        for i, name in enumerate(bands)
    )
    return f"<GDALMetadata>{items}</GDALMetadata>"


def _band_bytes(data: bytes, bands: int) -> tuple[list[int], int]:
    """Compressed bytes of each band of a planar TIFF we wrote, and the rest (header, tags)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        counts = np.asarray(tif.pages[0].databytecounts, dtype=np.int64)
    per_band = [int(c.sum()) for c in np.array_split(counts, bands)]
    return per_band, len(data) - int(counts.sum())


# ---------------------------------------------------------------------------------------------
# The makers


def _band_names(frame: Frame) -> list[str]:
    return list(frame.bands)


def make_full(frame: Frame, config: ProductConfig = ProductConfig()) -> Product:
    """Every band of the tile, lossless (zstd with the horizontal predictor)."""
    data = encode_geotiff(frame.pixels, frame.bands, frame.georef, compression="zstd",
                          level=config.compression_level, tile=config.tile,
                          acquired=frame.acquired, source_id=frame.source_id,
                          extra={"kind": "full"})
    return _geotiff_product("full", data, frame, ("data",), {
        "bands": _band_names(frame), "dtype": str(frame.pixels.dtype), "compression": "zstd",
        "lossless": True})


def make_near_lossless(frame: Frame, config: ProductConfig = ProductConfig()) -> Product:
    """Every band in LERC: no decoded value is more than ``config.max_error_dn`` from the
    original (for integer data the bound is on the DN; LERC guarantees it per pixel)."""
    bound = float(config.max_error_dn)
    data = encode_geotiff(frame.pixels, frame.bands, frame.georef, compression="lerc",
                          max_error=bound, tile=config.tile, acquired=frame.acquired,
                          source_id=frame.source_id,
                          extra={"kind": "near_lossless", "max_error_dn": bound})
    return _geotiff_product("near_lossless", data, frame, ("data",), {
        "bands": _band_names(frame), "dtype": str(frame.pixels.dtype), "compression": "lerc",
        "lossless": bound == 0.0, "max_error_dn": bound})


def make_superres(frame: Frame, config: ProductConfig = ProductConfig(),
                  output: SuperResOutput = DEFAULT_SUPERRES) -> Product:
    """The super-resolved bands of a tile, lossless (zstd with the horizontal predictor).

    ``frame`` is the super-resolution output (:meth:`SuperResolver.upsample
    <onboard.runtime.stages.superres.SuperResolver.upsample>`): its pixels, bands and georef
    are those of the finer grid, which covers the same footprint, so the product's ``shape``
    and ``georef`` (and its STAC ``proj:`` fields) describe the image as stored. ``output``
    is what the bundle that made it states: its scale factor and id go into the product.
    """
    if frame.pixels.shape[0] != len(output.bands):
        raise BandError(frame.source_id or None,
                        f"a superres product of {frame.pixels.shape[0]} bands, but the bundle "
                        f"{output.bundle or '?'} makes {list(output.bands)}")
    provenance = {"scale_factor": output.scale_factor}
    if output.bundle:
        provenance["bundle"] = output.bundle
    data = encode_geotiff(frame.pixels, frame.bands, frame.georef, compression="zstd",
                          level=config.compression_level, tile=config.tile,
                          acquired=frame.acquired, source_id=frame.source_id,
                          extra={"kind": "superres", **provenance})
    return _geotiff_product("superres", data, frame, ("data", "superres"), {
        "bands": _band_names(frame), "dtype": str(frame.pixels.dtype), "compression": "zstd",
        "lossless": True, "gsd_m": frame.gsd_m, **provenance})


def make_mask(layers: Mapping[str, np.ndarray], georef: Georef | None, *,
              acquired: datetime | None = None, source_id: str = "",
              config: ProductConfig = ProductConfig()) -> Product:
    """Named uint8 layers of one tile's grid (``{"cloud": mask}``: 0 clear, 1 cloud, 2 shadow,
    255 no data) as one zstd GeoTIFF, a band per layer, named after it."""
    if not layers:
        raise BandError(source_id or None, "a mask product needs at least one layer")
    names = list(layers)
    arrays = [np.asarray(layers[name]) for name in names]
    shape = arrays[0].shape
    for name, array in zip(names, arrays, strict=True):
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape != shape:
            raise BandError(source_id or None, f"mask layer {name!r} must be uint8 {shape}, got "
                                               f"{array.dtype} {array.shape}")
    data = encode_geotiff(np.stack(arrays), names, georef, compression="zstd",
                          level=config.compression_level, tile=config.tile, acquired=acquired,
                          source_id=source_id, extra={"kind": "mask"})
    return Product("mask", data, GEOTIFF_MEDIA_TYPE, ".tif", ("data", "cloud"),
                   (int(shape[0]), int(shape[1])), georef, acquired,
                   {"bands": names, "dtype": "uint8", "compression": "zstd", "lossless": True})


def make_thumbnail(frame: Frame, config: ProductConfig = ProductConfig()) -> Product:
    """An RGB PNG of the tile, block-averaged and stretched per band (2-98 %)."""
    try:
        rgb = frame.select(list(config.thumbnail_bands)).pixels
    except BandError as error:
        raise BandError(frame.source_id or None,
                        f"thumbnail needs bands {list(config.thumbnail_bands)}: "
                        f"{error.problem}") from error
    small = block_mean(rgb, config.thumbnail_scale)
    image = stretch_rgb(small)
    data = encode_png(image)
    return Product("thumbnail", data, PNG_MEDIA_TYPE, ".png", ("thumbnail",), frame.shape,
                   frame.georef, frame.acquired,
                   {"bands": list(config.thumbnail_bands), "scale": config.thumbnail_scale,
                    "pixels": [int(image.shape[0]), int(image.shape[1])]})


def block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """(bands, H, W) -> (bands, ceil(H / factor), ceil(W / factor)) means of factor² blocks;
    edge blocks average the pixels they have."""
    if factor == 1:
        return pixels.astype(np.float32)
    b, h, w = pixels.shape
    oh, ow = -(-h // factor), -(-w // factor)
    padded = np.zeros((b, oh * factor, ow * factor), np.float32)
    padded[:, :h, :w] = pixels
    weight = np.zeros((oh * factor, ow * factor), np.float32)
    weight[:h, :w] = 1.0
    sums = padded.reshape(b, oh, factor, ow, factor).sum(axis=(2, 4))
    counts = weight.reshape(oh, factor, ow, factor).sum(axis=(1, 3))
    return sums / counts


def _geotiff_product(kind: str, data: bytes, frame: Frame, roles: tuple[str, ...],
                     metadata: dict[str, Any]) -> Product:
    return Product(kind, data, GEOTIFF_MEDIA_TYPE, ".tif", roles, frame.shape, frame.georef,
                   frame.acquired, metadata)


# ---------------------------------------------------------------------------------------------
# Size estimates


# First guesses, in bits per sample, before anything was made: measured on the bundled Hong Kong
# sample (13 Sentinel-2 bands on the 10 m grid, 256² tiles: 10 m bands ~9.5 bits lossless, 20 m
# ones ~3.2 and 60 m ones ~0.4, resampled; LERC at 2 DN ~6.6 / 4.8 / 1.0). A guess per band name
# where the band's native resolution decides; the fallback for unknown bands is the 10 m one.
_FIRST_GUESS_BITS: dict[str, dict[str, float]] = {
    "full": {"10": 9.5, "20": 3.3, "60": 0.4},
    "near_lossless": {"10": 6.6, "20": 4.9, "60": 1.0},
    # Per output sample, by the band's native resolution: the sample's x2 bands 8.0-9.4 bits
    # (mean 8.4); its sharpened 20 m bands 9.4-10.5 (each 10 m sample its own value now, not a
    # copy of a 20 m one). No bundle sharpens the 60 m bands: as the 20 m ones.
    "superres": {"10": 8.4, "20": 9.9, "60": 9.9},
}
_FIRST_GUESS_OVERHEAD = {"full": 1200.0, "near_lossless": 1400.0, "mask": 800.0,
                         "thumbnail": 60.0, "superres": 1200.0}
_FIRST_GUESS_MASK_BITS = 0.15  # per pixel per layer: class masks are long runs
_FIRST_GUESS_THUMBNAIL_BITS = 20.0  # per RGB pixel: unfiltered stretched imagery barely packs


class SizeModel:
    """Learns how many bytes each product kind takes, from the products actually made.

    A GeoTIFF product is estimated band by band: ``overhead + Σ bits_per_sample[band] ×
    pixels / 8``. The compressed bytes of each band are read back from the TIFF's own byte
    counts of every product made, and each band's rate (and the header overhead) moves towards
    the measurement by an exponentially weighted average (``alpha``), so the estimate follows
    the scene (sea, city, cloud) without one odd tile swinging it. Before the first product of a
    kind the rate is a first guess measured on the sample (see ``_FIRST_GUESS_BITS``); the first
    measurement then replaces it outright. Thumbnails learn bits per output pixel, masks bits
    per pixel and layer, the same way.

    The estimate costs a dictionary look-up per band: nothing of the pixels is read.
    """

    def __init__(self, alpha: float = 0.3, max_error_dn: float = 2.0,
                 superres_scale: int = DEFAULT_SUPERRES.scale_factor) -> None:
        self.alpha = alpha
        self.max_error_dn = max_error_dn
        self.superres_scale = superres_scale
        self.rates: dict[tuple[str, str], float] = {}  # (kind, band or "*") -> bits per sample
        self.overhead: dict[str, float] = {}
        self.made: dict[str, int] = {}

    def _guess(self, kind: str, band: str) -> float:
        if kind in ("full", "near_lossless", "superres"):
            known = SENTINEL2_BY_NAME.get(band.upper())
            res = "10" if known is None else str(int(known.gsd_m))
            bits = _FIRST_GUESS_BITS[kind][res]
            if kind == "near_lossless":
                # About one bit per doubling of the quantisation step, against the 2 DN guess.
                bits = max(bits - math.log2((2 * self.max_error_dn + 1) / 5), 0.2)
            return bits
        return _FIRST_GUESS_MASK_BITS if kind == "mask" else _FIRST_GUESS_THUMBNAIL_BITS

    def rate(self, kind: str, band: str) -> float:
        return self.rates.get((kind, band), self._guess(kind, band))

    def estimate(self, kind: str, shape: tuple[int, int], bands: list[str] | tuple[str, ...],
                 thumbnail_scale: int = 4) -> int:
        """Bytes of ``kind`` for a tile of ``shape`` on the acquisition's grid (a superres
        product holds ``superres_scale``² times its pixels)."""
        h, w = shape
        if kind == "superres":
            h, w = h * self.superres_scale, w * self.superres_scale
        overhead = self.overhead.get(kind, _FIRST_GUESS_OVERHEAD[kind])
        if kind == "thumbnail":
            pixels = -(-h // thumbnail_scale) * -(-w // thumbnail_scale)
            bits = self.rate(kind, "*") * pixels
        else:
            bits = sum(self.rate(kind, band) for band in bands) * h * w
        return int(math.ceil(overhead + bits / 8))

    def record(self, product: Product) -> None:
        kind = product.kind
        h, w = product.shape
        first = kind not in self.made
        self.made[kind] = self.made.get(kind, 0) + 1
        if kind == "thumbnail":
            ph, pw = product.metadata["pixels"]
            measured = {"*": [(product.size - 70) * 8 / max(ph * pw, 1)]}
            overhead = 70.0  # PNG signature, IHDR, IDAT and IEND framing, zlib header
        else:
            bands = list(product.metadata["bands"])
            per_band, overhead = _band_bytes(product.data, len(bands))
            measured = {}
            for band, n in zip(bands, per_band, strict=True):
                measured.setdefault(band, []).append(n * 8 / (h * w))
        for band, samples in measured.items():
            bits = float(np.mean(samples))
            key = (kind, band)
            old = self.rates.get(key)
            self.rates[key] = bits if old is None else old + self.alpha * (bits - old)
        old_overhead = self.overhead.get(kind)
        self.overhead[kind] = (float(overhead) if first or old_overhead is None
                               else old_overhead + self.alpha * (overhead - old_overhead))


class ProductMaker:
    """Makes the products of tiles and learns their sizes for the next plan.

    The pipeline asks :meth:`estimate_bytes` for every candidate before planning, then
    :meth:`make` for the chosen ones and records ``product.size``, the real compressed size.
    """

    def __init__(self, config: ProductConfig = ProductConfig(), alpha: float = 0.3,
                 superres: SuperResOutput | None = None) -> None:
        """``superres``: what the ``[superres]`` bundle makes (a pass runner reads it from the
        bundle's manifest); without it, the config's superres_bands and superres_scale where
        given, else the x2 bundle's four bands at x2."""
        self.config = config
        if superres is None:
            superres = SuperResOutput(config.superres_scale or DEFAULT_SUPERRES.scale_factor,
                                      config.superres_bands or DEFAULT_SUPERRES.bands)
        else:
            superres.check(config, "[products]")
        self.superres = superres
        self.sizes = SizeModel(alpha=alpha, max_error_dn=config.max_error_dn,
                               superres_scale=superres.scale_factor)

    def estimate_bytes(self, kind: str, frame: Frame, *, layers: int | list[str] = 1) -> int:
        """Bytes the ``kind`` product of ``frame`` is expected to take (``layers``: how many
        mask layers, or their names)."""
        self._check_kind(kind)
        if kind == "mask":
            names = [f"layer{i}" for i in range(layers)] if isinstance(layers, int) else layers
            return self.sizes.estimate(kind, frame.shape, ["*"] * len(names))
        bands = list(self.config.thumbnail_bands) if kind == "thumbnail" else list(
            superres_band_names(self.superres, frame.bands)) if kind == "superres" else list(
            frame.bands)
        return self.sizes.estimate(kind, frame.shape, bands, self.config.thumbnail_scale)

    def make(self, kind: str, frame: Frame, *,
             layers: Mapping[str, np.ndarray] | None = None,
             superres: SuperResOutput | None = None) -> Product:
        """The ``kind`` product of ``frame`` (a tile's core); ``layers`` for the mask, on the
        frame's grid. For ``superres``, ``frame`` is the super-resolved core (see
        :func:`make_superres`) and ``superres`` what the bundle that made it states (default:
        the maker's)."""
        self._check_kind(kind)
        if kind == "full":
            product = make_full(frame, self.config)
        elif kind == "near_lossless":
            product = make_near_lossless(frame, self.config)
        elif kind == "thumbnail":
            product = make_thumbnail(frame, self.config)
        elif kind == "superres":
            product = make_superres(frame, self.config, superres or self.superres)
        else:
            if layers is None:
                raise BandError(frame.source_id or None, "a mask product needs its layers")
            product = make_mask(layers, frame.georef, acquired=frame.acquired,
                                source_id=frame.source_id, config=self.config)
        self.sizes.record(_as_mask_rates(product))
        return product

    def _check_kind(self, kind: str) -> None:
        if kind not in self.config.kinds:
            raise ConfigError(f"product kind {kind!r} is not configured; products.kinds is "
                              f"{list(self.config.kinds)}")


def _as_mask_rates(product: Product) -> Product:
    """Mask layers share one learnt rate (``*``): their names vary by stage, their statistics
    (long runs of a few classes) do not."""
    if product.kind != "mask":
        return product
    layers = len(product.metadata["bands"])
    return replace(product, metadata={**product.metadata, "bands": ["*"] * layers})
