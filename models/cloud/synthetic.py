"""Synthetic clouds and shadows composited onto clear training tiles.

Every cloud the teacher labels comes from one scene (the 13-band s2cloudless scene), so the
model has seen clouds over one landscape only. The OSCD training cities are 99.6-100 % clear:
28 dates of 14 landscapes (desert, coast, farmland, cities) with no cloud over them.
Compositing clouds onto them gives cloud over every background we have, at every pixel size
the sampler draws.

The physics is a two-layer one:

* a cloud of opacity ``alpha`` (fractal noise, thresholded to a random cover, soft edges of a
  random width, sometimes a thin deck that never becomes opaque) mixes the ground with a thick
  cloud's reflectance: ``(1 - alpha) * ground + alpha * cloud``. The cloud spectra are real:
  pixels of the training scene's thick clouds (:meth:`SyntheticClouds.from_scene`), with their
  own falling SWIR, scaled in brightness and textured;
* its shadow is the same opacity field moved by one offset per tile (the sun's azimuth and the
  cloud's height), darkening the ground it falls on by a random depth, less in the blue
  (diffuse skylight is blue and still reaches the shadow).

Labels: cloud where ``alpha`` reaches ``cloud_alpha``; ignored where a thin veil lies between
``ignore_alpha`` and ``cloud_alpha`` (a human may or may not call it cloud); shadow where the
shadow is at least ``shadow_label`` of its full depth and no cloud lies over it, ignored where
it is fainter. Pixels the teacher left ignored stay ignored unless a cloud covers them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onboard.models.cloud.dataset import CLEAR, CLOUD, IGNORE, NOT_CLOUD, SHADOW, LabelledScene

# How much of the shadow's depth each band keeps losing: blue least (skylight fills it).
_SHADOW_BAND_WEIGHT = np.array([0.55, 0.7, 0.8, 0.95, 1.0, 1.0], np.float32)


def fractal_noise(size: int, rng: np.random.Generator, beta: float) -> np.ndarray:
    """A (size, size) field with power falling as 1 / f**beta, zero mean and unit std: octaves
    of random grids from 4 x 4 up to full size, cubic-resized and summed."""
    import cv2

    field = np.zeros((size, size), np.float32)
    cells = 4
    while cells <= size:
        grid = rng.standard_normal((cells, cells)).astype(np.float32)
        field += cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC) * (
            (cells / 4.0) ** (-beta / 2.0))
        cells *= 2
    field -= field.mean()
    return field / max(float(field.std()), 1e-6)


@dataclass
class SyntheticClouds:
    """Composites a random cloud field and its shadow onto one clear tile (module docstring)."""

    spectra: np.ndarray  # (n, 6) thick-cloud TOA reflectance, dataset.BANDS_6 order
    cloud_alpha: float = 0.35
    ignore_alpha: float = 0.12
    shadow_p: float = 0.7
    shadow_label: float = 0.7

    @classmethod
    def from_scene(cls, scene: LabelledScene, min_blue: float = 0.35,
                   limit: int = 20000, seed: int = 0, **settings: float) -> SyntheticClouds:
        """Thick-cloud spectra from a scene's cloud pixels: those bright in the blue (a thin or
        broken cloud's pixel is mostly ground). ``settings`` are the other fields."""
        pixels = scene.image[:, scene.labels == CLOUD]
        thick = pixels[:, pixels[0] >= min_blue].T
        if len(thick) == 0:
            raise ValueError(f"{scene.name}: no cloud pixel with blue >= {min_blue}")
        rng = np.random.default_rng(seed)
        if len(thick) > limit:
            thick = thick[rng.choice(len(thick), limit, replace=False)]
        return cls(np.ascontiguousarray(thick, np.float32), **settings)

    def __call__(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        bands, t = x.shape[0], x.shape[1]
        reach = int(rng.uniform(0.05, 0.35) * t)
        canvas = t + 2 * reach
        noise = fractal_noise(canvas, rng, beta=float(rng.uniform(1.5, 3.5)))
        cover = rng.uniform(0.05, 0.7)
        threshold = np.quantile(noise, 1.0 - cover)
        softness = rng.uniform(0.15, 1.2)
        alpha_full = np.clip((noise - threshold) / softness, 0.0, 1.0) ** rng.uniform(0.5, 2.0)
        if rng.random() < 0.25:  # a thin deck that never becomes opaque
            alpha_full *= rng.uniform(0.3, 0.9)
        alpha = alpha_full[reach : reach + t, reach : reach + t]

        x = x.copy()
        y = y.copy()
        ground = (y == CLEAR) | (y == NOT_CLOUD)
        if rng.random() < self.shadow_p and reach > 0:
            angle = rng.uniform(0.0, 2.0 * np.pi)
            dist = rng.uniform(0.3, 1.0) * reach
            dy, dx = int(round(dist * np.sin(angle))), int(round(dist * np.cos(angle)))
            moved = alpha_full[reach + dy : reach + dy + t, reach + dx : reach + dx + t]
            strength = np.clip(moved / 0.6, 0.0, 1.0)
            depth = rng.uniform(0.35, 0.8)
            weight = _SHADOW_BAND_WEIGHT[:bands, None, None]
            x *= 1.0 - depth * weight * strength[None]
            free = ground & (alpha < self.ignore_alpha)
            y[free & (strength >= self.shadow_label)] = SHADOW
            y[free & (strength > 0.15) & (strength < self.shadow_label)] = IGNORE

        spectrum = self.spectra[int(rng.integers(len(self.spectra)))][:bands]
        spectrum = spectrum * np.float32(rng.uniform(0.8, 1.25))
        texture = 1.0 + rng.uniform(0.0, 0.15) * fractal_noise(t, rng, beta=2.5)
        cloud = spectrum[:, None, None] * np.clip(texture, 0.5, 1.5)[None]
        x = (1.0 - alpha[None]) * x + alpha[None] * cloud
        known = y != IGNORE
        y[known & (alpha >= self.ignore_alpha) & (alpha < self.cloud_alpha)] = IGNORE
        y[alpha >= self.cloud_alpha] = CLOUD
        return np.ascontiguousarray(x, np.float32), y
