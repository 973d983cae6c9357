"""Real Sentinel-2 scenes for super-resolution, and Wald's-protocol pairs cut from them.

Every scene is kept at its native sampling: the four 10 m bands (B02, B03, B04, B08) and the six
20 m bands (B05, B06, B07, B8A, B11, B12), uint16 DN as float32. Pairs are made by degrading
with an area average by the scale factor (2) and asking for the original back:

- ×2: input the 10 m bands averaged to 20 m, truth the 10 m bands;
- sharpening, one scale down: input the 10 m bands averaged to 20 m and the 20 m bands averaged
  to 40 m then nearest-resampled to the 20 m grid (exactly what ``OscdScene`` delivers on the
  finest grid, one scale down), truth the original 20 m bands.

Scenes: the 18 OSCD cities (both dates) and the Malmö tile of DSen2's demo data. ``HELDOUT``
names the scenes never trained on, tuned on or calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BANDS_10 = ("B02", "B03", "B04", "B08")
BANDS_20 = ("B05", "B06", "B07", "B8A", "B11", "B12")
SHARPEN_INPUT = BANDS_10 + BANDS_20
MALMO = "malmo"
MALMO_FILE = Path("sr") / "dsen2_S2A_20170527_T33UUB.npz"
# Held out from training, tuning and calibration: Malmö (the reference scene) and three
# OSCD cities of different kinds (dense European city, desert city, Mediterranean coast).
HELDOUT = (MALMO, "paris", "lasvegas", "valencia")
DN_SCALE = 1e-4  # Sentinel-2 L1C DN -> top-of-atmosphere reflectance
PEAK_DN = 10000.0


@dataclass
class Scene:
    """One date of one place: 10 m bands (4, H, W) and 20 m bands (6, H/2, W/2), DN float32."""

    name: str
    im10: np.ndarray
    im20: np.ndarray


def area_down(image: np.ndarray, factor: int = 2) -> np.ndarray:
    """(C, H, W) -> (C, H // f, W // f): the mean of each f × f block (the sensor's own
    integration, as Wald's protocol asks); a ragged edge is cut off."""
    c, h, w = image.shape
    h, w = h - h % factor, w - w % factor
    blocks = image[:, :h, :w].reshape(c, h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)


def nearest_up(image: np.ndarray, factor: int = 2) -> np.ndarray:
    return np.repeat(np.repeat(image, factor, axis=1), factor, axis=2)


def _read_oscd(folder: Path, name: str) -> Scene:
    import tifffile

    files = {p.stem.rsplit("_", 1)[-1].upper(): p for p in folder.glob("*.tif")}
    im10 = np.stack([tifffile.imread(files[b]).astype(np.float32) for b in BANDS_10])
    im20 = np.stack([tifffile.imread(files[b]).astype(np.float32) for b in BANDS_20])
    # The 20 m files cover the 10 m ones from the same corner; keep whole 20 m pixels only.
    h20 = min(im20.shape[1], im10.shape[1] // 2)
    w20 = min(im20.shape[2], im10.shape[2] // 2)
    return Scene(name, im10[:, : 2 * h20, : 2 * w20], im20[:, :h20, :w20])


def _read_malmo(path: Path) -> Scene:
    data = np.load(path)
    im10 = np.moveaxis(data["im10"], -1, 0).astype(np.float32)
    im20 = np.moveaxis(data["im20"], -1, 0).astype(np.float32)
    return Scene(MALMO, im10, im20)


def scene_names(root: Path) -> list[str]:
    """Every scene under ``root``: ``city/imgs_1`` style names for OSCD, ``malmo``."""
    names = [f"{city.name}/{d}" for city in sorted((Path(root) / "oscd").iterdir())
             if city.is_dir() for d in ("imgs_1", "imgs_2") if (city / d).is_dir()]
    if (Path(root) / MALMO_FILE).is_file():
        names.append(MALMO)
    return names


def place(name: str) -> str:
    return name.split("/")[0]


def load(root: Path, name: str) -> Scene:
    root = Path(root)
    if name == MALMO:
        return _read_malmo(root / MALMO_FILE)
    return _read_oscd(root / "oscd" / name, name)


def training_scenes(root: Path) -> list[Scene]:
    return [load(root, n) for n in scene_names(root) if place(n) not in HELDOUT]


def heldout_scenes(root: Path) -> list[Scene]:
    """One scene per held-out place: Malmö, and the first date of each held-out city (the
    second dates are held out too, but the first is the one reported)."""
    names = [n for n in scene_names(root) if place(n) in HELDOUT and not n.endswith("imgs_2")]
    return [load(root, n) for n in names]


def x2_pair(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(input 4 × H/2 × W/2, truth 4 × H × W), DN."""
    truth = scene.im10[:, : scene.im10.shape[1] // 2 * 2, : scene.im10.shape[2] // 2 * 2]
    return area_down(truth), truth


def sharpen_pair(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(input 10 × h × w on the 20 m grid, truth 6 × h × w the original 20 m bands), DN, with
    h, w even so the 40 m grid is whole."""
    h, w = scene.im20.shape[1] // 2 * 2, scene.im20.shape[2] // 2 * 2
    truth = scene.im20[:, :h, :w]
    fine = area_down(scene.im10[:, : 2 * h, : 2 * w])
    coarse = nearest_up(area_down(truth))
    return np.concatenate([fine, coarse]), truth


class PatchSampler:
    """Random patches of Wald pairs from training scenes: flips, 90° turns, and for sharpening a
    random phase of the 2 × 2 nearest-resampled blocks, so the model does not rely on where a
    tile starts."""

    def __init__(self, scenes: list[Scene], task: str, patch: int, seed: int = 0) -> None:
        self.task = task
        self.patch = patch
        self.rng = np.random.default_rng(seed)
        pair = x2_pair if task == "x2" else sharpen_pair
        self.pairs = [pair(s) for s in scenes]
        # Patches drawn in proportion to a scene's area.
        areas = np.array([p[0].shape[1] * p[0].shape[2] for p in self.pairs], float)
        self.weights = areas / areas.sum()

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        p = self.patch
        for _ in range(n):
            x, y = self.pairs[int(self.rng.choice(len(self.pairs), p=self.weights))]
            h, w = x.shape[1:]
            r = int(self.rng.integers(0, h - p + 1))
            c = int(self.rng.integers(0, w - p + 1))
            xp = x[:, r : r + p, c : c + p]
            if self.task == "x2":
                yp = y[:, 2 * r : 2 * r + 2 * p, 2 * c : 2 * c + 2 * p]
            else:
                yp = y[:, r : r + p, c : c + p]
            k = int(self.rng.integers(4))
            xp, yp = np.rot90(xp, k, axes=(1, 2)), np.rot90(yp, k, axes=(1, 2))
            if self.rng.random() < 0.5:
                xp, yp = xp[:, :, ::-1], yp[:, :, ::-1]
            xs.append(xp)
            ys.append(yp)
        return (np.ascontiguousarray(np.stack(xs)) * DN_SCALE,
                np.ascontiguousarray(np.stack(ys)) * DN_SCALE)
