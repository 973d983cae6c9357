"""Train the change encoder on the training cities, then fit its latent scale and calibration.

    python -m onboard.models.change.train --bands 13 [--steps 2500] [--data DIR]

Siamese and supervised: both dates of a crop go through the same encoder. A cell's distance is
the largest L2 distance between the two dates' latents of its 16 sub-cells (8 x 8 px); through
a learnt logistic link it is fitted to the OSCD label of the cell (changed when more than 1 %
of its pixels changed) with binary cross entropy, and each sub-cell's distance, through its own
link, to whether that sub-cell changed (more than 10 % of it; none of it for a negative). The
per-date gains and offsets of :class:`PairSampler` teach that illumination and haze are not
change.

With ``--validate CITY`` (choosing the recipe; aguasclaras when no city is named), that
training city is left out of training and the encoder is scored on it (AUPRC of cells) every
250 steps. Without it (the committed weights), all five training cities are used for a fixed
number of steps. Then, encoded window by window as on board, on the training cities (never on
a held-out city):

* ``latent_scale``: the 99.99th percentile of |latent| / 127, the int8 step of the store;
* the calibration ``a``, ``b``: logistic regression of the cell label on the distance between
  the int8-dequantised latents (on the validation city with ``--validate``).

The committed weights: ``python -m onboard.models.change.train --bands 13 --steps 1500`` and the
same with ``--bands 4`` (1500 steps, as version 0.1; the recipe was chosen on two folds,
``--validate aguasclaras`` and ``--validate bercy``, see the card). ``--self-pairs``,
``--pasted``, ``--temporal`` and ``--real-shift`` are levers measured on those folds and not
adopted; the card gives their numbers.

Writes ``weights_{bands}band.pt`` (the encoder's state_dict) and ``calibration_{bands}band.json``
beside this file. torch runs on one thread: the machine is shared. ``--data`` defaults to
``$ONBOARD_DATA``, else ``../shared/data`` (:mod:`onboard.models.data`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from onboard.models.change import dataset
from onboard.models.change.model import (
    POSITIVE_FRACTION,
    SUBCELLS,
    PairHead,
    build,
    cell_distance,
    dequantise,
    quantise,
    subcell_distances,
)
from onboard.models.data import default_data_root

HERE = Path(__file__).resolve().parent
# A sub-cell (64 px) is a positive of the auxiliary loss when more than 10 % of it changed, a
# negative when none of it did; the few changed pixels in between are left out.
SUBCELL_POSITIVE = 0.1


def subcell_fraction(masks: np.ndarray) -> torch.Tensor:
    """(n, S, h, w): the changed fraction of each 8 x 8 sub-cell, in the latent's sub-cell
    order (``pixel_unshuffle``, as :class:`ChangeEncoder` lays them out)."""
    eighths = dataset.cell_fraction(masks, 8)
    return F.pixel_unshuffle(torch.from_numpy(eighths)[:, None], 4)


TEMPORAL_TRIM = 0.25


def _below_quantile(distances: torch.Tensor) -> torch.Tensor:
    """1.0 where a distance is below the (1 - TEMPORAL_TRIM) quantile of ``distances``."""
    limit = torch.quantile(distances.detach().flatten(), 1.0 - TEMPORAL_TRIM)
    return (distances.detach() <= limit).float()


def weights_path(bands: int) -> Path:
    return HERE / f"weights_{bands}band.pt"


def calibration_path(bands: int) -> Path:
    return HERE / f"calibration_{bands}band.json"


def encoder_fn(model: torch.nn.Module) -> Any:
    def encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return encode


def fit_logistic(d: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Maximum-likelihood ``a``, ``b`` of P(changed) = sigmoid(a d + b) (Newton's method)."""
    x = np.stack([np.asarray(d, np.float64), np.ones(len(d))], 1)
    y = np.asarray(y, np.float64)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def _latent_pairs(model: torch.nn.Module, cities: list[dataset.City]
                  ) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    encode = encoder_fn(model)
    return [(dataset.run_tiled(encode, c.before), dataset.run_tiled(encode, c.after), c.cells)
            for c in cities]


def validation_auprc(model: torch.nn.Module, cities: list[dataset.City]) -> float:
    from onboard.models.change.metrics import auprc

    model.eval()
    pairs = _latent_pairs(model, cities)
    d = np.concatenate([cell_distance(a, b, subcells=SUBCELLS).ravel() for a, b, _ in pairs])
    y = np.concatenate([np.asarray(t).ravel() for _, _, t in pairs])
    return auprc(d, y)


def calibrate(model: torch.nn.Module, training: list[dataset.City],
              calibration: list[dataset.City], distance: str = "l2") -> dict[str, Any]:
    """Latent scale from the ``training`` cities, logistic calibration on ``calibration``."""
    model.eval()
    magnitudes = np.concatenate([np.abs(np.concatenate([a.ravel(), b.ravel()]))
                                 for a, b, _ in _latent_pairs(model, training)])
    scale = float(np.percentile(magnitudes, 99.99) / 127.0)
    cities = calibration
    ds, ys = [], []
    for a, b, y in _latent_pairs(model, calibration):
        qa, qb = dequantise(quantise(a, scale), scale), dequantise(quantise(b, scale), scale)
        ds.append(cell_distance(qa, qb, distance, subcells=SUBCELLS).ravel())
        ys.append(np.asarray(y).ravel())
    d, y = np.concatenate(ds), np.concatenate(ys)
    a, b = fit_logistic(d, y)
    return {"latent_scale": scale, "a": a, "b": b, "distance": distance,
            "calibration_cells": int(len(d)), "calibration_positives": int(y.sum()),
            "calibration_cities": [c.name for c in cities]}


def train(bands: int, data_root: Path, steps: int = 2500, batch: int = 16, crop: int = 128,
          lr: float = 2e-3, seed: int = 0, log_every: int = 100, val_every: int = 250,
          self_pairs: float = 0.0, pasted: float = 0.0, subcell_weight: float = 1.0,
          validate: str | None = None, keep_last: bool = False, temporal: float = 0.0,
          real_shift: bool = False, ignore_bands: tuple[str, ...] = ()
          ) -> tuple[Any, dict[str, Any]]:
    import copy

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if validate is not None and validate not in dataset.TRAINING:
        raise ValueError(f"validate on a training city {dataset.TRAINING}, not {validate!r}")
    names = [c for c in dataset.TRAINING if c != validate]
    cities = dataset.load_cities(data_root, names, bands)
    validation = dataset.load_cities(data_root, [validate], bands) if validate else []
    best: tuple[float, int, dict[str, Any]] = (-1.0, 0, {})
    history = []
    extra = dataset.load_cities(data_root, dataset.UNLABELLED, bands) if self_pairs else []
    unlabelled = dataset.load_cities(data_root, dataset.TEMPORAL, bands) if temporal else []
    shift = dataset.radiometric_shift(cities) if real_shift else 0.08
    sampler = dataset.PairSampler(cities, crop=crop, seed=seed, shift=shift,
                                  self_pairs=self_pairs, extra_images=extra, pasted=pasted,
                                  temporal=temporal, temporal_cities=unlabelled)
    model, head, subcell_head = build(bands, ignore_bands), PairHead(), PairHead()
    params = [*model.parameters(), *head.parameters(), *subcell_head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    started = time.perf_counter()
    model.train()
    running = 0.0
    for step in range(1, steps + 1):
        a, b, masks, labelled = sampler.batch_masks(batch)
        y = (dataset.cell_fraction(masks) > POSITIVE_FRACTION).astype(np.float32)
        z = model(torch.from_numpy(np.concatenate([a, b])))
        distances = subcell_distances(z[:batch], z[batch:])
        cell = distances.max(1).values
        fraction = subcell_fraction(masks)
        cell_weight = torch.ones_like(cell)
        subcell_mask = ((fraction == 0) | (fraction > SUBCELL_POSITIVE)).float()
        if not labelled.all():
            # Real date pairs without labels: most of a city did not change between its
            # dates, so all but the most distant TEMPORAL_TRIM of their cells and sub-cells
            # count as unchanged; the rest, probably real change, are left out.
            free = torch.from_numpy(~labelled)
            cell_weight[free] = _below_quantile(cell[free])
            subcell_mask[free] = _below_quantile(distances[free])
        # The cell's rule on its largest sub-cell distance (the runtime's), and 16 times the
        # labels to say where inside a cell the change is.
        loss = F.binary_cross_entropy_with_logits(head(cell), torch.from_numpy(y),
                                                  weight=cell_weight)
        loss = loss + subcell_weight * F.binary_cross_entropy_with_logits(
            subcell_head(distances), (fraction > SUBCELL_POSITIVE).float(),
            weight=subcell_mask)
        # Keeps latents small and centred: the store's int8 step is set by their magnitude.
        loss = loss + 1e-3 * (z ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        running += float(loss.detach())
        if step % log_every == 0:
            print(f"step {step} loss {running / log_every:.4f} a {float(head.a):.3f} "
                  f"b {float(head.b):.3f} {time.perf_counter() - started:.0f}s", flush=True)
            running = 0.0
        if validate and (step % val_every == 0 or step == steps):
            score = validation_auprc(model, validation)
            history.append({"step": step, "validation_auprc": round(score, 4)})
            print(f"step {step} validation AUPRC {score:.4f}", flush=True)
            if score > best[0]:
                best = (score, step, copy.deepcopy(model.state_dict()))
            model.train()
    if validate and not keep_last:
        model.load_state_dict(best[2])
    model.eval()
    info = calibrate(model, cities, validation or cities)
    info["subcells"] = SUBCELLS
    info.update({"bands": bands, "steps": steps, "best_step": best[1],
                 "validation_auprc": best[0], "validation_history": history,
                 "batch": batch, "crop": crop, "lr": lr, "self_pairs": self_pairs,
                 "pasted": pasted, "subcell_weight": subcell_weight, "temporal": temporal,
                 "ignore_bands": list(ignore_bands),
                 "shift": np.round(np.atleast_1d(shift), 3).tolist(),
                 "seed": seed, "train_seconds": round(time.perf_counter() - started, 1),
                 "training_cities": names,
                 "validation_cities": [c.name for c in validation], "heldout_cities":
                 list(dataset.HELDOUT)})
    return model, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bands", type=int, default=13, choices=(13, 4))
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--self-pairs", type=float, default=0.0,
                        help="share of pairs that are one image against itself (unchanged)")
    parser.add_argument("--validate", nargs="?", const=dataset.VALIDATION[0], default=None,
                        metavar="CITY",
                        help="leave this training city (default aguasclaras) out of training "
                             "and score it as training goes")
    parser.add_argument("--subcell-weight", type=float, default=1.0,
                        help="weight of the loss on each 8 x 8 px sub-cell's distance")
    parser.add_argument("--pasted", type=float, default=0.0,
                        help="share of self pairs with pasted ground (synthetic change)")
    parser.add_argument("--temporal", type=float, default=0.0,
                        help="share of pairs that are both real dates of an unlabelled city, "
                             "trained on as mostly unchanged")
    parser.add_argument("--real-shift", action="store_true",
                        help="per-band offsets as large as the training pairs' real ones")
    parser.add_argument("--ignore-bands", default="", metavar="B01,B09,...",
                        help="input bands the encoder multiplies by zero (never reads)")
    parser.add_argument("--keep-last", action="store_true",
                        help="with --validate, keep the last step's weights, not the best")
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--out", type=Path, default=None, help="folder (default: beside here)")
    args = parser.parse_args(argv)
    model, info = train(args.bands, args.data, args.steps, args.batch, args.crop, args.lr,
                        args.seed, self_pairs=args.self_pairs, pasted=args.pasted,
                        subcell_weight=args.subcell_weight, validate=args.validate,
                        keep_last=args.keep_last, temporal=args.temporal,
                        real_shift=args.real_shift,
                        ignore_bands=tuple(b for b in args.ignore_bands.split(",") if b))
    out = args.out or HERE
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / weights_path(args.bands).name)
    (out / calibration_path(args.bands).name).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
