"""Cloud and shadow metrics on label maps (numpy only, usable on any labelled scene).

Predictions and labels use 0 clear, 1 cloud, 2 shadow; labels may also hold 3 (clear or shadow,
for teacher labels without shadow) and 255 (ignored).
"""

from __future__ import annotations

import numpy as np

CLOUD, SHADOW, NOT_CLOUD, IGNORE = 1, 2, 3, 255


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(np.count_nonzero(~pred & ~truth))
    return tp, fp, fn, tn


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def binary_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """BOA (mean of producer's accuracy of the class and of the rest), F1, IoU for one class."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, fp, fn, tn = _counts(pred, truth)
    pa_pos, pa_neg = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "boa": float((pa_pos + pa_neg) / 2),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": pa_pos,
        "specificity": pa_neg,  # the producer's accuracy of "not the class"
        "pixels": tp + fp + fn + tn,
    }


def scores(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Cloud scores on every labelled pixel; shadow scores where the labels know shadow."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    valid = labels != IGNORE
    out = {f"cloud_{k}": v for k, v in binary_scores(pred[valid] == CLOUD,
                                                      labels[valid] == CLOUD).items()}
    exact = valid & (labels != NOT_CLOUD)
    if np.any(labels[exact] == SHADOW):
        shadow = binary_scores(pred[exact] == SHADOW, labels[exact] == SHADOW)
        out.update({f"shadow_{k}": v for k, v in shadow.items()})
    return out


def boa(outputs: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Cloud BOA over a list of batches; outputs are logits (N, 3, H, W) or class maps (N, H, W)."""
    preds, truths = [], []
    for out, lab in zip(outputs, labels, strict=True):
        out = np.asarray(out)
        pred = out.argmax(axis=1) if out.ndim == 4 else out
        lab = np.asarray(lab)
        valid = lab != IGNORE
        preds.append((pred == CLOUD)[valid])
        truths.append((lab == CLOUD)[valid])
    return binary_scores(np.concatenate(preds), np.concatenate(truths))["boa"]
