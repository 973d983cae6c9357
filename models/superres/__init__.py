"""Super-resolution: ×2 of the 10 m bands and guided 20 m → 10 m sharpening. See ``card.md``.

Importing this module registers the zoo entries ``superres-x2`` (blue, green, red, NIR at twice
their sampling) and ``superres-sharpen`` (B05, B06, B07, B8A, B11, B12 on the 10 m grid, guided by
the 10 m bands). Both take and give top-of-atmosphere reflectance (L1C DN × 1e-4). Validation
for the compiler's gate is Wald's protocol on the held-out scenes (``dataset.HELDOUT``), whole,
one scale down; the metric is PSNR (peak 10000 DN, i.e. reflectance 1.0) averaged over the bands.
torch is imported only when a model is built or a loss computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.zoo import ZooModel, register

HERE = Path(__file__).resolve().parent
# 0.2.0 of superres-sharpen adds the per-window detail injection (model.local_detail), 0.3.0 its
# bicubic skip (model.bicubic_on_pairs); the ×2 model keeps its 0.1 architecture.
VERSIONS = {"x2": "0.1.0", "sharpen": "0.3.0"}
# The window of superres-sharpen's local fit (model.local_detail), in pixels of the input grid:
# 15 either side, a few hundred pixels per fit, small enough to follow a field's edge. Kept here,
# torch-free, because the bundle's stated context follows from it.
FIT_WINDOW = 31
# Input pixels each side that the guided sharpening reads: the fit's window radius, the low-pass
# in front of it (2) and the body's seven 3 x 3 convolutions.
SHARPEN_CONTEXT = FIT_WINDOW // 2 + 2 + 7
TILES = {"x2": 128, "sharpen": 256}
X2_BANDS = ["blue", "green", "red", "nir"]
# Sensor names: "rededge" names three Sentinel-2 bands, so common names would be ambiguous.
SHARPEN_BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
SHARPEN_OUTPUT = ["B05", "B06", "B07", "B8A", "B11", "B12"]


def _build(task: str) -> Any:
    from onboard.models.superres.model import build_sharpen, build_x2

    return build_x2() if task == "x2" else build_sharpen()


def train_batches(root: Path, task: str, batches: int = 200, batch: int = 16,
                  seed: int = 3) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Wald's-protocol patches of the training scenes (for the compiler's fine-tune)."""
    from onboard.models.superres import dataset
    from onboard.models.superres.train import PATCH

    sampler = dataset.PatchSampler(dataset.training_scenes(root), task, PATCH[task], seed)
    for _ in range(batches):
        yield sampler.batch(batch)


def validation_batches(root: Path, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each held-out scene whole, one batch each: (input, truth) reflectance, Wald's protocol."""
    from onboard.models.superres import dataset

    pair = dataset.x2_pair if task == "x2" else dataset.sharpen_pair
    out = []
    for scene in dataset.heldout_scenes(root):
        x, y = pair(scene)
        out.append((x[None] * dataset.DN_SCALE, y[None] * dataset.DN_SCALE))
    return out


def calibration_tiles(root: Path, n: int, task: str, seed: int = 4) -> np.ndarray:
    """``n`` tiles of training scenes only, half as the model sees them on board (native
    sampling: 10 m bands, and for sharpening the 20 m bands nearest-resampled to 10 m) and half
    one scale down (as in training), so the INT8 ranges cover both."""
    from onboard.models.superres import dataset

    rng = np.random.default_rng(seed)
    size = TILES[task]
    images = []
    for scene in dataset.training_scenes(root):
        if task == "x2":
            native, down = scene.im10, dataset.x2_pair(scene)[0]
        else:
            native = np.concatenate([scene.im10, dataset.nearest_up(scene.im20)])
            down = dataset.sharpen_pair(scene)[0]
        images += [im for im in (native, down) if min(im.shape[1:]) >= size]
    tiles = []
    for i in range(n):
        image = images[i % len(images)] if i < len(images) else images[
            int(rng.integers(len(images)))]
        h, w = image.shape[1:]
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        tiles.append(image[:, r : r + size, c : c + size])
    return np.ascontiguousarray(np.stack(tiles) * dataset.DN_SCALE, np.float32)


def loss(prediction: Any, truth: Any) -> Any:
    import torch

    return torch.nn.functional.l1_loss(prediction, torch.as_tensor(truth))


def metric(outputs: list[np.ndarray], truths: list[np.ndarray]) -> float:
    """PSNR (peak reflectance 1.0 = 10000 DN), per band over all batches, averaged over bands."""
    squared = np.zeros(outputs[0].shape[1])
    count = 0
    for output, truth in zip(outputs, truths, strict=True):
        error = np.asarray(output, np.float64) - np.asarray(truth, np.float64)
        squared += (error ** 2).sum(axis=(0, 2, 3))
        count += error.shape[0] * error.shape[2] * error.shape[3]
    return float(np.mean(10.0 * np.log10(1.0 / (squared / count))))


_ENTRIES = {
    "x2": dict(bands=X2_BANDS, gsd=10.0, scale=2,
               description="reflectance (DN x 1e-4) of blue, green, red, nir at twice the input "
                           "sampling (5 m from 10 m)"),
    "sharpen": dict(bands=SHARPEN_BANDS, gsd=10.0, scale=1,
                    description="reflectance (DN x 1e-4) of B05, B06, B07, B8A, B11, B12 "
                                "sharpened to the input grid (10 m)"),
}

for _task, _entry in _ENTRIES.items():
    register(ZooModel(
        name=f"superres-{_task}",
        task="superres",
        version=VERSIONS[_task],
        build=partial(_build, _task),
        weights=HERE / f"weights_{_task}.pt",
        bands=list(_entry["bands"]),
        input_scale=[1e-4] * len(_entry["bands"]),
        input_offset=[0.0] * len(_entry["bands"]),
        tile_size=TILES[_task],
        gsd_m=float(_entry["gsd"]),
        output_kind="values",
        metric_name="psnr",
        train_batches=partial(train_batches, task=_task),
        validation_batches=partial(validation_batches, task=_task),
        calibration_tiles=partial(calibration_tiles, task=_task),
        loss=loss,
        metric=metric,
        card=HERE / "card.md",
        extra={"scale_factor": _entry["scale"], "output_description": _entry["description"],
               "output_bands": X2_BANDS if _task == "x2" else SHARPEN_OUTPUT,
               "heldout": "Malmö (DSen2 demo tile T33UUB), OSCD paris, lasvegas, valencia "
                          "(both dates)",
               "finetune_epochs": 0,
               **({} if _task == "x2" else {
                   # The window fit and the skip stay float: only the body is quantised.
                   "int8_only_prefix": "/body/",
                   "manifest_extra": {"superres": {"context": SHARPEN_CONTEXT}}})},
    ))
