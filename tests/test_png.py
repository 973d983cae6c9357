"""The PNG writer: files that real decoders read back pixel for pixel, written atomically; and
the pass quick-look drawn with it on the real sample."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import rasterio

from onboard.runtime.downlink.quicklook import (
    DECISION_COLOURS,
    render_pass_quicklook,
    write_pass_quicklook,
)
from onboard.runtime.errors import ProductWriteError
from onboard.runtime.png import encode_png, write_png
from onboard.runtime.scores import Decision, TileScore
from onboard.runtime.sources.oscd import open_scene
from onboard.runtime.windows import Window

SAMPLE = Path(__file__).resolve().parents[1] / "runtime" / "sample" / "hongkong" / "imgs_1"


def _decode(data: bytes) -> tuple[int, int, int, bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    w, h, depth, colour, *_ = header
    assert depth == 8
    return w, h, colour, zlib.decompress(idat)


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3)])
def test_round_trip(tmp_path, shape):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, image)
    w, h, colour, raw = _decode(path.read_bytes())
    assert (h, w) == shape[:2]
    assert colour == (0 if len(shape) == 2 else 2)
    rows = np.frombuffer(raw, np.uint8).reshape(h, -1)
    assert set(rows[:, 0]) <= {0, 1, 2}  # none, Sub or Up per row
    assert np.array_equal(imagecodecs.png_decode(path.read_bytes()), image)


def test_filters_round_trip_through_two_decoders_and_pay_on_imagery(tmp_path):
    frame = open_scene(SAMPLE).read(Window(0, 0, 256, 256))
    from onboard.runtime.downlink.quicklook import stretch_rgb

    image = stretch_rgb(frame.select(["red", "green", "blue"]).pixels)
    path = write_png(tmp_path / "scene.png", image)
    assert np.array_equal(imagecodecs.png_decode(path.read_bytes()), image)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        ds = rasterio.open(path)  # GDAL's libpng
    with ds:
        assert np.array_equal(np.moveaxis(ds.read(), 0, -1), image)
    _, _, _, raw = _decode(path.read_bytes())
    filters = np.frombuffer(raw, np.uint8).reshape(256, -1)[:, 0]
    assert {1, 2} & set(filters)  # the filters are really used on imagery
    unfiltered = len(zlib.compress(
        np.concatenate([np.zeros((256, 1), np.uint8), image.reshape(256, -1)], 1).tobytes(), 6))
    assert path.stat().st_size < 0.9 * unfiltered


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="q.png.*H, W"):
        encode_png(np.zeros((2, 2, 4), np.uint8), "q.png")
    with pytest.raises(ValueError, match="empty"):
        encode_png(np.zeros((0, 2), np.uint8))


def test_write_failure_names_file_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    with pytest.raises(ProductWriteError, match="file/x.png: cannot write PNG"):
        write_png(blocker / "x.png", np.zeros((2, 2), np.uint8))
    # A bad image fails before any file is opened: no empty PNG where the old one was.
    old = tmp_path / "old.png"
    write_png(old, np.full((3, 3), 9, np.uint8))
    before = old.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        write_png(old, np.zeros((3, 3), np.float32))
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old.png"]


def _pass(tile: int = 32):
    frame = open_scene(SAMPLE).read(Window(0, 0, 256, 256))
    rgb = frame.select(["red", "green", "blue"]).pixels
    # A mask from the scene itself (the brightest blue is haze/cloud, the darkest shadowed
    # slopes): real structure for the drawing, not a model's output.
    blue = frame.select(["blue"]).pixels[0].astype(np.float32)
    mask = np.zeros(blue.shape, np.uint8)
    mask[blue > np.percentile(blue, 90)] = 1
    mask[blue < np.percentile(blue, 3)] = 2
    mask[:4, :] = 255
    scores = []
    for r in range(0, 256, tile):
        for c in range(0, 256, tile):
            score = TileScore(f"hk/{r}_{c}", "hk", (r, c, tile, tile))
            cloud = float((mask[r:r + tile, c:c + tile] == 1).mean())
            score.values["clear_fraction"] = 1.0 - cloud
            if cloud > 0.5:
                score.lower(Decision.DROP, "cloud")
            elif cloud > 0.2:
                score.lower(Decision.DEMOTE, "cloud")
            scores.append(score)
    scores[5].fail("engine timed out")
    ranked = sorted((s for s in scores if s.usable), key=lambda s: -s.values["clear_fraction"])
    return rgb, mask, scores, [s.tile_id for s in ranked[:10]]


def test_pass_quicklook_on_the_sample(tmp_path):
    rgb, mask, scores, chosen = _pass()
    path = write_pass_quicklook(tmp_path / "pass.png", rgb, mask, scores, chosen,
                                title="hongkong 2016-09-27")
    image = imagecodecs.png_decode(path.read_bytes())
    zoom = 768 // 256
    assert image.shape[0] >= 768 and image.shape[1] > 768 + 200  # the scene, then the panel
    # Every decision's colour is drawn on the scene, where its tiles are.
    for score in scores:
        r, c, _, _ = score.window
        assert tuple(image[r * zoom, c * zoom + 10]) in (DECISION_COLOURS[score.decision],
                                                         (0, 0, 0))
    # Chosen tiles are thick: their outline colour reaches several pixels in, others' does not.
    picked = next(s for s in scores if s.tile_id == chosen[0])
    other = next(s for s in scores if s.tile_id not in chosen and s.decision == Decision.KEEP)
    for score, thick in ((picked, True), (other, False)):
        r, c, th, _ = score.window
        column = image[r * zoom:(r + th) * zoom, c * zoom + th * zoom // 2]
        colour = np.all(column == DECISION_COLOURS[score.decision], axis=1)
        assert (colour[:6].sum() >= 4) == thick
    # Clouds are tinted towards the cloud colour, clear pixels are the stretched scene.
    plain = render_pass_quicklook(rgb, None, [], [])
    tinted = render_pass_quicklook(rgb, mask, [], [])
    cloud = np.repeat(np.repeat(mask == 1, zoom, 0), zoom, 1)
    clear = np.repeat(np.repeat(mask == 0, zoom, 0), zoom, 1)
    assert np.array_equal(plain[:768, :768][clear], tinted[:768, :768][clear])
    assert (tinted[:768, :768][cloud][:, 2].astype(int) - plain[:768, :768][cloud][:, 2]).mean() > 5
    # The panel has text and the value map: many distinct colours right of the scene.
    panel = image[:, 774:]
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 30


def test_pass_quicklook_of_a_large_scene_is_subsampled():
    rgb = np.random.default_rng(0).integers(0, 4000, (3, 2000, 1500), dtype=np.uint16)
    score = TileScore("big/0_0", "big", (0, 0, 1000, 1500))
    image = render_pass_quicklook(rgb, None, [score], ["big/0_0"], target_size=768)
    assert image.shape[0] == 667 and image.shape[1] < 1200


def test_a_tall_image_is_filtered_in_bands_and_round_trips(tmp_path, shared_data):
    """Rows are filtered and compressed 256 at a time (memory); the Up filter of a band's first
    row looks at the last row of the band before, so a real image taller than a band decodes
    exactly, through two decoders."""
    from onboard.runtime.downlink.quicklook import stretch_rgb

    scene = open_scene(shared_data / "oscd" / "dubai" / "imgs_1")
    frame = scene.read(Window(0, 0, scene.height, scene.width))
    image = stretch_rgb(frame.select(["red", "green", "blue"]).pixels)
    assert image.shape[0] > 2 * 256
    path = write_png(tmp_path / "tall.png", image)
    assert np.array_equal(imagecodecs.png_decode(path.read_bytes()), image)
    from PIL import Image

    with Image.open(path) as decoded:
        assert np.array_equal(np.asarray(decoded), image)
    _, _, _, raw = _decode(path.read_bytes())
    filters = np.frombuffer(raw, np.uint8).reshape(image.shape[0], -1)[:, 0]
    assert {1, 2} & set(filters[256::256])  # band-first rows filtered too, not only "none"
