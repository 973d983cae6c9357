"""Where frames come from: GeoTIFF scenes, OSCD-style band folders, spool folders."""

from onboard.runtime.sources.base import Scene, Tile
from onboard.runtime.sources.geotiff import GeoTiffScene
from onboard.runtime.sources.oscd import OscdPair, OscdScene, open_scene
from onboard.runtime.sources.spool import Spool, SpoolItem

__all__ = [
    "GeoTiffScene",
    "OscdPair",
    "OscdScene",
    "Scene",
    "Spool",
    "SpoolItem",
    "Tile",
    "open_scene",
]
