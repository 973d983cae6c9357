"""Choose the cloud model's operating point on the inner validation rows and fold it into the head.

    python -m onboard.models.cloud.calibrate --bands 4 --tune-weights TUNE.pt \
        --weights weights_4band.pt --out weights_4band.pt

The mission metric is cloud BOA (mean of cloud and not-cloud producer's accuracy), which rewards
recall; cross-entropy training puts the argmax where the class weights leave it. An offset added
to the cloud logit moves the operating point. It is chosen on the UKIS rows a ``--tune-rows``
model never trained on (``train.py --tune-rows 96``: rows 224-319), never on the held-out rows:
the highest inner cloud BOA among offsets that cost at most ``--max-f1-loss`` of inner cloud F1.
The chosen offset is added to the bias of the final model's cloud output channel, so the
exported graph is unchanged (no extra operator).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onboard.models.cloud import dataset
from onboard.models.cloud.dataset import CLOUD
from onboard.models.cloud.metrics import scores

OFFSETS = tuple(round(0.1 * i, 1) for i in range(11))


def inner_logits(weights: Path, bands: int, tune_rows: int, root: Path | None) -> tuple:
    """Logits (3, rows, W) and labels (rows, W) of a tune model on its inner rows."""
    import torch

    from onboard.models.cloud.evaluate import _pad16
    from onboard.models.cloud.model import build

    model = build(bands)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    ukis = dataset.ukis_scene(root)
    padded, h, w = _pad16(ukis.image[:bands])
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded, np.float32))[None])[0]
    rows = slice(dataset.UKIS_HELDOUT_ROWS, dataset.UKIS_HELDOUT_ROWS + tune_rows)
    return logits[:, :h, :w].numpy()[:, rows], ukis.labels[rows]


def sweep(logits: np.ndarray, labels: np.ndarray,
          offsets: tuple[float, ...] = OFFSETS) -> list[dict[str, float]]:
    """Inner cloud BOA / F1 / recall / precision and shadow F1 for each cloud-logit offset."""
    rows = []
    for offset in offsets:
        shifted = logits.copy()
        shifted[CLOUD] += offset
        s = scores(shifted.argmax(0).astype(np.uint8), labels)
        rows.append({"offset": offset, **{k: float(s[k]) for k in (
            "cloud_boa", "cloud_f1", "cloud_recall", "cloud_precision", "shadow_f1")}})
    return rows


def choose(rows: list[dict[str, float]], max_f1_loss: float) -> dict[str, float]:
    """Highest cloud BOA among offsets within ``max_f1_loss`` of the zero offset's F1; the
    smaller offset on ties."""
    base = next(r for r in rows if r["offset"] == 0.0)
    allowed = [r for r in rows if r["cloud_f1"] >= base["cloud_f1"] - max_f1_loss]
    return max(allowed, key=lambda r: (r["cloud_boa"], -r["offset"]))


def fold_offset(state: dict, offset: float) -> dict:
    """The state dict with ``offset`` added to the cloud output's bias."""
    state = dict(state)
    bias = state["head.bias"].clone()
    bias[CLOUD] += offset
    state["head.bias"] = bias
    return state


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, choices=(4, 6), required=True)
    parser.add_argument("--tune-weights", type=Path, required=True,
                        help="a model trained with --tune-rows (its inner rows unseen)")
    parser.add_argument("--tune-rows", type=int, default=96)
    parser.add_argument("--weights", type=Path, required=True, help="the final model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-f1-loss", type=float, default=0.01)
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args(argv)

    logits, labels = inner_logits(args.tune_weights, args.bands, args.tune_rows, args.data)
    rows = sweep(logits, labels)
    print("| offset | cloud BOA | cloud F1 | recall | precision | shadow F1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['offset']:.1f} | {r['cloud_boa']:.4f} | {r['cloud_f1']:.4f} | "
              f"{r['cloud_recall']:.4f} | {r['cloud_precision']:.4f} | {r['shadow_f1']:.4f} |")
    chosen = choose(rows, args.max_f1_loss)
    print(f"chosen cloud-logit offset {chosen['offset']:.1f}", flush=True)
    state = torch.load(args.weights, weights_only=True)
    torch.save(fold_offset(state, chosen["offset"]), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
