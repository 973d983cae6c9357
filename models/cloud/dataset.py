"""Training and evaluation data for the cloud model, and the fixed whole-scene split.

Sources, all read from ``ONBOARD_DATA`` (``../shared/data``):

* ``cloud/ukis_sentinel2_6band.npz``: human masks with cloud shadow, ~30 m. Version 0.3 holds
  it out WHOLE (evaluation and the compile gate only); 0.2 trained on rows 224-511 (that
  recipe and its row split were removed; :class:`TileSampler` refuses human-labelled scenes).
* ``cloud/s2cloudless_l1c_13band.npz``: the only scene with much cloud; 0.3 trains on all of it
  with ukis-csmask teacher labels (:func:`s2cloudless_distilled`).
* OSCD cities (both dates): 0.3 trains on ukis-csmask teacher labels at 30 m
  (:func:`oscd_distilled`, cached in ``ONBOARD_CACHE``, default ``~/.cache/onboard``); the
  cities in ``OSCD_HELDOUT`` are never trained or calibrated on. 0.2 used s2cloudless's
  probability (:func:`oscd_scene`, :func:`labels_from_probability`); the 13-band scene's
  s2cloudless labels also serve as a second teacher (:func:`with_s2cloudless`).

Teacher probabilities become labels by :func:`labels_from_probability` (smoothed, with an
uncertain band ignored, and clear for sure far from any cloud).

Labels: 0 clear, 1 cloud, 2 shadow, ``NOT_CLOUD`` (3) = clear or shadow (teacher labels carry no
shadow), ``IGNORE`` (255). Images are (bands, height, width) float32 TOA reflectance in the
order of :data:`BANDS_6`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onboard.models.data import default_data_root
from onboard.runtime.errors import SceneError

BANDS_6 = ("blue", "green", "red", "nir", "swir16", "swir22")
BANDS_4 = BANDS_6[:4]
CLEAR, CLOUD, SHADOW, NOT_CLOUD, IGNORE = 0, 1, 2, 3, 255

UKIS_FILE = "cloud/ukis_sentinel2_6band.npz"
S2C_FILE = "cloud/s2cloudless_l1c_13band.npz"
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
# The 13-band scene is sentinelhub-py's Betsiboka test request: bbox (46.16, -16.15, 46.51,
# -15.58) WGS84 at 512 x 856 pixels (sentinelhub-py's tests), 37.5 km x 63 km, so about 73 m
# per pixel. Until session 10 it was taken for 10 m.
S2C_GSD_M = 73.0
# ukis-csmask as teacher: run at 30 m (OSCD averaged 3 x 3), labels where it is this sure.
CSMASK_FACTOR = 3
CSMASK_CONFIDENCE = 0.6
# Training labels (0.4) take the teacher's argmax everywhere: the pixels it is less sure of are
# cloud edges and thin cloud, and with them cut (0.3's 0.6) the student learnt to miss them.
DISTILL_CONFIDENCE = 0.0


@dataclass
class LabelledScene:
    """A scene with per-pixel labels; ``s2c_bands`` holds s2cloudless's 10 bands when known."""

    name: str
    image: np.ndarray  # (6, H, W) float32 reflectance, BANDS_6 order
    labels: np.ndarray  # (H, W) uint8
    gsd_m: float
    human: bool  # True: human reference masks; False: s2cloudless teacher labels
    s2c_bands: np.ndarray | None = None  # (H, W, 10) float32 for running s2cloudless
    # (3, H, W) the teacher's probabilities of clear, cloud and shadow (soft distillation)
    soft: np.ndarray | None = None


def data_root(root: str | Path | None = None) -> Path:
    """``root``, or the project's one default (``ONBOARD_DATA``, else ``../shared/data``)."""
    return Path(root) if root is not None else default_data_root()


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
    labels = labels_from_probability(data["cl_probs"][0], gsd_m=S2C_GSD_M)
    idx = [0, 1, 3, 4, 7, 8, 9, 10, 11, 12]  # the 10 s2cloudless bands within the 13
    return LabelledScene("s2cloudless-13band", image, labels, S2C_GSD_M, human=False,
                         s2c_bands=np.ascontiguousarray(im[..., idx], dtype=np.float32))


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


def labels_from_probability(prob: np.ndarray, valid: np.ndarray | None = None,
                            gsd_m: float = 10.0) -> np.ndarray:
    """Training and agreement labels from s2cloudless's probability at ``gsd_m``.

    Per pixel at 10 m the probability is speckled (bright roofs read as cloud), so it is first
    averaged over a disk of radius TEACHER_RADIUS 10 m pixels (s2cloudless's own
    ``average_over``; at least one pixel at coarser grids). Cloud
    where the average is at least TEACHER_CLOUD, not cloud below TEACHER_CLEAR, ignored in
    between. "Not cloud" farther than SHADOW_REACH from any cloud is clear for sure (no shadow
    without a cloud); nearer it stays NOT_CLOUD (clear or shadow: the teacher cannot say).
    """
    import cv2
    from scipy.ndimage import distance_transform_edt

    radius = max(1, round(TEACHER_RADIUS * 10.0 / gsd_m))
    reach = SHADOW_REACH_PX * 10.0 / gsd_m
    disk = cv2.circle(np.zeros((2 * radius + 1,) * 2, np.uint8),
                      (radius, radius), radius, color=1, thickness=-1)
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
        far = distance_transform_edt(~core) > reach
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


def _pool_valid(valid: np.ndarray, f: int) -> np.ndarray:
    h, w = valid.shape[0] // f * f, valid.shape[1] // f * f
    return valid[:h, :w].reshape(h // f, f, w // f, f).all(axis=(1, 3))


def oscd_csmask(city: str, date: int, root: str | Path | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One OSCD date as (10 m image (6, H, W), ukis-csmask's 6-band probabilities at 30 m
    (3, H // 3, W // 3), 10 m valid mask), cached in ``cache_dir()``.

    ukis-csmask is meant for ~30 m ("for better performance ... approximately 30 m"), so the
    10 m image is averaged 3 x 3 before the teacher sees it; its probabilities stay at 30 m.
    """
    cache = cache_dir() / f"{city}_{date}_csmask6.npz"
    if cache.exists():
        data = np.load(cache)
        return data["image"].astype(np.float32), data["prob"].astype(np.float32), data["valid"]
    from onboard.models.peers import ukis_csmask_probability

    image, _, valid = _read_oscd(data_root(root) / "oscd" / city / f"imgs_{date}")
    prob = ukis_csmask_probability(_pool_image(image, CSMASK_FACTOR), bands=6, threads=1)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, image=image.astype(np.float16), prob=prob.astype(np.float16),
                        valid=valid)
    tmp.replace(cache)
    return image, prob, valid


def csmask_labels(prob: np.ndarray, valid: np.ndarray | None = None,
                  confidence: float = CSMASK_CONFIDENCE) -> np.ndarray:
    """Teacher labels from ukis-csmask's probabilities: its argmax (0 clear, 1 cloud, 2 shadow)
    where it is at least ``confidence`` sure, IGNORE elsewhere and outside ``valid``."""
    labels = prob.argmax(0).astype(np.uint8)
    labels[prob.max(0) < confidence] = IGNORE
    if valid is not None:
        labels[~valid] = IGNORE
    return labels


def oscd_distilled(city: str, date: int, root: str | Path | None = None,
                   confidence: float = CSMASK_CONFIDENCE) -> LabelledScene:
    """One OSCD date at 30 m (the 10 m image averaged 3 x 3) with ukis-csmask teacher labels
    (clear, cloud and shadow: agreement with a model, not truth)."""
    image, prob, valid = oscd_csmask(city, date, root)
    image30 = _pool_image(image, CSMASK_FACTOR)
    labels = csmask_labels(prob, _pool_valid(valid, CSMASK_FACTOR), confidence)
    return LabelledScene(f"oscd-{city}-{date}", image30, labels, 30.0, human=False,
                         soft=prob[:, : labels.shape[0], : labels.shape[1]])


def s2cloudless_distilled(root: str | Path | None = None,
                          confidence: float = CSMASK_CONFIDENCE) -> LabelledScene:
    """The whole 13-band scene with ukis-csmask teacher labels (its 6-band model on the scene's
    own grid; cached). The only teacher scene with much cloud (37 % by the teacher)."""
    cache = cache_dir() / "s2cloudless-13band_csmask6.npz"
    scene = s2cloudless_scene(root)
    if cache.exists():
        prob = np.load(cache)["prob"].astype(np.float32)
    else:
        from onboard.models.peers import ukis_csmask_probability

        prob = ukis_csmask_probability(scene.image, bands=6, threads=1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, prob=prob.astype(np.float16))
        tmp.replace(cache)
    labels = csmask_labels(prob, None, confidence)
    return LabelledScene("s2cloudless-13band", scene.image, labels, S2C_GSD_M, human=False,
                         soft=prob)


S2CLOUDLESS_MODES = ("agree-13band", "agree", "union")


def with_s2cloudless(scenes: list[LabelledScene], mode: str,
                     root: str | Path | None = None) -> list[LabelledScene]:
    """The distillation scenes with s2cloudless as a second teacher (its own smoothed
    probability, :func:`labels_from_probability`; the training OSCD dates at 30 m by a 75 %
    majority of its 10 m labels).

    ``agree-13band``: the 13-band scene's labels kept only where s2cloudless agrees on cloud /
    not cloud (version 0.3's filter). ``agree``: the same on every scene. ``union``: cloud
    wherever either teacher says cloud (s2cloudless also flags the thin cloud and haze that
    ukis-csmask calls clear), ukis-csmask's labels elsewhere.
    """
    if mode not in S2CLOUDLESS_MODES:
        raise ValueError(f"mode must be one of {S2CLOUDLESS_MODES}, got {mode!r}")
    out = []
    for scene in scenes:
        if scene.name == "s2cloudless-13band":
            second = s2cloudless_scene(root).labels
        elif mode == "agree-13band":
            out.append(scene)
            continue
        else:
            _, city, date = scene.name.rsplit("-", 2)
            second = _pool_labels(oscd_scene(city, int(date), root).labels, CSMASK_FACTOR)
            h, w = scene.labels.shape
            second = second[:h, :w]
        labels = scene.labels.copy()
        if mode == "union":
            labels[second == CLOUD] = CLOUD
        else:
            disagree = ((labels == CLOUD) & (second != CLOUD)) | (
                np.isin(labels, (CLEAR, SHADOW)) & (second == CLOUD))
            labels[disagree | (second == IGNORE)] = IGNORE
        # The name stays: it keys the scene's 10 m image (fine_images).
        out.append(LabelledScene(scene.name, scene.image, labels, scene.gsd_m, False,
                                 soft=None))  # the labels no longer are the soft ones' argmax
    return out


def distillation_scenes(root: str | Path | None = None,
                        confidence: float = DISTILL_CONFIDENCE) -> list[LabelledScene]:
    """The distillation training set (0.3 on): ukis-csmask teacher labels, where it is at
    least ``confidence`` sure, on the 13-band scene and on every OSCD city not in OSCD_HELDOUT
    (both dates, 30 m). No human-labelled pixel: the UKIS scene is held out whole."""
    scenes = [s2cloudless_distilled(root, confidence)]
    for city in oscd_cities(root):
        if city not in OSCD_HELDOUT:
            scenes += [oscd_distilled(city, date, root, confidence) for date in (1, 2)]
    return scenes


def heldout_oscd(city: str, date: int, root: str | Path | None = None,
                 fine: bool = False) -> LabelledScene:
    """A held-out OSCD date with ukis-csmask teacher labels: at 30 m, or (``fine``) the 10 m
    image with the 30 m labels repeated onto it. Agreement with a model, not truth."""
    scene = oscd_distilled(city, date, root)
    if not fine:
        return scene
    image = oscd_csmask(city, date, root)[0]
    h, w = scene.labels.shape[0] * CSMASK_FACTOR, scene.labels.shape[1] * CSMASK_FACTOR
    return LabelledScene(scene.name, np.ascontiguousarray(image[:, :h, :w]),
                         _repeat_labels(scene.labels, CSMASK_FACTOR), 10.0, False)


def degraded(scene: LabelledScene, f: int) -> LabelledScene:
    """``scene`` averaged ``f`` x ``f`` (a coarser sensor), labels by 75 % majority."""
    return LabelledScene(f"{scene.name}@{scene.gsd_m * f:g}m", _pool_image(scene.image, f),
                         _pool_labels(scene.labels, f), scene.gsd_m * f, scene.human)


def gate_scenes(root: str | Path | None = None) -> list[LabelledScene]:
    """The accuracy gate's scenes, none used for training or calibration: the whole UKIS scene
    (human masks, 30 m) and both dates of every OSCD_HELDOUT city at 10 m (teacher labels)."""
    scenes = [ukis_scene(root)]
    for city in OSCD_HELDOUT:
        scenes += [heldout_oscd(city, date, root, fine=True) for date in (1, 2)]
    return scenes


def scene_tiles(scene: LabelledScene, bands: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every whole, non-overlapping ``size`` tile of ``scene`` (row-major), bands first."""
    h, w = scene.labels.shape
    xs, ys = [], []
    for r in range(0, h - size + 1, size):
        for c in range(0, w - size + 1, size):
            xs.append(scene.image[:bands, r : r + size, c : c + size])
            ys.append(scene.labels[r : r + size, c : c + size])
    return np.ascontiguousarray(np.stack(xs), np.float32), np.stack(ys)


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


@dataclass
class SensorAugment:
    """Random changes that another sensor, date or atmosphere would make, per tile.

    Gains and offsets per band (another calibration and path radiance), a mix of each band
    with its spectral neighbours (another band response), haze (a spectrally flat-to-blue veil
    added over the scene), sensor noise, and a coarser grid resampled back (a 30 m product on a
    finer grid). All are off with ``SensorAugment.none()``, which keeps only version 0.2's
    gains.
    """

    gain_sigma: float = 0.15
    band_gain_sigma: float = 0.08
    offset_sigma: float = 0.015
    band_mix: float = 0.15
    haze_p: float = 0.3
    haze_max: float = 0.12
    noise_sigma: float = 0.004
    coarse_p: float = 0.2

    @classmethod
    def none(cls) -> SensorAugment:
        return cls(0.12, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        bands = x.shape[0]
        if self.band_mix > 0:
            mixed = x.copy()
            for b in range(bands):
                a = rng.uniform(0, self.band_mix)
                n = b + 1 if b + 1 < bands and (b == 0 or rng.random() < 0.5) else b - 1
                mixed[b] = (1 - a) * x[b] + a * x[n]
            x = mixed
        gain = np.exp(rng.normal(0.0, self.gain_sigma)
                      + rng.normal(0.0, self.band_gain_sigma, (bands, 1, 1)))
        x = x * gain.astype(np.float32)
        if self.offset_sigma > 0:
            x = x + rng.normal(0.0, self.offset_sigma, (bands, 1, 1)).astype(np.float32)
        if self.haze_p > 0 and rng.random() < self.haze_p:
            # Haze scatters blue most; an airlight of 0.1-0.3 reflectance, falling to the SWIR.
            h = rng.uniform(0, self.haze_max)
            airlight = rng.uniform(0.1, 0.3) * np.linspace(1.0, rng.uniform(0.2, 0.8), bands)
            x = (1 - h) * x + h * airlight[:, None, None].astype(np.float32)
        if self.coarse_p > 0 and rng.random() < self.coarse_p:
            t = x.shape[1]
            x = np.repeat(np.repeat(_pool_image(x, 2), 2, axis=1), 2, axis=2)[:, :t, :t]
        if self.noise_sigma > 0:
            x = x + rng.normal(0.0, self.noise_sigma, x.shape).astype(np.float32)
        return np.ascontiguousarray(x, np.float32)


def _upsample_image(image: np.ndarray, f: int) -> np.ndarray:
    """``image`` on an ``f`` x finer grid, bilinear (pixel centres kept: OpenCV's resize)."""
    import cv2

    h, w = image.shape[1] * f, image.shape[2] * f
    return np.stack([cv2.resize(band, (w, h), interpolation=cv2.INTER_LINEAR)
                     for band in image]).astype(np.float32)


def _repeat_labels(labels: np.ndarray, f: int) -> np.ndarray:
    """Each pixel of the last two axes repeated ``f`` x ``f`` (labels, or soft targets)."""
    return np.repeat(np.repeat(labels, f, axis=-2), f, axis=-1)


def _repeat_soft(soft: np.ndarray | None, f: int) -> np.ndarray | None:
    return None if soft is None else _repeat_labels(soft, f)


class TileSampler:
    """Random augmented training tiles from teacher-labelled training scenes only.

    Each teacher scene is also seen at other pixel sizes: a 30 m scene at 10 m (its labels
    repeated onto the 10 m image it was averaged from, when that is known) and at 60 m; a 10 m
    scene at 20 and 30 m (not with ``pixel_sizes=False``); a scene coarser than 30 m (the 73 m
    13-band one) also ``finer`` times finer, bilinear, its labels repeated. Scenes with cloud
    (``cloudy_share`` of the tiles) and without are drawn in fixed shares, because almost all
    teacher cloud is in one scene. ``augment`` makes each tile look like another sensor's
    (:class:`SensorAugment`). ``synthetic`` (a :class:`synthetic.SyntheticClouds`) composites
    clouds onto ``synthetic_p`` of the tiles drawn from clear scenes.

    A human-labelled scene, or any view of the UKIS scene (named ``ukis...``, whatever its
    labels), is refused: they are test scenes (UKIS is held out whole, the other sensors' scenes
    live outside the shared data), and training on one would leak the evaluation into the
    weights.
    """

    def __init__(self, scenes: list[LabelledScene], bands: int, tile: int = 128,
                 seed: int = 0, cloudy_share: float = 0.5,
                 augment: SensorAugment | None = None,
                 fine: dict[str, np.ndarray] | None = None,
                 synthetic: Callable[[np.ndarray, np.ndarray, np.random.Generator],
                                     tuple[np.ndarray, np.ndarray]] | None = None,
                 synthetic_p: float = 0.5, pixel_sizes: bool = True,
                 finer: tuple[int, ...] = ()) -> None:
        self.bands = bands
        self.tile = tile
        self.rng = np.random.default_rng(seed)
        self.cloudy_share = cloudy_share
        self.augment = augment or SensorAugment.none()
        self.synthetic = synthetic
        self.synthetic_p = synthetic_p
        self.teacher: list[LabelledScene] = []
        fine = fine or {}
        test = [s.name for s in scenes if s.human or s.name.startswith("ukis")]
        if test:
            raise SceneError(None, f"test scenes are never training data: {', '.join(test)} "
                                   "(UKIS and every human-labelled scene are held out whole; "
                                   "the 0.2 recipe that trained on UKIS rows was removed)")
        for scene in scenes:
            variants = [scene]
            if not pixel_sizes:  # a lever measured on its own (train --one-pixel-size)
                self.teacher += [scene] if min(scene.labels.shape) >= tile else []
                continue
            if scene.name in fine:  # the 10 m image this 30 m scene was averaged from
                f = CSMASK_FACTOR
                image = fine[scene.name]
                h, w = scene.labels.shape[0] * f, scene.labels.shape[1] * f
                variants.append(LabelledScene(f"{scene.name}/fine", image[:, :h, :w],
                                              _repeat_labels(scene.labels, f),
                                              scene.gsd_m / f, False,
                                              soft=_repeat_soft(scene.soft, f)))
            if scene.gsd_m > 30:  # a coarse scene also at pixel sizes near the flown ones
                variants += [LabelledScene(f"{scene.name}/x{f}", _upsample_image(scene.image, f),
                                           _repeat_labels(scene.labels, f), scene.gsd_m / f,
                                           False, soft=_repeat_soft(scene.soft, f))
                             for f in finer]
            factors = (2,) if scene.gsd_m >= 30 else (2, 3)
            for f in factors:
                variants.append(LabelledScene(f"{scene.name}/{f}", _pool_image(scene.image, f),
                                              _pool_labels(scene.labels, f), scene.gsd_m * f,
                                              False, soft=None if scene.soft is None
                                              else _pool_image(scene.soft, f)))
            self.teacher += [v for v in variants if min(v.labels.shape) >= tile]
        cloudy = np.array([float(np.mean(s.labels == CLOUD)) > 0.02 for s in self.teacher])
        self.teacher_cloudy = cloudy
        sizes = np.array([s.labels.size for s in self.teacher], float)
        # Within each group, scenes weighted by pixel count.
        self.teacher_p = np.zeros(len(self.teacher))
        for group, share in ((cloudy, cloudy_share), (~cloudy, 1.0 - cloudy_share)):
            if group.any():
                self.teacher_p[group] = share * sizes[group] / sizes[group].sum()
        self.teacher_p /= self.teacher_p.sum()

    def tile_from(self, scene: LabelledScene, clouds: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
        """A random tile of ``scene``; ``clouds``: with synthetic clouds composited on."""
        x, y, _ = self._tile(scene, clouds, soft=False)
        return x, y

    def _tile(self, scene: LabelledScene, clouds: bool, soft: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        t = self.tile
        h, w = scene.labels.shape
        r = int(self.rng.integers(0, h - t + 1))
        c = int(self.rng.integers(0, w - t + 1))
        x = scene.image[: self.bands, r : r + t, c : c + t].astype(np.float32)
        y = scene.labels[r : r + t, c : c + t].copy()
        p = None
        if soft:
            if scene.soft is None:
                raise SceneError(None, f"{scene.name}: no teacher probabilities for soft targets")
            p = scene.soft[:, r : r + t, c : c + t].astype(np.float32)
        k = int(self.rng.integers(0, 4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        p = None if p is None else np.rot90(p, k, axes=(1, 2))
        if self.rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
            p = None if p is None else p[:, :, ::-1]
        if clouds:
            x, y = self.synthetic(np.ascontiguousarray(x), np.ascontiguousarray(y), self.rng)
        x = self.augment(np.ascontiguousarray(x), self.rng)
        return x, np.ascontiguousarray(y), None if p is None else np.ascontiguousarray(p)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x, y, _ = self._batch(n, soft=False)
        return x, y

    def soft_batch(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`batch`, with the teacher's probabilities (N, 3, t, t) as a third array
        (soft distillation); every teacher scene must carry them."""
        x, y, p = self._batch(n, soft=True)
        assert p is not None
        return x, y, p

    def _batch(self, n: int, soft: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        xs, ys, ps = [], [], []
        for _ in range(n):
            index = int(self.rng.choice(len(self.teacher), p=self.teacher_p))
            scene = self.teacher[index]
            clouds = (self.synthetic is not None and not self.teacher_cloudy[index]
                      and self.rng.random() < self.synthetic_p)
            if soft and clouds:
                raise SceneError(None, "synthetic clouds have no teacher probabilities")
            x, y, p = self._tile(scene, clouds, soft)
            xs.append(x)
            ys.append(y)
            ps.append(p)
        return np.stack(xs), np.stack(ys), np.stack(ps) if soft else None


def fine_images(root: str | Path | None = None) -> dict[str, np.ndarray]:
    """The 10 m images of the training OSCD dates, by the names of their 30 m scenes."""
    out = {}
    for city in oscd_cities(root):
        if city not in OSCD_HELDOUT:
            for date in (1, 2):
                out[f"oscd-{city}-{date}"] = oscd_csmask(city, date, root)[0]
    return out


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
