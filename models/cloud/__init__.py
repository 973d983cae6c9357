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
# 0.4 retrained the 4-band model only. Two 6-band candidates called a hazy clear city cloud and
# a third gained too little for what it lost (card.md), so 6-band stays at 0.3.
VERSIONS = {4: "0.4.0", 6: "0.3.0"}
TILE = 256
# Sentinel-2 L1C digital numbers are reflectance x 10000.
L1C_SCALE = 1e-4


def _build(bands: int) -> Any:
    from onboard.models.cloud.model import build

    return build(bands)


def train_batches(root: Path, bands: int = 4, batches: int = 300, batch: int = 16,
                  seed: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Augmented training batches (the distillation recipe): x (N, bands, 128, 128)
    reflectance, y (N, 128, 128) labels (0 clear, 1 cloud, 2 shadow, 255 ignore)."""
    from onboard.models.cloud import dataset

    sampler = dataset.TileSampler(dataset.distillation_scenes(root), bands, seed=seed,
                                  augment=dataset.SensorAugment(),
                                  fine=dataset.fine_images(root))
    for _ in range(batches):
        yield sampler.batch(batch)


GATE_TILE = 128


def validation_batches(root: Path, bands: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """The accuracy gate's set: every whole 128 x 128 tile of the scenes of
    :func:`dataset.gate_scenes` (none used for training or calibration), one batch per scene:
    16 tiles of the UKIS scene (human masks) and 138 of the held-out OSCD dates (teacher
    labels)."""
    from onboard.models.cloud import dataset

    return [dataset.scene_tiles(scene, bands, GATE_TILE) for scene in dataset.gate_scenes(root)]


def gate_scene_names() -> list[str]:
    from onboard.models.cloud import dataset

    return ["ukis (UKIS Sentinel-2 6-band test scene, human masks, 30 m)"] + [
        f"oscd-{city}-{date} (ukis-csmask teacher labels, 10 m)"
        for city in dataset.OSCD_HELDOUT for date in (1, 2)]


def calibration_tiles(root: Path, n: int, bands: int = 4, seed: int = 2) -> np.ndarray:
    """``n`` unaugmented 128 x 128 tiles from the distillation training images (no gate scene):
    every other one from the cloudy 13-band scene, the rest from the training OSCD dates at
    10 m."""
    from onboard.models.cloud import dataset

    rng = np.random.default_rng(seed)
    images = [dataset.s2cloudless_scene(root).image, *dataset.fine_images(root).values()]
    tiles = []
    for i in range(n):
        image = images[0] if i % 2 == 0 else images[int(rng.integers(1, len(images)))]
        h, w = image.shape[1:]
        r = int(rng.integers(0, h - GATE_TILE + 1))
        c = int(rng.integers(0, w - GATE_TILE + 1))
        tiles.append(image[:bands, r : r + GATE_TILE, c : c + GATE_TILE])
    return np.ascontiguousarray(np.stack(tiles), np.float32)


def loss(logits: Any, labels: Any) -> Any:
    from onboard.models.cloud.train import loss as _loss

    return _loss(logits, labels)


def metric(outputs: list[np.ndarray], labels: list[np.ndarray]) -> float:
    from onboard.models.cloud.metrics import boa

    return boa(outputs, labels)


BANDS = {4: ["blue", "green", "red", "nir"], 6: ["blue", "green", "red", "nir", "swir16", "swir22"]}

# 4-band 0.4's INT8 quantises the per-pixel path's activations only: with the context path's
# activations in INT8 too, their rounding added up to +0.4 on the cloud logit of hazy sea and
# city (7 % of the held-out hongkong-1 date called cloud, 0.1 % in fp32; card.md). The context
# path keeps INT8 weights (weight-only: rounding its weights alone costs nothing measurable).
PIXEL_PATH_NODES = ["/pix/Conv", "/Add", "/Relu_8", "/pix2/Conv", "/Relu_9", "/head/Conv"]
INT8_EXTRA = {b: {"int8_only_prefix": PIXEL_PATH_NODES, "int8_weights_elsewhere": True}
              for b in (4, 6)}

for _bands in (4, 6):
    register(ZooModel(
        name=f"cloud-{_bands}band",
        task="cloud",
        version=VERSIONS[_bands],
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
        extra={"heldout": "the whole UKIS scene; OSCD hongkong, paris, dubai, milano",
               "gate_scenes": gate_scene_names,
               # The UKIS batch is the only one a person labelled; ukis-csmask labelled the rest,
               # so a comparison with it is made on this batch alone.
               "human_batches": [0], "human_set": "the whole UKIS scene (human masks)",
               # Fully convolutional: gated on 128-pixel tiles, flown on 256 (or whole scenes).
               "dynamic_size": True, **INT8_EXTRA[_bands]},
    ))
