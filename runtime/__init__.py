"""onboard's flight runtime: lean (numpy, tifffile, imagecodecs, onnxruntime), never torch."""

from onboard.runtime.errors import OnboardError
from onboard.runtime.frame import Frame
from onboard.runtime.georef import CRS, Affine, Georef
from onboard.runtime.sources import GeoTiffScene, OscdPair, OscdScene, Spool, open_scene
from onboard.runtime.windows import Stitcher, TileGrid, Window

__all__ = [
    "CRS",
    "Affine",
    "Frame",
    "GeoTiffScene",
    "Georef",
    "OnboardError",
    "OscdPair",
    "OscdScene",
    "Spool",
    "Stitcher",
    "TileGrid",
    "Window",
    "open_scene",
]
