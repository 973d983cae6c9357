"""Cell-level change metrics (numpy only): AUPRC, the pixel baselines, and the gate's metric."""

from __future__ import annotations

import numpy as np

from onboard.models.change.scoring import CELL, cell_distance, dequantise, quantise


def auprc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (the step-wise sum
    ``sum (R_n - R_{n-1}) P_n`` over thresholds, ties grouped; scikit-learn's definition)."""
    scores = np.asarray(scores, np.float64).ravel()
    truth = np.asarray(truth, bool).ravel()
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], truth[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # The last index of every run of equal scores: one threshold per distinct score.
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def cells(x: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H/32, W/32, C*32*32): each cell's raw pixels as one vector."""
    c, h, w = x.shape
    v = x[:, : h // CELL * CELL, : w // CELL * CELL].reshape(c, h // CELL, CELL, w // CELL, CELL)
    return v.transpose(1, 3, 0, 2, 4).reshape(h // CELL, w // CELL, -1)


def pixel_baselines(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """RaVAEn's pixel baselines per cell, on reflectance (DN x 1e-4): the cosine distance and
    the RMSE between the two dates' raw cell pixels."""
    a = cells(np.asarray(before, np.float64) * 1e-4)
    b = cells(np.asarray(after, np.float64) * 1e-4)
    cos = cell_distance(a, b, "cosine", axis=-1)
    rmse = np.sqrt(((a - b) ** 2).mean(-1))
    return {"cosine": cos.astype(np.float32), "rmse": rmse.astype(np.float32)}


def latent_distances(latents: np.ndarray, distance: str = "l2",
                     latent_scale: float | None = None, subcells: int = 1) -> np.ndarray:
    """A gate batch's output (2T, D, h, w), date 1 windows then date 2 -> (T, h, w) distances,
    through the store's int8 codes when ``latent_scale`` is given."""
    z = np.asarray(latents, np.float32)
    if latent_scale is not None:
        z = dequantise(quantise(z, latent_scale), latent_scale)
    t = z.shape[0] // 2
    return cell_distance(z[:t], z[t:], distance, axis=1, subcells=subcells)


def pooled_auprc(outputs: list[np.ndarray], labels: list[np.ndarray], distance: str = "l2",
                 latent_scale: float | None = None, subcells: int = 1) -> float:
    """The gate metric: AUPRC over every labelled cell of every batch (city) at once."""
    scores, truth = [], []
    for out, y in zip(outputs, labels, strict=True):
        d = latent_distances(out, distance, latent_scale, subcells)
        y = np.asarray(y)
        keep = y >= 0
        scores.append(d[keep])
        truth.append(y[keep] == 1)
    return auprc(np.concatenate(scores), np.concatenate(truth))
