"""Quick-look PNGs for people on the ground: masks, and one picture of a whole pass.

:func:`write_pass_quicklook` draws the scene stretched, the cloud and shadow mask blended over
it, every tile's core outlined in the colour of its decision and the tiles chosen for downlink
drawn thick, beside a panel with the legend, a map of the tiles' values and the same values as a
strip, ranked, with the chosen ones marked. Numpy only (no imaging library on board); the labels
use a built-in 5 × 7 bitmap font.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import numpy as np

from onboard.runtime.errors import ShapeError
from onboard.runtime.png import write_png
from onboard.runtime.scores import Decision, TileScore

# Class colours: index = class value; 255 (no data) is magenta.
PALETTE = np.array([
    [40, 40, 40], [250, 250, 250], [30, 60, 200], [230, 150, 30], [40, 170, 60],
    [200, 40, 40], [150, 80, 200], [90, 200, 200],
], dtype=np.uint8)
NODATA_COLOUR = np.array([255, 0, 255], dtype=np.uint8)

DECISION_COLOURS: dict[Decision, tuple[int, int, int]] = {
    Decision.KEEP: (60, 230, 90),
    Decision.DEMOTE: (255, 190, 30),
    Decision.DROP: (235, 60, 50),
    Decision.FAILED: (255, 0, 255),
}
# Blended over the scene: cloud 1, shadow 2, no data 255 (the cloud stage's classes).
MASK_COLOURS: dict[int, tuple[tuple[int, int, int], float]] = {
    1: ((120, 220, 255), 0.55),
    2: ((110, 40, 190), 0.55),
    255: ((255, 0, 255), 0.35),
}
PANEL_BACKGROUND = (28, 30, 34)
TEXT_COLOUR = (235, 235, 235)
# Viridis at five stops: perceptually even, readable by colour-blind viewers.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                    dtype=np.float32)


def class_rgb(mask: np.ndarray) -> np.ndarray:
    """(H, W) class values -> (H, W, 3) colours."""
    rgb = PALETTE[np.clip(mask, 0, len(PALETTE) - 1)]
    rgb[mask == 255] = NODATA_COLOUR
    return rgb


def stretch_rgb(pixels: np.ndarray, percentiles: tuple[float, float] = (2, 98)) -> np.ndarray:
    """(3, H, W) red, green, blue of any dtype -> (H, W, 3) uint8, stretched per band."""
    out = np.empty((*pixels.shape[1:], 3), dtype=np.uint8)
    for i in range(3):
        band = pixels[i].astype(np.float32)
        finite = band[np.isfinite(band)]
        lo, hi = np.percentile(finite, percentiles) if finite.size else (0.0, 1.0)
        scaled = (band - lo) / max(hi - lo, 1e-6) * 255
        out[..., i] = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    return out


def write_mask_png(path: str | Path, mask: np.ndarray) -> Path:
    path = Path(path)
    write_png(path, class_rgb(mask))
    return path


# ---------------------------------------------------------------------------------------------
# A 5 × 7 bitmap font: one string per glyph, rows separated by "|", "#" for ink.

_GLYPHS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "###..|#..#.|#...#|#...#|#...#|#..#.|###..",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    " ": ".....|.....|.....|.....|.....|.....|.....",
}
_FONT = {ch: np.array([[c == "#" for c in row] for row in glyph.split("|")])
         for ch, glyph in _GLYPHS.items()}
GLYPH_W, GLYPH_H = 5, 7


def text_width(text: str, size: int = 2) -> int:
    return len(text) * (GLYPH_W + 1) * size


def draw_text(image: np.ndarray, text: str, row: int, col: int,
              colour: tuple[int, int, int] = TEXT_COLOUR, size: int = 2) -> None:
    """Write ``text`` (upper-cased; unknown characters as "?"-less blanks) at ``row``, ``col``,
    clipped to the image."""
    h, w = image.shape[:2]
    for i, ch in enumerate(text.upper()):
        glyph = _FONT.get(ch, _FONT[" "])
        big = np.kron(glyph, np.ones((size, size), dtype=bool))
        r0, c0 = row, col + i * (GLYPH_W + 1) * size
        r1, c1 = min(r0 + big.shape[0], h), min(c0 + big.shape[1], w)
        if r0 >= h or c0 >= w or r1 <= max(r0, 0) or c1 <= max(c0, 0):
            continue
        sub = big[max(-r0, 0):r1 - r0, max(-c0, 0):c1 - c0]
        image[max(r0, 0):r1, max(c0, 0):c1][sub] = colour


# ---------------------------------------------------------------------------------------------
# Drawing helpers


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> (..., 3) uint8 viridis colours over [lo, hi]; NaN is grey."""
    t = np.clip((np.asarray(values, np.float32) - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    pos = np.nan_to_num(t) * (len(_VIRIDIS) - 1)
    i = np.minimum(pos.astype(np.int64), len(_VIRIDIS) - 2)
    frac = (pos - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - frac) + _VIRIDIS[i + 1] * frac
    rgb[np.isnan(np.asarray(values, np.float32))] = (110, 110, 110)
    return rgb.astype(np.uint8)


def draw_rect(image: np.ndarray, top: int, left: int, height: int, width: int,
              colour: tuple[int, int, int], thickness: int = 1) -> None:
    """An outline drawn inside the rectangle, so neighbouring tiles never paint over each
    other's edge."""
    h, w = image.shape[:2]
    bottom, right = min(top + height, h), min(left + width, w)
    top, left = max(top, 0), max(left, 0)
    t = max(1, min(thickness, (bottom - top) // 2, (right - left) // 2))
    if bottom <= top or right <= left:
        return
    image[top:top + t, left:right] = colour
    image[bottom - t:bottom, left:right] = colour
    image[top:bottom, left:left + t] = colour
    image[top:bottom, right - t:right] = colour


def fill_rect(image: np.ndarray, top: int, left: int, height: int, width: int,
              colour: tuple[int, int, int] | np.ndarray) -> None:
    image[max(top, 0):max(top + height, 0), max(left, 0):max(left + width, 0)] = colour


def blend_mask(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The scene with cloud, shadow and no-data pixels tinted (:data:`MASK_COLOURS`)."""
    out = rgb.astype(np.float32)
    for value, (colour, alpha) in MASK_COLOURS.items():
        where = mask == value
        out[where] = out[where] * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def _tile_value(score: TileScore, value_key: str, values: Mapping[str, float] | None) -> float:
    if values is not None and score.tile_id in values:
        return float(values[score.tile_id])
    return float(score.values.get(value_key, np.nan))


def _fmt(value: float) -> str:
    if not np.isfinite(value):
        return "-"
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"


def render_pass_quicklook(
    rgb: np.ndarray,
    cloud_mask: np.ndarray | None,
    scores: Iterable[TileScore],
    chosen_tile_ids: Collection[str],
    *,
    value_key: str = "clear_fraction",
    values: Mapping[str, float] | None = None,
    title: str = "",
    target_size: int = 768,
) -> np.ndarray:
    """The pass quick-look as an (H, W, 3) uint8 image; see :func:`write_pass_quicklook`."""
    scores = list(scores)
    chosen = set(chosen_tile_ids)
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise ShapeError(f"rgb must be (3, H, W) red, green, blue, got {rgb.shape}")
    h, w = rgb.shape[1:]
    if cloud_mask is not None and cloud_mask.shape != (h, w):
        raise ShapeError(f"cloud mask is {cloud_mask.shape}, the scene {(h, w)}")
    # A small scene is zoomed by an integer factor (crisp pixels), a large one subsampled.
    zoom = max(1, target_size // max(h, w))
    step = max(1, -(-max(h, w) // target_size))
    scene = stretch_rgb(rgb[:, ::step, ::step])
    if cloud_mask is not None:
        scene = blend_mask(scene, cloud_mask[::step, ::step])
    scene = np.repeat(np.repeat(scene, zoom, axis=0), zoom, axis=1)

    def place(v: int) -> int:
        return v * zoom // step

    thin, thick = max(1, zoom // 2), max(4, 2 * zoom)
    for pass_chosen in (False, True):  # chosen tiles last, on top
        for score in scores:
            if (score.tile_id in chosen) != pass_chosen:
                continue
            r, c, th, tw = score.window
            top, left = place(r), place(c)
            height, width = place(r + th) - top, place(c + tw) - left
            colour = DECISION_COLOURS[score.decision]
            if pass_chosen:
                draw_rect(scene, top, left, height, width, (0, 0, 0), thick + 2)
                draw_rect(scene, top + 1, left + 1, height - 2, width - 2, colour, thick)
            else:
                draw_rect(scene, top, left, height, width, colour, thin)

    panel = _panel(scene.shape[0], scores, chosen, value_key, values, title, (h, w))
    out = np.empty((panel.shape[0], scene.shape[1] + 6 + panel.shape[1], 3), np.uint8)
    out[:] = PANEL_BACKGROUND  # a scene shorter than the panel sits on the panel's colour
    out[:scene.shape[0], :scene.shape[1]] = scene
    out[:, scene.shape[1] + 6:] = panel
    return out


def _panel(height: int, scores: list[TileScore], chosen: set[str], value_key: str,
           values: Mapping[str, float] | None, title: str,
           scene_shape: tuple[int, int]) -> np.ndarray:
    width = 300
    panel = np.zeros((max(height, 640), width, 3), np.uint8)
    panel[:] = PANEL_BACKGROUND
    y = 10
    for line in (title or "onboard pass").split("\n")[:2]:
        draw_text(panel, line[:23], y, 10)
        y += 20
    counts = {d: sum(s.decision == d for s in scores) for d in Decision}
    draw_text(panel, f"{len(scores)} tiles, {len(chosen)} chosen", y, 10, size=1)
    y += 18
    for decision in (Decision.KEEP, Decision.DEMOTE, Decision.DROP, Decision.FAILED):
        draw_rect(panel, y, 10, 14, 22, DECISION_COLOURS[decision], 2)
        label = {Decision.KEEP: "kept", Decision.DEMOTE: "demoted", Decision.DROP: "dropped",
                 Decision.FAILED: "failed"}[decision]
        draw_text(panel, f"{label} {counts[decision]}", y, 42)
        y += 22
    draw_rect(panel, y, 10, 18, 22, (0, 0, 0), 6)
    draw_rect(panel, y + 1, 11, 16, 20, (230, 230, 230), 4)
    draw_text(panel, "chosen: thick", y + 2, 42)
    y += 26
    for value, label in ((1, "cloud"), (2, "shadow"), (255, "no data")):
        colour, alpha = MASK_COLOURS[value]
        tint = tuple(int(0.5 * 128 * (1 - alpha) + c * alpha) for c in colour)
        fill_rect(panel, y, 10, 14, 22, tint)  # type: ignore[arg-type]
        draw_text(panel, label, y, 42)
        y += 22
    # The value map: each tile's value at its place in the scene.
    tile_values = np.array([_tile_value(s, value_key, values) for s in scores], np.float32)
    finite = tile_values[np.isfinite(tile_values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    y += 6
    draw_text(panel, (value_key if values is None else "value")[:23], y, 10)
    y += 20
    sh, sw = scene_shape
    map_w = max(1, min(width - 20, int(round(220 * sw / sh))))  # the scene's aspect, <= 220 high
    map_h = max(1, int(round(map_w * sh / sw)))
    fill_rect(panel, y, 10, map_h, map_w, (60, 60, 60))
    for score, value in zip(scores, tile_values, strict=True):
        r, c, th, tw = score.window
        top, left = y + r * map_h // sh, 10 + c * map_w // sw
        bottom, right = y + (r + th) * map_h // sh, 10 + (c + tw) * map_w // sw
        fill_rect(panel, top, left, bottom - top, right - left, colormap(value, lo, hi))
        if score.tile_id in chosen:
            draw_rect(panel, top, left, bottom - top, right - left, (255, 255, 255), 2)
    y += map_h + 8
    # The strip: the same values, ranked, chosen tiles ticked underneath.
    order = np.argsort(-np.nan_to_num(tile_values, nan=-np.inf), kind="stable")
    n, strip_w = max(len(order), 1), width - 20
    for rank, index in enumerate(order):
        left, right = 10 + rank * strip_w // n, 10 + (rank + 1) * strip_w // n
        fill_rect(panel, y, left, 18, max(right - left, 1), colormap(tile_values[index], lo, hi))
        if scores[index].tile_id in chosen:
            fill_rect(panel, y + 20, left, 5, max(right - left, 1), (255, 255, 255))
    y += 30
    draw_text(panel, "ranked, chosen ticked", y, 10, size=1)
    y += 14
    bar = colormap(np.linspace(lo, hi, width - 20), lo, hi)
    panel[y:y + 10, 10:width - 10] = bar[None]
    y += 14
    draw_text(panel, _fmt(lo), y, 10, size=1)
    draw_text(panel, _fmt(hi), y, width - 10 - text_width(_fmt(hi), 1), size=1)
    return panel[:max(height, y + 20)]


def write_pass_quicklook(
    path: str | Path,
    rgb: np.ndarray,
    cloud_mask: np.ndarray | None,
    scores: Iterable[TileScore],
    chosen_tile_ids: Collection[str],
    *,
    value_key: str = "clear_fraction",
    values: Mapping[str, float] | None = None,
    title: str = "",
    target_size: int = 768,
) -> Path:
    """One PNG of a pass for people on the ground.

    ``rgb``: (3, H, W) red, green, blue of the scene, any dtype (stretched 2-98 % per band);
    ``cloud_mask``: (H, W) the cloud stage's classes (1 cloud, 2 shadow, 255 no data) or None;
    ``scores``: every tile (``window`` is its core on the scene); ``chosen_tile_ids``: the tiles
    the plan sends. The panel maps ``values[tile_id]`` when given (the planner's value), else
    each score's ``values[value_key]``. Written atomically.
    """
    image = render_pass_quicklook(rgb, cloud_mask, scores, chosen_tile_ids,
                                  value_key=value_key, values=values, title=title,
                                  target_size=target_size)
    path = Path(path)
    write_png(path, image)
    return path
