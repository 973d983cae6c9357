"""Training and evaluation data for the cloud model, and the fixed held-out split.

Three sources, all read from ``ONBOARD_DATA`` (``../shared/data``):

* ``cloud/ukis_sentinel2_6band.npz``: human masks with cloud shadow, ~30 m. Rows
  ``[0, UKIS_HELDOUT_ROWS)`` are held out and never trained on; the rest is training data.
* ``cloud/s2cloudless_l1c_13band.npz``: labels from s2cloudless's own probability. Rows
  ``[S2C_HELDOUT_FROM, 856)`` are held out for teacher-agreement numbers.
* OSCD cities (both dates) at 10 m, labelled on the ground by s2cloudless (its probability, as
  the package computes it from the 10 bands; it reproduces ``cl_probs`` of the 13-band scene).
  The cities in ``OSCD_HELDOUT`` are held out. The probability is computed once and cached
  (``ONBOARD_CACHE``, default ``~/.cache/onboard``) because s2cloudless runs at ~0.1 Mpx/s.

Teacher probabilities become labels by :func:`labels_from_probability` (smoothed, with an
uncertain band ignored, and clear for sure far from any cloud).

Labels: 0 clear, 1 cloud, 2 shadow, ``NOT_CLOUD`` (3) = clear or shadow (teacher labels carry no
shadow), ``IGNORE`` (255). Images are (bands, height, width) float32 TOA reflectance in the
order of :data:`BANDS_6`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onboard.runtime.errors import SceneError

BANDS_6 = ("blue", "green", "red", "nir", "swir16", "swir22")
BANDS_4 = BANDS_6[:4]
CLEAR, CLOUD, SHADOW, NOT_CLOUD, IGNORE = 0, 1, 2, 3, 255

UKIS_FILE = "cloud/ukis_sentinel2_6band.npz"
S2C_FILE = "cloud/s2cloudless_l1c_13band.npz"
# Top 224 of 512 rows (44 %): 12 % shadow and 20 % cloud by the human masks; it contains the
# committed test crop img[:128, :128].
UKIS_HELDOUT_ROWS = 224
S2C_HELDOUT_FROM = 512
OSCD_HELDOUT = ("hongkong", "paris", "dubai", "milano")
# Sentinel-2 bands for BANDS_6 and the 10 bands s2cloudless takes (all_bands=False).
S2_MODEL_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
_S2C_13_INDEX = {"B02": 1, "B03": 2, "B04": 3, "B08": 7, "B11": 11, "B12": 12}
# Teacher labels (see labels_from_probability): 40 m averaging disk, an uncertain band between
# 0.3 and 0.5 left out, and 2 km as the farthest a cloud's shadow is assumed to fall (a 1 km
# high cloud at 63 degrees solar zenith).
TEACHER_RADIUS = 4
TEACHER_CLEAR, TEACHER_CLOUD = 0.3, 0.5
SHADOW_REACH_PX = 200


@dataclass
class LabelledScene:
    """A scene with per-pixel labels; ``s2c_bands`` holds s2cloudless's 10 bands when known."""

    name: str
    image: np.ndarray  # (6, H, W) float32 reflectance, BANDS_6 order
    labels: np.ndarray  # (H, W) uint8
    gsd_m: float
    human: bool  # True: human reference masks; False: s2cloudless teacher labels
    s2c_bands: np.ndarray | None = None  # (H, W, 10) float32 for running s2cloudless


def data_root(root: str | Path | None = None) -> Path:
    if root is not None:
        return Path(root)
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return Path(os.environ.get("ONBOARD_DATA", default))


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "onboard"
    return Path(os.environ.get("ONBOARD_CACHE", default)) / "cloud-teacher"


def _load_npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.exists():
        raise SceneError(path, "cloud data file not found (set ONBOARD_DATA)")
    return np.load(path)


def ukis_scene(root: str | Path | None = None) -> LabelledScene:
    """The whole UKIS scene; remaps its mask (0 shadow, 1/3 clear, 4 cloud) to ours."""
    data = _load_npz(data_root(root) / UKIS_FILE)
    image = np.ascontiguousarray(data["img"].transpose(2, 0, 1), dtype=np.float32)
    return LabelledScene("ukis", image, ukis_labels(data["msk"][..., 0]), 30.0, human=True)


def ukis_labels(mask: np.ndarray) -> np.ndarray:
    """UKIS reference classes (0 shadow, 1 and 3 clear land and water, 4 cloud) as ours."""
    labels = np.full(mask.shape, IGNORE, np.uint8)
    labels[(mask == 1) | (mask == 3)] = CLEAR
    labels[mask == 4] = CLOUD
    labels[mask == 0] = SHADOW
    return labels


def s2cloudless_scene(root: str | Path | None = None) -> LabelledScene:
    """The 13-band scene labelled from s2cloudless's own probability (``cl_probs``)."""
    data = _load_npz(data_root(root) / S2C_FILE)
    im = data["s2_im"][0]
    image = np.ascontiguousarray(
        np.stack([im[..., _S2C_13_INDEX[b]] for b in S2_MODEL_BANDS]), dtype=np.float32
    )
    labels = labels_from_probability(data["cl_probs"][0])
    idx = [0, 1, 3, 4, 7, 8, 9, 10, 11, 12]  # the 10 s2cloudless bands within the 13
    return LabelledScene("s2cloudless-13band", image, labels, 10.0, human=False,
                         s2c_bands=np.ascontiguousarray(im[..., idx], dtype=np.float32))


def split_rows(scene: LabelledScene, start: int, stop: int) -> LabelledScene:
    s2c = None if scene.s2c_bands is None else scene.s2c_bands[start:stop]
    return LabelledScene(f"{scene.name}[{start}:{stop}]", scene.image[:, start:stop],
                         scene.labels[start:stop], scene.gsd_m, scene.human, s2c)


def oscd_cities(root: str | Path | None = None) -> list[str]:
    folder = data_root(root) / "oscd"
    if not folder.is_dir():
        raise SceneError(folder, "OSCD folder not found (set ONBOARD_DATA)")
    return sorted(p.name for p in folder.iterdir() if (p / "imgs_1").is_dir())


def teacher_probability(s2c_bands: np.ndarray) -> np.ndarray:
    """s2cloudless's cloud probability for one (H, W, 10) reflectance image."""
    from s2cloudless import S2PixelCloudDetector

    detector = S2PixelCloudDetector(all_bands=False)
    return detector.get_cloud_probability_maps(s2c_bands[None])[0]


def teacher_labels(s2c_bands: np.ndarray) -> np.ndarray:
    """s2cloudless's mask with its default settings (threshold 0.4, no smoothing)."""
    from s2cloudless import S2PixelCloudDetector

    detector = S2PixelCloudDetector(all_bands=False)
    return detector.get_cloud_masks(s2c_bands[None])[0].astype(np.uint8)


def labels_from_probability(prob: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Training and agreement labels from s2cloudless's probability at 10 m.

    Per pixel at 10 m the probability is speckled (bright roofs read as cloud), so it is first
    averaged over a disk of radius TEACHER_RADIUS (s2cloudless's own ``average_over``). Cloud
    where the average is at least TEACHER_CLOUD, not cloud below TEACHER_CLEAR, ignored in
    between. "Not cloud" farther than SHADOW_REACH from any cloud is clear for sure (no shadow
    without a cloud); nearer it stays NOT_CLOUD (clear or shadow: the teacher cannot say).
    """
    import cv2
    from scipy.ndimage import distance_transform_edt

    disk = cv2.circle(np.zeros((2 * TEACHER_RADIUS + 1,) * 2, np.uint8),
                      (TEACHER_RADIUS, TEACHER_RADIUS), TEACHER_RADIUS, color=1, thickness=-1)
    disk = disk.astype(np.float32) / disk.sum()
    smooth = cv2.filter2D(prob.astype(np.float32), -1, disk, borderType=cv2.BORDER_REFLECT)
    cloud = smooth >= TEACHER_CLOUD
    labels = np.full(prob.shape, IGNORE, np.uint8)
    labels[cloud] = CLOUD
    not_cloud = smooth < TEACHER_CLEAR
    # Specks (a bright roof) cast no shadow worth the name: only clouds that survive an
    # erosion by 2 pixels count for "near a cloud".
    core = cv2.erode(cloud.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if core.any():
        far = distance_transform_edt(~core) > SHADOW_REACH_PX
    else:
        far = np.ones(prob.shape, bool)
    labels[not_cloud & far] = CLEAR
    labels[not_cloud & ~far] = NOT_CLOUD
    if valid is not None:
        labels[~valid] = IGNORE
    return labels


def _read_oscd(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from onboard.runtime.sources.oscd import OscdScene
    from onboard.runtime.windows import Window

    bands = tuple(dict.fromkeys(S2_MODEL_BANDS + S2CLOUDLESS_BANDS))
    scene = OscdScene(folder, bands)
    try:
        frame = scene.read(Window(0, 0, scene.height, scene.width))
    finally:
        scene.close()
    # OSCD holds L1C digital numbers: TOA reflectance = DN / 10000.
    pix = frame.pixels.astype(np.float32) / 10000.0
    valid = frame.valid if frame.valid is not None else np.ones(pix.shape[1:], bool)
    model = pix[[bands.index(b) for b in S2_MODEL_BANDS]]
    s2c = np.ascontiguousarray(pix[[bands.index(b) for b in S2CLOUDLESS_BANDS]].transpose(1, 2, 0))
    return model, s2c, valid


def oscd_scene(city: str, date: int, root: str | Path | None = None,
               with_s2c_bands: bool = False) -> LabelledScene:
    """One OSCD date at 10 m with s2cloudless teacher labels (probability cached once)."""
    folder = data_root(root) / "oscd" / city / f"imgs_{date}"
    cache = cache_dir() / f"{city}_{date}_prob.npz"
    s2c = None
    if cache.exists():
        data = np.load(cache)
        image, prob, valid = data["image"].astype(np.float32), data["prob"], data["valid"]
        if with_s2c_bands:
            _, s2c, _ = _read_oscd(folder)
    else:
        image, s2c, valid = _read_oscd(folder)
        prob = teacher_probability(s2c)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image=image.astype(np.float16), prob=prob.astype(np.float16),
                            valid=valid)
        tmp.replace(cache)
    labels = labels_from_probability(prob.astype(np.float32), valid)
    return LabelledScene(f"oscd-{city}-{date}", image, labels, 10.0, human=False,
                         s2c_bands=s2c if with_s2c_bands else None)


def training_scenes(root: str | Path | None = None, oscd: bool = True) -> list[LabelledScene]:
    """Every training-split scene (never any held-out pixel)."""
    ukis = ukis_scene(root)
    s2c = s2cloudless_scene(root)
    scenes = [split_rows(ukis, UKIS_HELDOUT_ROWS, ukis.labels.shape[0]),
              split_rows(s2c, 0, S2C_HELDOUT_FROM)]
    if oscd:
        for city in oscd_cities(root):
            if city in OSCD_HELDOUT:
                continue
            scenes += [oscd_scene(city, 1, root), oscd_scene(city, 2, root)]
    return scenes


CALIBRATION_CITIES = ("abudhabi", "beihai", "bercy")


def training_images(root: str | Path | None = None,
                    cities: tuple[str, ...] = CALIBRATION_CITIES) -> list[np.ndarray]:
    """Unlabelled training-split images (no teacher needed): the UKIS and 13-band training rows
    and a few training OSCD cities (desert, cloudy coast, cloudy city) read straight from disk."""
    images = [s.image for s in training_scenes(root, oscd=False)]
    folder = data_root(root) / "oscd"
    for city in cities:
        if city in OSCD_HELDOUT or not (folder / city).is_dir():
            continue
        images.append(_read_oscd(folder / city / "imgs_1")[0])
    return images


def heldout_human(root: str | Path | None = None) -> LabelledScene:
    """The held-out human-labelled rows of the UKIS scene."""
    ukis = ukis_scene(root)
    return split_rows(ukis, 0, UKIS_HELDOUT_ROWS)


def heldout_teacher(root: str | Path | None = None,
                    with_s2c_bands: bool = False) -> list[LabelledScene]:
    """Held-out teacher-labelled scenes: the bottom of the 13-band scene and the held-out cities."""
    s2c = s2cloudless_scene(root)
    scenes = [split_rows(s2c, S2C_HELDOUT_FROM, s2c.labels.shape[0])]
    for city in OSCD_HELDOUT:
        for date in (1, 2):
            scenes.append(oscd_scene(city, date, root, with_s2c_bands=with_s2c_bands))
    return scenes



def _pool_labels(labels: np.ndarray, f: int) -> np.ndarray:
    """Labels for an f x f average-pooled image: the majority of each block, IGNORE if mixed."""
    h, w = labels.shape[0] // f * f, labels.shape[1] // f * f
    blocks = labels[:h, :w].reshape(h // f, f, w // f, f).transpose(0, 2, 1, 3).reshape(
        h // f, w // f, f * f)
    out = np.full(blocks.shape[:2], IGNORE, np.uint8)
    for value in (CLEAR, CLOUD, SHADOW, NOT_CLOUD):
        share = (blocks == value).mean(axis=2)
        out[share > 0.75] = value
    return out


def _pool_image(image: np.ndarray, f: int) -> np.ndarray:
    c, h, w = image.shape[0], image.shape[1] // f * f, image.shape[2] // f * f
    return image[:, :h, :w].reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))


class TileSampler:
    """Random augmented training tiles from the training split only.

    Teacher scenes at 10 m are also seen average-pooled to 20 and 30 m (the UKIS scene is ~30 m),
    and every tile's reflectance is scaled by a random gain, globally and per band, so that the
    model does not depend on one sensor's calibration.
    """

    def __init__(self, scenes: list[LabelledScene], bands: int, tile: int = 128,
                 seed: int = 0, human_share: float = 0.75) -> None:
        self.bands = bands
        self.tile = tile
        self.rng = np.random.default_rng(seed)
        self.human_share = human_share
        self.human: list[LabelledScene] = []
        self.teacher: list[LabelledScene] = []
        for scene in scenes:
            if scene.human:
                self.human.append(scene)
                continue
            for f in (1, 2, 3):
                image = scene.image if f == 1 else _pool_image(scene.image, f)
                labels = scene.labels if f == 1 else _pool_labels(scene.labels, f)
                if min(labels.shape) < tile:
                    continue
                self.teacher.append(LabelledScene(f"{scene.name}/{f}", image, labels,
                                                  scene.gsd_m * f, False))
        # Teacher scenes weighted by pixel count, but at least a share of cloudy tiles.
        sizes = np.array([s.labels.size for s in self.teacher], float)
        self.teacher_p = sizes / sizes.sum()

    def tile_from(self, scene: LabelledScene) -> tuple[np.ndarray, np.ndarray]:
        t = self.tile
        h, w = scene.labels.shape
        r = int(self.rng.integers(0, h - t + 1))
        c = int(self.rng.integers(0, w - t + 1))
        x = scene.image[: self.bands, r : r + t, c : c + t].astype(np.float32)
        y = scene.labels[r : r + t, c : c + t].copy()
        k = int(self.rng.integers(0, 4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        if self.rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        gain = np.exp(self.rng.normal(0.0, 0.12) + self.rng.normal(0.0, 0.04, (self.bands, 1, 1)))
        x = x * gain.astype(np.float32)
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for _ in range(n):
            if self.human and (not self.teacher or self.rng.random() < self.human_share):
                scene = self.human[int(self.rng.integers(len(self.human)))]
            else:
                scene = self.teacher[int(self.rng.choice(len(self.teacher), p=self.teacher_p))]
            x, y = self.tile_from(scene)
            xs.append(x)
            ys.append(y)
        return np.stack(xs), np.stack(ys)


if __name__ == "__main__":
    import time

    # Fill the teacher-label cache for every OSCD city and report cloud fractions.
    for city in oscd_cities():
        for date in (1, 2):
            t0 = time.perf_counter()
            scene = oscd_scene(city, date)
            lab = scene.labels
            frac = {k: round(float((lab == v).mean()), 3) for k, v in
                    (("cloud", CLOUD), ("clear", CLEAR), ("either", NOT_CLOUD), ("ign", IGNORE))}
            print(f"{city} {date} {lab.shape} {frac} "
                  f"refl-median {np.median(scene.image, axis=(1, 2)).round(3).tolist()} "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
