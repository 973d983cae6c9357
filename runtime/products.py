"""Products: multi-band GeoTIFFs, tiled and compressed, with the source's georeferencing.

Files are written beside their destination and renamed into place, so a crash or a full disk
never leaves a half-written product where the downlink queue could pick it up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from onboard.runtime.errors import ProductWriteError
from onboard.runtime.georef import Georef

COMPRESSIONS = ("zstd", "deflate", "none")


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
    tile: int = 256,
    acquired: datetime | None = None,
    source_id: str = "",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write (bands, height, width) pixels as a tiled, compressed, planar GeoTIFF.

    ``pixels`` may also be an iterator of tiles (each ``tile`` × ``tile``, band by band, rows
    then columns, edge tiles padded) with ``shape`` and ``dtype`` given, to write scenes larger
    than memory.
    """
    path = Path(path)
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if isinstance(pixels, np.ndarray):
        if pixels.ndim == 2:
            pixels = pixels[None]
        shape, dtype = pixels.shape, pixels.dtype
    elif shape is None or dtype is None:
        raise ValueError("shape and dtype are required when pixels is an iterator of tiles")
    if shape[0] != len(bands):
        raise ValueError(f"{shape[0]} bands of pixels but {len(bands)} band names")
    dtype = np.dtype(dtype)
    meta: dict[str, Any] = {"bands": list(bands), "source_id": source_id}
    if acquired is not None:
        meta["acquired"] = acquired.isoformat()
    if georef is not None:
        meta["crs"] = str(georef.crs) if georef.crs else None
    meta.update(extra or {})
    options: dict[str, Any] = {}
    if compression != "none":
        # Horizontal differencing makes smooth imagery compress far better; floats need the
        # floating-point predictor.
        predictor = 3 if dtype.kind == "f" else 2
        options = {"compression": compression, "predictor": predictor}
    if level is not None and compression != "none":
        options["compressionargs"] = {"level": level}
    extratags = list(georef.to_tags()) if georef is not None else []
    extratags.append((42112, "s", 0, _gdal_metadata(bands), True))
    tmp = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(shape, dtype)) as tif:
            single = shape[0] == 1
            if single and isinstance(pixels, np.ndarray):
                pixels = pixels[0]
            tif.write(
                pixels,
                shape=shape[1:] if single else shape,
                dtype=dtype,
                tile=(tile, tile),
                planarconfig=None if single else "separate",
                photometric="minisblack",
                description=json.dumps({"onboard": meta}),
                metadata=None,
                extratags=extratags,
                **options,
            )
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        reason = error.strerror or error
        raise ProductWriteError(path, f"cannot write product: {reason}") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
