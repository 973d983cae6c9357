"""STAC Items of products: valid STAC 1.1.0, offline, in WGS84 wherever the scene's CRS is.

How the Items are validated, without the network:
- core: ``pystac.validation.validate_dict`` against the STAC 1.1.0 Item schema that pystac ships
  (``pystac/validation/jsonschemas``), with GeoJSON Feature and Geometry;
- extensions (eo v1.1.0, projection v2.0.0, file v2.1.0): pystac does not ship their schemas
  and would fetch them; neither does stac-pydantic (it fetches with requests). So the same
  pystac validator is primed with the small schemas below, written here from the extensions'
  field tables for the fields onboard writes (not copies of the official schemas), and pystac's
  own extension classes read the fields back;
- stac-pydantic's ``Item`` model parses every Item (geometry, bbox, datetime, assets, links).
A socket that raises on use proves none of it touches the network.
"""

from __future__ import annotations

import hashlib
import json
import socket
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pystac
import pytest
from pyproj import Transformer
from pystac.validation import validate_dict
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from rasterio.crs import CRS as RioCRS
from rasterio.warp import transform_geom
from stac_pydantic import Item as PydanticItem

from onboard.runtime.downlink.products import ProductMaker, crop, product_id
from onboard.runtime.downlink.stac import EO_SCHEMA, FILE_SCHEMA, PROJECTION_SCHEMA, make_item
from onboard.runtime.georef import CRS, Affine, Georef
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong" / "imgs_1"
_NUMBER = {"type": "number"}
_FIELD_SCHEMAS = {
    EO_SCHEMA: {"eo:cloud_cover": {"type": "number", "minimum": 0, "maximum": 100}},
    PROJECTION_SCHEMA: {
        "proj:code": {"type": ["string", "null"], "pattern": "^[A-Z]+:[0-9A-Za-z.-]+$"},
        "proj:bbox": {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 6},
        "proj:shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                       "minItems": 2, "maxItems": 2},
        "proj:transform": {"type": "array", "items": _NUMBER, "minItems": 6, "maxItems": 9},
    },
    FILE_SCHEMA: {
        "file:size": {"type": "integer", "minimum": 0},
        "file:checksum": {"type": "string", "pattern": "^[0-9a-f]+$"},
    },
}


def _extension_schema(uri: str) -> dict:
    fields = _FIELD_SCHEMAS[uri]
    fields_object = {"type": "object", "properties": fields}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": uri,
        "type": "object",
        "required": ["stac_extensions", "properties", "assets"],
        "properties": {
            "stac_extensions": {"type": "array", "contains": {"const": uri}},
            "properties": fields_object,
            "assets": {"type": "object", "additionalProperties": fields_object},
        },
    }


def _offline_validator() -> JsonSchemaSTACValidator:
    validator = JsonSchemaSTACValidator()
    for uri in _FIELD_SCHEMAS:
        validator.schema_cache[uri] = _extension_schema(uri)
    return validator


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network use during validation")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _validate(item: dict) -> list:
    checked = validate_dict(item, validator=_offline_validator())
    PydanticItem.model_validate(item)
    return checked


def _tile(window: Window | None = None):
    window = window or Window(64, 128, 64, 64)
    scene = open_scene(SAMPLE)
    frame = scene.read(window)
    score = TileScore(f"hongkong_20160927/{window.row_off}_{window.col_off}",
                      "hongkong_20160927", (window.row_off, window.col_off, window.height,
                                            window.width))
    score.values.update({"cloud_fraction": 0.125, "clear_fraction": 0.8, "change": 0.31})
    score.lower(Decision.DEMOTE, "12% cloud > 10% limit")
    return frame, score


def _utm_frame(frame):
    """The same pixels on a UTM 50N grid at 10 m whose top-left corner is the sample's."""
    t = frame.georef.transform
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:32650", always_xy=True).transform(t.c, t.f)
    georef = Georef(CRS.from_epsg(32650), Affine.from_origin(x, y, 10.0, 10.0))
    return type(frame)(frame.pixels, frame.bands, 10.0, georef, frame.acquired, frame.source_id,
                       frame.valid)


def _superres_product(window: Window):
    """The tile's superres product as a pass makes it: the shipped x2 INT8 bundle over the
    sample's core with its halo, on the 5 m grid."""
    from onboard.models.superres.evaluate import bundle_path
    from onboard.runtime.downlink.products import ProductConfig
    from onboard.runtime.stages.superres import LazySuperResolver, SuperResConfig

    lazy = LazySuperResolver(SuperResConfig(bundle=bundle_path("x2", "int8"), threads=2))
    try:
        maker = ProductMaker(ProductConfig(kinds=("full", "superres")), superres=lazy.output)
        return lazy.make_product(maker, open_scene(SAMPLE), window)
    finally:
        lazy.close()


@pytest.mark.parametrize("kind", ["full", "near_lossless", "mask", "thumbnail", "superres"])
def test_every_kind_gives_a_valid_item_offline(kind, no_network):
    frame, score = _tile()
    if kind == "superres":
        product = _superres_product(Window(64, 128, 64, 64))
    else:
        product = ProductMaker().make(kind, frame,
                                      layers={"cloud": np.zeros(frame.shape, np.uint8)})
    pid = product_id(score.tile_id, kind)
    item = make_item(product, score, item_id=pid, href=f"{pid}{product.suffix}",
                     priority=0.42, bundles=["cloud-4band-0.2.1"])
    checked = _validate(item)
    assert any("item.json" in uri for uri in checked)
    assert set(checked) >= {EO_SCHEMA, PROJECTION_SCHEMA, FILE_SCHEMA}
    asset = item["assets"][kind]
    assert asset["file:size"] == len(product.data)
    assert asset["file:checksum"] == "1220" + hashlib.sha256(product.data).hexdigest()
    assert asset["type"] == product.media_type
    # pystac's own extension classes read the fields back.
    stac = pystac.Item.from_dict(item)
    assert pystac.extensions.eo.EOExtension.ext(stac).cloud_cover == 12.5
    projection = pystac.extensions.projection.ProjectionExtension.ext(stac)
    # A superres Item describes the image as stored: the tile's footprint on the 5 m grid.
    assert projection.code == "EPSG:4326"
    assert projection.shape == ([128, 128] if kind == "superres" else [64, 64])
    t, t0 = product.georef.transform, frame.georef.transform
    assert projection.transform[:6] == [t.a, t.b, t.c, t.d, t.e, t.f]
    assert (t.c, t.f) == pytest.approx((t0.c, t0.f))
    assert t.a == pytest.approx(t0.a / (2 if kind == "superres" else 1))
    file = pystac.extensions.file.FileExtension.ext(stac.assets[kind])
    assert file.size == product.size and file.checksum == product.multihash
    # Provenance: the bundles that scored the tile, and the one that made a superres product.
    assert item["properties"]["onboard:bundles"] == ["cloud-4band-0.2.1"] + (
        ["superres-x2@0.1.0"] if kind == "superres" else [])
    assert item["properties"]["onboard:decision"] == "demote"
    assert item["properties"]["onboard:priority"] == 0.42
    assert item["properties"]["datetime"] == "2016-09-27T00:00:00Z"
    json.dumps(item)  # plain JSON, nothing left for default=str


def test_invalid_items_are_refused(no_network):
    frame, score = _tile()
    product = ProductMaker().make("full", frame)
    item = make_item(product, score, item_id="x", href="x.tif")
    broken = json.loads(json.dumps(item))
    broken["properties"]["eo:cloud_cover"] = 130.0
    with pytest.raises(pystac.errors.STACValidationError, match="eo"):
        _validate(broken)
    broken = json.loads(json.dumps(item))
    del broken["properties"]["datetime"]
    with pytest.raises(pystac.errors.STACValidationError):
        validate_dict(broken, validator=_offline_validator())
    broken = json.loads(json.dumps(item))
    broken["assets"]["full"]["file:size"] = "big"
    with pytest.raises(pystac.errors.STACValidationError, match="file"):
        _validate(broken)


def test_utm_footprint_is_reprojected_to_lonlat(no_network):
    frame, score = _tile(Window(0, 0, 256, 256))
    utm = _utm_frame(frame)
    product = ProductMaker().make("full", utm)
    item = make_item(product, score, item_id="utm", href="utm.tif")
    _validate(item)
    props = item["properties"]
    assert props["proj:code"] == "EPSG:32650"
    t = utm.georef.transform
    assert props["proj:bbox"] == [t.c, t.f - 2560.0, t.c + 2560.0, t.f]
    assert props["proj:transform"][:6] == [10.0, 0.0, t.c, 0.0, -10.0, t.f]
    west, south, east, north = item["bbox"]
    ring = item["geometry"]["coordinates"][0]
    # The top-left corner comes back to the sample's (114.2520 E, 22.3055 N); the UTM grid is
    # turned ~1° against the meridians there (3° west of zone 50's central meridian), so the
    # north-east corner sits ~46 m further north: the bbox holds it.
    assert ring[0] == pytest.approx([frame.georef.transform.c, frame.georef.transform.f],
                                    abs=1e-7)
    assert north - ring[0][1] == pytest.approx(46 / 110_760, rel=0.15)
    # 2.56 km plus the turn: ~0.0249° + 46 m of longitude, ~0.0231° + 46 m of latitude.
    assert east - west == pytest.approx((2560 + 46) / (111_320 * np.cos(np.radians(22.3))),
                                        rel=0.01)
    assert north - south == pytest.approx((2560 + 46) / 110_760, rel=0.01)
    # The polygon matches GDAL/PROJ's own reprojection of the same square, point for point.
    assert ring[0] == ring[-1] and len(ring) == 33
    square = {"type": "Polygon", "coordinates": [[list(t * (c, r)) for c, r in
                                                  [(0, 0), (0, 256), (256, 256), (256, 0)]]]}
    gdal = transform_geom(RioCRS.from_epsg(32650), RioCRS.from_epsg(4326), square)
    corners = np.array(gdal["coordinates"][0][:4])
    ours = np.array(ring[0:32:8])
    assert np.abs(corners - ours).max() < 1e-7
    # Counter-clockwise exterior ring (RFC 7946).
    xs, ys = np.array(ring).T
    assert np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0


def test_item_of_a_core_tile_on_the_real_sample(no_network):
    frame, score = _tile(Window(0, 0, 256, 256))
    core = crop(frame, Window(32, 64, 64, 96))
    product = ProductMaker().make("near_lossless", core)
    item = make_item(product, score, item_id=product_id(score.tile_id, "near_lossless"),
                     href="a/b.tif", acquired=datetime(2016, 9, 27, 3, 5, tzinfo=timezone.utc))
    _validate(item)
    g = frame.georef.transform
    west, south, east, north = item["bbox"]
    assert west == pytest.approx(g.c + 64 * g.a) and north == pytest.approx(g.f + 32 * g.e)
    assert east == pytest.approx(g.c + 160 * g.a) and south == pytest.approx(g.f + 96 * g.e)
    assert item["properties"]["datetime"] == "2016-09-27T03:05:00Z"
    assert item["properties"]["onboard:max_error_dn"] == 2.0
    assert item["id"] == "hongkong_20160927_0_0-near_lossless"


def test_absolute_hrefs_and_missing_times_are_refused():
    frame, score = _tile()
    product = ProductMaker().make("full", frame)
    with pytest.raises(ValueError, match="relative"):
        make_item(product, score, item_id="x", href="/abs/x.tif")
    from dataclasses import replace
    with pytest.raises(ValueError, match="acquisition time"):
        make_item(replace(product, acquired=None), score, item_id="x", href="x.tif")


def test_no_network_fixture_really_blocks(no_network):
    with pytest.raises(OSError, match="network"):
        socket.create_connection(("example.org", 80))


def _products_with_items(folder: Path) -> list[tuple[str, Path]]:
    """Products of the sample's 64² tiles with their Items beside them, as ``onboard run``
    writes them (``products/<id>.tif`` and ``<id>.json``)."""
    from onboard.runtime.durability import write_json

    maker = ProductMaker()
    made = []
    for row, col, kind in [(0, 0, "full"), (0, 64, "near_lossless"), (64, 0, "thumbnail"),
                           (64, 64, "full")]:
        frame, score = _tile(Window(row, col, 64, 64))
        product = maker.make(kind, frame)
        pid = product_id(score.tile_id, kind)
        path = folder / f"{pid}{product.suffix}"
        product.write(path)
        write_json(path.with_suffix(".json"),
                   make_item(product, score, item_id=pid, href=path.name, priority=0.5))
        made.append((pid, path))
    return made


def test_items_ride_the_metadata_pdu_and_the_ground_catalogues_each_id_once(tmp_path,
                                                                          no_network):
    from onboard.runtime.downlink.cfdp import (
        CfdpLinkConfig,
        CfdpTransmitter,
        GroundStation,
        SimulatedLink,
    )
    from onboard.runtime.downlink.stac import GroundCatalogue, item_sha256

    made = _products_with_items(tmp_path / "products")
    config = CfdpLinkConfig(drop_rate=0.05, reorder_rate=0.1, ack_timeout_s=0.2,
                            nak_timeout_s=0.2, transaction_timeout_s=10.0)
    ground = GroundStation(tmp_path / "ground", config)
    # Two flight lives send everything (the second as after a lost acknowledgement): the
    # store and the catalogue hold each id once.
    for life in range(2):
        transmitter = CfdpTransmitter(config, SimulatedLink(ground, config),
                                      tmp_path / f"flight{life}")
        for pid, path in made:
            assert transmitter.send(pid, path, hashlib.sha256(path.read_bytes()).hexdigest())
        assert transmitter.items_too_big == 0
    ground.flush()
    assert ground.receiver.duplicates == len(made)
    collection = json.loads((tmp_path / "ground" / "catalogue.json").read_text())
    assert collection["type"] == "FeatureCollection"
    ids = [item["id"] for item in collection["features"]]
    assert sorted(ids) == sorted(pid for pid, _ in made)  # once each
    pystac.ItemCollection.from_dict(collection)
    for item in collection["features"]:
        _validate(item)
        flight = json.loads((tmp_path / "products" / f"{item['id']}.json").read_text())
        assert item["properties"] == flight["properties"]
        assert item["geometry"] == flight["geometry"]
        # The asset points at the stored product, relative to the Item's own file.
        (asset,) = item["assets"].values()
        stored = (tmp_path / "ground" / "items" / asset["href"]).resolve()
        assert stored == ground.receiver.path_of(item["id"]).resolve()
        assert item_sha256(item) == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert json.loads((tmp_path / "ground" / "items" /
                           f"{stored.name}.json").read_text()) == item
    # A restarted ground rebuilds the same catalogue from its Items.
    assert GroundCatalogue(tmp_path / "ground", ground.receiver.ids()).collection() == collection


def test_an_item_that_does_not_fit_one_pdu_or_does_not_match_is_not_catalogued(tmp_path):
    from onboard.runtime.downlink.cfdp import (
        CfdpLinkConfig,
        CfdpTransmitter,
        GroundStation,
        SimulatedLink,
    )
    from onboard.runtime.durability import write_json

    made = _products_with_items(tmp_path / "products")[:2]
    small = CfdpLinkConfig(pdu_size=256, ack_timeout_s=0.2, nak_timeout_s=0.2)
    ground = GroundStation(tmp_path / "ground", small)
    transmitter = CfdpTransmitter(small, SimulatedLink(ground, small), tmp_path / "flight")
    pid, path = made[0]
    assert transmitter.send(pid, path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert transmitter.items_too_big == 1  # sent without it, named and checked all the same
    # An Item stating another checksum than the product's: the flight side leaves it out.
    pid, path = made[1]
    item = json.loads(path.with_suffix(".json").read_text())
    (asset,) = item["assets"].values()
    asset["file:checksum"] = "1220" + "0" * 64
    write_json(path.with_suffix(".json"), item)
    config = CfdpLinkConfig(ack_timeout_s=0.2, nak_timeout_s=0.2)
    transmitter = CfdpTransmitter(config, SimulatedLink(ground, config), tmp_path / "flight2")
    assert transmitter.send(pid, path, hashlib.sha256(path.read_bytes()).hexdigest())
    ground.flush()
    assert ground.receiver.ids() == {p for p, _ in made}
    assert json.loads((tmp_path / "ground" / "catalogue.json").read_text())["features"] == []
