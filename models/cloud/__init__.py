"""The cloud filter: a tiny clear / cloud / shadow model for 4 (blue, green, red, NIR) or 6
(+ SWIR 1.6 and 2.2 µm) bands of top-of-atmosphere reflectance. See ``card.md``.

Importing this module registers the zoo entries ``cloud-4band`` and ``cloud-6band``. torch is
imported only when a model is built or a loss computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.zoo import ZooModel, register

HERE = Path(__file__).resolve().parent
VERSION = "0.2.1"
TILE = 256
# Sentinel-2 L1C digital numbers are reflectance x 10000.
L1C_SCALE = 1e-4


def _build(bands: int) -> Any:
    from onboard.models.cloud.model import build

    return build(bands)


def train_batches(root: Path, bands: int = 4, batches: int = 300, batch: int = 16,
                  seed: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Augmented training-split batches: x (N, bands, 128, 128) reflectance, y (N, 128, 128)
    labels (0 clear, 1 cloud, 2 shadow, 3 clear-or-shadow, 255 ignore)."""
    from onboard.models.cloud import dataset

    sampler = dataset.TileSampler(dataset.training_scenes(root), bands, seed=seed)
    for _ in range(batches):
        yield sampler.batch(batch)


def validation_batches(root: Path, bands: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out human-labelled rows of the UKIS scene, as two 224 x 256 tiles."""
    from onboard.models.cloud import dataset

    held = dataset.heldout_human(root)
    x = np.stack([held.image[:bands, :, :256], held.image[:bands, :, 256:512]])
    y = np.stack([held.labels[:, :256], held.labels[:, 256:512]])
    return [(np.ascontiguousarray(x, np.float32), y)]


def calibration_tiles(root: Path, n: int, bands: int = 4, seed: int = 2) -> np.ndarray:
    """``n`` unaugmented 256 x 256 tiles from training-split images (no held-out pixel, and no
    teacher labels needed, so no s2cloudless run)."""
    from onboard.models.cloud import dataset

    rng = np.random.default_rng(seed)
    images = [im for im in dataset.training_images(root) if min(im.shape[1:]) >= TILE]
    # The UKIS training rows (288 x 512, the only human-labelled sensor) every other tile.
    tiles = []
    for i in range(n):
        image = images[0] if i % 2 == 0 else images[int(rng.integers(1, len(images)))]
        h, w = image.shape[1:]
        r, c = int(rng.integers(0, h - TILE + 1)), int(rng.integers(0, w - TILE + 1))
        tiles.append(image[:bands, r : r + TILE, c : c + TILE])
    return np.ascontiguousarray(np.stack(tiles), np.float32)


def loss(logits: Any, labels: Any) -> Any:
    from onboard.models.cloud.train import loss as _loss

    return _loss(logits, labels)


def metric(outputs: list[np.ndarray], labels: list[np.ndarray]) -> float:
    from onboard.models.cloud.metrics import boa

    return boa(outputs, labels)


BANDS = {4: ["blue", "green", "red", "nir"], 6: ["blue", "green", "red", "nir", "swir16", "swir22"]}

for _bands in (4, 6):
    register(ZooModel(
        name=f"cloud-{_bands}band",
        task="cloud",
        version=VERSION,
        build=partial(_build, _bands),
        weights=HERE / f"weights_{_bands}band.pt",
        bands=BANDS[_bands],
        input_scale=[L1C_SCALE] * _bands,
        input_offset=[0.0] * _bands,
        tile_size=TILE,
        gsd_m=10.0,
        output_kind="classes",
        classes={0: "clear", 1: "cloud", 2: "shadow"},
        metric_name="boa",
        train_batches=partial(train_batches, bands=_bands),
        validation_batches=partial(validation_batches, bands=_bands),
        calibration_tiles=partial(calibration_tiles, bands=_bands),
        loss=loss,
        metric=metric,
        card=HERE / "card.md",
        extra={"heldout": "UKIS rows 0-223; OSCD hongkong, paris, dubai, milano; "
                          "13-band scene rows 512-855"},
    ))
