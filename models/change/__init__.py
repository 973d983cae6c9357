"""Change detection against a memory of earlier clear observations of a place.

A siamese encoder (``model.py``, whose docstring states the bundle interface the runtime uses)
gives one int8-friendly latent per 32 x 32 cell; the change score of a cell is the calibrated
minimum distance to its last K references. See ``card.md``.

Importing this module registers the zoo entries ``change-13band`` and ``change-4band`` (RGB+NIR).
Their gate metric is the pooled AUPRC of changed cells over the held-out cities (beihai,
bordeaux, nantes), computed through the store's int8 latent codes. A validation batch is one city:
its 256 x 256 windows of date 1 followed by the same windows of date 2, so the compiler runs the
encoder on single images as the flight runtime does and the metric pairs them up. torch is
imported only when a model is built or trained.

No training batches or loss are registered, so ``onboard compile --prune`` cannot fine-tune:
the latent scale and calibration in ``extra.change`` belong to the committed weights, and a
pruned or fine-tuned encoder would need both refitted (``train.calibrate``).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.zoo import ZooModel, register

HERE = Path(__file__).resolve().parent
# 13 bands 0.3: 0.2 with the 60 m atmospheric bands B01, B09, B10 ignored (card).
VERSIONS = {13: "0.3.0", 4: "0.2.0"}
TILE = 256
CELL = 32


def calibration(bands: int) -> dict[str, Any]:
    """What training fitted for a variant: latent scale, calibration, split (JSON beside this)."""
    path = HERE / f"calibration_{bands}band.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no calibration; run python -m "
                                f"onboard.models.change.train --bands {bands}")
    return json.loads(path.read_text())


def change_block(bands: int) -> dict[str, Any]:
    """``manifest.extra["change"]`` of a variant's bundle."""
    from onboard.models.change.scoring import change_extra

    info = calibration(bands)
    # Bands the encoder multiplies by zero: still inputs (the interface is the variant's), but
    # a payload team may feed them anything finite.
    ignored = {"ignored_bands": info["ignore_bands"]} if info.get("ignore_bands") else {}
    return change_extra(info["latent_scale"], info["a"], info["b"], info["distance"],
                        subcells=info["subcells"], heldout_cities=info["heldout_cities"],
                        calibration_cities=info["calibration_cities"], **ignored)


def manifest_extra(bands: int) -> dict[str, Any]:
    """What the compiler adds to ``manifest.extra`` (read when the bundle is written)."""
    return {"change": change_block(bands)}


def _build(bands: int) -> Any:
    from onboard.models.change.model import build

    return build(bands, calibration(bands).get("ignore_bands", ()))


def validation_batches(root: Path, bands: int = 13) -> list[tuple[np.ndarray, np.ndarray]]:
    """One batch per held-out city (see the module docstring)."""
    from onboard.models.change import dataset

    return [dataset.window_batch(city)
            for city in dataset.load_cities(root, dataset.HELDOUT, bands)]


def calibration_tiles(root: Path, n: int, bands: int = 13, seed: int = 2) -> np.ndarray:
    """``n`` 256 x 256 windows of either date of the training cities (no held-out pixel)."""
    from onboard.models.change import dataset

    rng = np.random.default_rng(seed)
    cities = [c for c in dataset.load_cities(root, dataset.TRAINING, bands)
              if min(c.before.shape[1:]) >= TILE]
    tiles = []
    for i in range(n):
        city = cities[i % len(cities)]
        image = city.before if rng.random() < 0.5 else city.after
        _, h, w = image.shape
        r, c = int(rng.integers(0, h - TILE + 1)), int(rng.integers(0, w - TILE + 1))
        tiles.append(image[:, r:r + TILE, c:c + TILE])
    return np.ascontiguousarray(np.stack(tiles), np.float32)


def metric(outputs: list[np.ndarray], labels: list[np.ndarray], bands: int = 13) -> float:
    from onboard.models.change.metrics import pooled_auprc

    info = calibration(bands)
    return pooled_auprc(outputs, labels, info["distance"], info["latent_scale"],
                        info["subcells"])


BANDS = {13: ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10",
              "B11", "B12"], 4: ["blue", "green", "red", "nir"]}


def _scale_offset(bands: int) -> tuple[list[float], list[float]]:
    from onboard.models.change.scoring import input_scale_offset

    return input_scale_offset(bands)


for _bands in (13, 4):
    _scale, _offset = _scale_offset(_bands)
    register(ZooModel(
        name=f"change-{_bands}band",
        task="change",
        version=VERSIONS[_bands],
        build=partial(_build, _bands),
        weights=HERE / f"weights_{_bands}band.pt",
        bands=BANDS[_bands],
        input_scale=_scale,
        input_offset=_offset,
        tile_size=TILE,
        gsd_m=10.0,
        output_kind="vector",
        metric_name="auprc",
        validation_batches=partial(validation_batches, bands=_bands),
        calibration_tiles=partial(calibration_tiles, bands=_bands),
        metric=partial(metric, bands=_bands),
        card=HERE / "card.md",
        extra={"heldout": "OSCD beihai, bordeaux, nantes",
               "output_name": "latent", "cell_size": CELL, "dynamic_size": True,
               "output_description": f"one latent per {CELL} x {CELL} cell; change = calibrated "
                                     "min distance to the last K references",
               "manifest_extra": partial(manifest_extra, _bands)},
    ))
