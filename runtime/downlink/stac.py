"""STAC 1.1.0 Items: one per product, so the ground can catalogue what came down.

The geometry and bbox are WGS84 longitude/latitude (RFC 7946), reprojected from the scene's CRS
with PROJ (pyproj); the tile's own grid goes into the projection extension (``proj:code``,
``proj:bbox``, ``proj:shape``, ``proj:transform``). The product's size and SHA-256 multihash go
into the file extension, cloud cover (percent) into the eo extension, and what the stages found
(scores, decision, reasons, priority, the bundles that ran) under ``onboard:``.

Plain dictionaries, standard library and pyproj only: flight code has no pystac. The tests
validate the Items with pystac and stac-pydantic on the ground side.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from onboard.runtime.downlink.products import Product
from onboard.runtime.errors import ConfigError, GeoreferenceError, StorageError
from onboard.runtime.georef import CRS, Georef
from onboard.runtime.scores import TileScore

STAC_VERSION = "1.1.0"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v1.1.0/schema.json"
PROJECTION_SCHEMA = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
EXTENSIONS = (EO_SCHEMA, PROJECTION_SCHEMA, FILE_SCHEMA)
_EDGE_POINTS = 8  # per footprint edge: a UTM square's edges are not straight in lon/lat


@functools.lru_cache(maxsize=16)
def _transformer(epsg: int) -> Any:
    try:
        from pyproj import Transformer
        from pyproj.exceptions import CRSError
    except ImportError as error:  # pragma: no cover - pyproj is a runtime dependency
        raise GeoreferenceError(None, f"EPSG:{epsg}: reprojection needs pyproj ({error})") \
            from error
    try:
        return Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    except CRSError as error:
        raise GeoreferenceError(None, f"EPSG:{epsg} is unknown to PROJ: {error}") from error


def lonlat(crs: CRS, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float],
                                                                        list[float]]:
    """Points of ``crs`` as WGS84 longitudes and latitudes."""
    if crs.epsg == 4326:
        return list(xs), list(ys)
    lons, lats = _transformer(crs.epsg).transform(list(xs), list(ys))
    return [float(v) for v in lons], [float(v) for v in lats]


def footprint(georef: Georef, shape: tuple[int, int]) -> tuple[dict[str, Any], list[float]]:
    """The GeoJSON Polygon (counter-clockwise, closed) and bbox in WGS84 of a raster of
    ``shape`` at ``georef``; each edge is densified so the bbox holds the whole tile."""
    if georef.crs is None:
        raise GeoreferenceError(None, "the product has no CRS: cannot place it on the Earth")
    h, w = shape
    n = _EDGE_POINTS
    # Pixel corners walked counter-clockwise on the map (north up): top-left, down the west
    # edge, along the south, up the east, back along the north.
    cols = [0.0] * n + [w * i / n for i in range(n)] + [float(w)] * n + \
           [w - w * i / n for i in range(n)]
    rows = [h * i / n for i in range(n)] + [float(h)] * n + [h - h * i / n for i in range(n)] + \
           [0.0] * n
    xs, ys = zip(*(georef.transform * (c, r) for c, r in zip(cols, rows, strict=True)),
                 strict=True)
    lons, lats = lonlat(georef.crs, xs, ys)
    ring = [[round(lon, 9), round(lat, 9)] for lon, lat in zip(lons, lats, strict=True)]
    if _signed_area(ring) < 0:  # a south-up or mirrored grid walks the other way round
        ring.reverse()
    ring.append(ring[0])
    bbox = [min(lons), min(lats), max(lons), max(lats)]
    return {"type": "Polygon", "coordinates": [ring]}, [round(v, 9) for v in bbox]


def _signed_area(ring: list[list[float]]) -> float:
    return sum(x0 * y1 - x1 * y0
               for (x0, y0), (x1, y1) in zip(ring, ring[1:] + ring[:1], strict=True)) / 2


def _utc(moment: datetime) -> str:
    """RFC 3339 in UTC; a naive time (OSCD's dates) is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(
        ".000000Z", "Z")


def cloud_cover_percent(score: TileScore) -> float | None:
    """Cloud cover of the tile from what the cloud stage measured, in percent."""
    values = score.values
    if "cloud_fraction" in values:
        return round(100.0 * float(values["cloud_fraction"]), 3)
    if "clear_fraction" in values:
        return round(100.0 * (1.0 - float(values["clear_fraction"])), 3)
    return None


def make_item(
    product: Product,
    score: TileScore,
    *,
    item_id: str,
    href: str,
    acquired: datetime | None = None,
    priority: float | None = None,
    bundles: Sequence[str] = (),
    cloud_cover: float | None = None,
    collection: str | None = None,
    links: Sequence[Mapping[str, Any]] = (),
    extra_properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A STAC 1.1.0 Item (a plain dict) of one product of one tile.

    ``item_id``: the product id (:func:`~onboard.runtime.downlink.products.product_id`);
    ``href``: where the product file lies, relative to the Item's JSON; ``acquired``: the
    acquisition time (default: the product's); ``priority``: the planner's value of the
    product; ``bundles``: ids of the model bundles that scored the tile, to which the bundle
    that made the product itself (a ``superres`` product's, ``metadata["bundle"]``) is added;
    ``cloud_cover``: percent, default from the cloud stage's values in ``score``.
    """
    moment = acquired or product.acquired
    if moment is None:
        raise GeoreferenceError(None, f"{item_id}: a STAC Item needs the acquisition time")
    if href.startswith("/") or "://" in href:
        raise ConfigError(f"{item_id}: asset href must be relative to the Item, got {href!r}")
    properties: dict[str, Any] = {"datetime": _utc(moment)}
    if product.georef is not None and product.georef.crs is not None:
        geometry, bbox = footprint(product.georef, product.shape)
        h, w = product.shape
        t = product.georef.transform
        properties.update({
            "proj:code": str(product.georef.crs),
            "proj:bbox": [float(v) for v in product.georef.bounds(h, w)],
            "proj:shape": [int(h), int(w)],
            "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f, 0.0, 0.0, 1.0],
        })
    else:
        geometry, bbox = None, None
    cover = cloud_cover if cloud_cover is not None else cloud_cover_percent(score)
    if cover is not None:
        properties["eo:cloud_cover"] = min(max(float(cover), 0.0), 100.0)
    properties.update({
        "onboard:tile_id": score.tile_id,
        "onboard:acquisition": score.acquisition,
        "onboard:window": [int(v) for v in score.window],
        "onboard:decision": str(score.decision),
        "onboard:reasons": list(score.reasons),
        "onboard:scores": {k: round(float(v), 6) for k, v in score.values.items()},
        "onboard:aoi_weight": float(score.aoi_weight),
        "onboard:bundles": list(dict.fromkeys([*bundles, *_made_by(product)])),
        "onboard:product_kind": product.kind,
    })
    if priority is not None:
        properties["onboard:priority"] = float(priority)
    if "max_error_dn" in product.metadata:
        properties["onboard:max_error_dn"] = float(product.metadata["max_error_dn"])
    properties.update(extra_properties or {})
    asset: dict[str, Any] = {
        "href": href,
        "type": product.media_type,
        "title": f"{product.kind} of tile {score.tile_id}",
        "roles": list(product.roles),
        "file:size": product.size,
        "file:checksum": product.multihash,
    }
    names = product.metadata.get("bands")
    if names and product.kind != "thumbnail":
        asset["bands"] = [{"name": str(name)} for name in names]
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": list(EXTENSIONS),
        "id": item_id,
        "geometry": geometry,
        "properties": properties,
        "links": [dict(link) for link in links],
        "assets": {product.kind: asset},
    }
    if bbox is not None:
        item["bbox"] = bbox
    if collection is not None:
        item["collection"] = collection
    return item


def _made_by(product: Product) -> list[str]:
    """The bundle that made the product's pixels, where one did (super-resolution)."""
    bundle = product.metadata.get("bundle")
    return [str(bundle)] if bundle else []


# -- the ground's catalogue ------------------------------------------------------------------------

def item_sha256(item: Mapping[str, Any]) -> str | None:
    """The SHA-256 (hex) an Item's asset states as its ``file:checksum`` multihash
    (``1220`` + 64 hex digits: sha2-256, 32 octets); None when no asset states one."""
    assets = item.get("assets")
    if not isinstance(assets, Mapping):
        return None
    for asset in assets.values():
        checksum = asset.get("file:checksum") if isinstance(asset, Mapping) else None
        if isinstance(checksum, str) and len(checksum) == 68 and checksum.startswith("1220"):
            return checksum[4:]
    return None


class GroundCatalogue:
    """What arrived on the ground, as a STAC ItemCollection: ``root/catalogue.json``, one
    Feature per product id, and each Item beside it in ``root/items/<name>.json`` (its asset's
    href pointing at the stored product, ``../store/<name>``).

    The Item files are the state (written when the product is stored); the collection is
    rebuilt from them on start and rewritten by :meth:`flush`, so a crash between the two loses
    nothing. An id is catalogued once: a product delivered again keeps its first Item.
    """

    def __init__(self, root: str | Path, stored_ids: set[str] | None = None) -> None:
        from onboard.runtime.durability import remove_partials

        self.root = Path(root)
        self.folder = self.root / "items"
        self.path = self.root / "catalogue.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(self.folder, f"cannot create: {error.strerror or error}") \
                from error
        remove_partials(self.folder)
        self.items: dict[str, dict[str, Any]] = {}
        for entry in sorted(self.folder.glob("*.json")):
            try:
                item = json.loads(entry.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                raise StorageError(entry, f"cannot read a catalogued Item: {error}") from error
            item_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(item_id, str) and (stored_ids is None or item_id in stored_ids):
                self.items[item_id] = item
        self._dirty = True

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def add(self, item_id: str, item: Mapping[str, Any], name: str) -> bool:
        """Catalogue ``item`` for the product stored as ``store/<name>``; False (and nothing
        written) when the id is catalogued already."""
        from onboard.runtime.durability import write_json

        if item_id in self.items:
            return False
        entry = json.loads(json.dumps(item))
        entry["id"] = item_id
        for asset in (entry.get("assets") or {}).values():
            if isinstance(asset, dict):
                asset["href"] = f"../store/{name}"
        links = [link for link in entry.get("links") or [] if isinstance(link, dict)
                 and link.get("rel") != "self"]
        entry["links"] = links + [{"rel": "self", "href": f"items/{name}.json",
                                   "type": "application/geo+json"}]
        write_json(self.folder / f"{name}.json", entry)
        self.items[item_id] = entry
        self._dirty = True
        return True

    def collection(self) -> dict[str, Any]:
        return {"type": "FeatureCollection",
                "features": [self.items[k] for k in sorted(self.items)]}

    def flush(self) -> None:
        """Write ``catalogue.json`` (atomically) when something was added since the last."""
        from onboard.runtime.durability import write_json

        if self._dirty:
            write_json(self.path, self.collection())
            self._dirty = False
