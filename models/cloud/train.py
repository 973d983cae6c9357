"""Train the cloud model: ``python -m onboard.models.cloud.train --bands 4|6``.

Version 0.3 on (distillation, the only recipe): ukis-csmask teacher labels (clear, cloud,
shadow) on the 13-band scene and the training OSCD cities; no human-labelled pixel (UKIS is held
out whole, and :class:`dataset.TileSampler` refuses it). 4-band 0.4 takes the teacher's argmax
everywhere (``--confidence 0``, now the default; 0.3 kept only pixels it was 0.6 sure of),
otherwise 0.3's recipe (``--augment gain --steps 600``). ``--synthetic P`` composites synthetic
clouds onto clear tiles (measured, not shipped: card.md). Teacher labels saying only cloud / not
cloud use the likelihood of "clear or shadow" (the two classes' probabilities summed).

Version 0.2's recipe (``--recipe human``: UKIS training rows and s2cloudless labels mixed 3
tiles to 1; ``--tune-rows`` and ``calibrate.py`` for its operating point on further UKIS rows)
was removed once the UKIS scene became a whole held-out test scene; it is in commit 6ac93e9.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from onboard.models.cloud import dataset
from onboard.models.cloud.dataset import CLEAR, CLOUD, IGNORE, NOT_CLOUD, SHADOW
from onboard.models.cloud.model import build, count_parameters

HERE = Path(__file__).resolve().parent
# Shadow is rare (about 10 % of the human pixels) and only labelled in one scene.
CLASS_WEIGHTS = {CLEAR: 1.0, CLOUD: 2.5, SHADOW: 2.0, NOT_CLOUD: 1.0}


def weights_path(bands: int) -> Path:
    return HERE / f"weights_{bands}band.pt"


def loss(logits: torch.Tensor, labels: torch.Tensor,
         class_weights: dict[int, float] | None = None) -> torch.Tensor:
    """Cross-entropy over 0 clear / 1 cloud / 2 shadow, with 3 = "clear or shadow", 255 ignored."""
    class_weights = CLASS_WEIGHTS if class_weights is None else class_weights
    labels = torch.as_tensor(labels, device=logits.device).long()
    logp = F.log_softmax(logits.float(), dim=1)
    exact = labels.clamp(max=SHADOW)
    nll = -logp.gather(1, exact[:, None])[:, 0]
    not_cloud = -torch.logaddexp(logp[:, CLEAR], logp[:, SHADOW])
    nll = torch.where(labels == NOT_CLOUD, not_cloud, nll)
    return _weighted_mean(nll, labels, class_weights)


def _weighted_mean(nll: torch.Tensor, labels: torch.Tensor,
                   class_weights: dict[int, float]) -> torch.Tensor:
    """``nll`` averaged with each pixel weighted by its label's class weight; 255 weighs 0."""
    weight = torch.zeros_like(nll)
    for value, w in class_weights.items():
        weight = torch.where(labels == value, torch.full_like(nll, w), weight)
    weight = torch.where(labels == IGNORE, torch.zeros_like(nll), weight)
    return (nll * weight).sum() / weight.sum().clamp(min=1.0)


def soft_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
              class_weights: dict[int, float] | None = None) -> torch.Tensor:
    """Cross-entropy against the teacher's probabilities ``targets`` (N, 3, H, W), each pixel
    weighted as its hard label (the teacher's argmax) is in :func:`loss`; 255 ignored."""
    class_weights = CLASS_WEIGHTS if class_weights is None else class_weights
    labels = torch.as_tensor(labels, device=logits.device).long()
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -(targets.to(logp) * logp).sum(1)
    return _weighted_mean(nll, labels, class_weights)


def train(bands: int, steps: int, batch: int, tile: int, lr: float, seed: int,
          root: Path | None, out: Path, log_every: int = 50, cloud_weight: float | None = None,
          threads: int = 1, upsample: str = "nearest", width: int = 24, pixel_kernel: int = 1,
          augment: str = "sensor-nohaze", s2cloudless: str | None = None,
          synthetic_p: float = 0.0, cloud_alpha: float = 0.35,
          confidence: float = dataset.DISTILL_CONFIDENCE, pixel_sizes: bool = True,
          finer: tuple[int, ...] = (), soft: bool = False, cloudy_share: float = 0.5,
          normalise: str = "none") -> torch.nn.Module:
    """Train and save a state_dict to ``out``.

    Distillation (version 0.3 on): ukis-csmask teacher labels on the 13-band scene and the
    training OSCD cities, no human-labelled pixel (UKIS is held out whole). ``augment``
    "sensor" adds :class:`dataset.SensorAugment`; "gain" keeps 0.2's random gains only;
    "gain-haze" adds haze alone to them (clear tiles under a veil stay labelled clear).
    ``s2cloudless`` (a mode of :func:`dataset.with_s2cloudless`) adds s2cloudless as a second
    teacher. ``soft``: the teacher's probabilities as targets (:func:`soft_loss`), not its
    argmax.
    ``synthetic_p`` > 0 composites synthetic clouds and shadows (:mod:`synthetic`, spectra from
    the 13-band scene's thick clouds) onto that share of the tiles drawn from clear scenes.
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    scenes = dataset.distillation_scenes(root, confidence)
    fine = dataset.fine_images(root)
    if s2cloudless:
        scenes = dataset.with_s2cloudless(scenes, s2cloudless, root)
    aug = {"sensor": dataset.SensorAugment(), "sensor-nohaze": dataset.SensorAugment(haze_p=0.0),
           "gain": dataset.SensorAugment.none(),
           "gain-haze": replace(dataset.SensorAugment.none(), haze_p=0.3, haze_max=0.12)}[augment]
    weights = dict(CLASS_WEIGHTS)
    if cloud_weight is not None:
        weights[CLOUD] = cloud_weight
    clouds = None
    if synthetic_p > 0:
        from onboard.models.cloud.synthetic import SyntheticClouds

        clouds = SyntheticClouds.from_scene(dataset.s2cloudless_distilled(root), seed=seed,
                                            cloud_alpha=cloud_alpha)
    sampler = dataset.TileSampler(scenes, bands, tile=tile, seed=seed, augment=aug, fine=fine,
                                  synthetic=clouds, synthetic_p=synthetic_p,
                                  pixel_sizes=pixel_sizes, finer=finer,
                                  cloudy_share=cloudy_share)
    print(f"data: {len(sampler.teacher)} teacher scenes ({time.perf_counter() - t0:.0f} s)",
          flush=True)
    stats: dict[str, list[float] | None] = {"input_mean": None, "input_std": None}
    if normalise == "dataset":  # the training tiles' own statistics, as the peer does
        x = np.concatenate([sampler.batch(64)[0] for _ in range(4)])
        stats = {"input_mean": x.mean(axis=(0, 2, 3)).tolist(),
                 "input_std": x.std(axis=(0, 2, 3)).tolist()}
        sampler.rng = np.random.default_rng(seed)
    model = build(bands, upsample=upsample, width=width, pixel_kernel=pixel_kernel, **stats)
    print(f"model: {count_parameters(model)} parameters, {bands} bands", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.05)
    model.train()
    running = 0.0
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        if soft:
            x, y, p = sampler.soft_batch(batch)
            logits = model(torch.from_numpy(x))
            value = soft_loss(logits, torch.from_numpy(y), torch.from_numpy(p), weights)
        else:
            x, y = sampler.batch(batch)
            logits = model(torch.from_numpy(x))
            value = loss(logits, torch.from_numpy(y), weights)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        running += float(value.detach())
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - t1
            print(f"step {step}/{steps} loss {running / log_every:.4f} "
                  f"{elapsed:.0f} s (eta {elapsed / step * (steps - step):.0f} s)", flush=True)
            running = 0.0
    model.eval()
    torch.save(model.state_dict(), out)
    # What the weights need to be rebuilt (evaluate.load_model): the architecture's options.
    out.with_suffix(".json").write_text(json.dumps({"upsample": upsample, "width": width,
                                                     "pixel_kernel": pixel_kernel, **stats}) + "\n")
    print(f"saved {out} after {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bands", type=int, choices=(4, 6), required=True)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=None, help="ONBOARD_DATA folder")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cloud-weight", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--augment", choices=("sensor", "sensor-nohaze", "gain", "gain-haze"),
                        default="sensor-nohaze")
    parser.add_argument("--s2cloudless", choices=dataset.S2CLOUDLESS_MODES, default=None,
                        help="s2cloudless as a second teacher: agree-13band / agree (ignore "
                             "pixels where the two disagree), union (cloud where either says so)")
    parser.add_argument("--synthetic", type=float, default=0.0, metavar="P",
                        help="composite synthetic clouds onto this share of the clear tiles")
    parser.add_argument("--cloud-alpha", type=float, default=0.35,
                        help="synthetic cloud opacity from which a pixel is labelled cloud")
    parser.add_argument("--confidence", type=float, default=dataset.DISTILL_CONFIDENCE,
                        help="teacher labels where ukis-csmask is at least this sure")
    parser.add_argument("--upsample", choices=("nearest", "bilinear"), default="nearest",
                        help="the context's last 4x resize (bilinear: the first weights)")
    parser.add_argument("--one-pixel-size", action="store_true",
                        help="each teacher scene at its own pixel size only (no 10/20/60 m "
                             "views): a lever measured on its own")
    parser.add_argument("--width", type=int, default=24,
                        help="channels at full and 1/4 resolution (x1.5 at 1/8, x2 at 1/16)")
    parser.add_argument("--finer", type=int, nargs="*", default=[],
                        help="also see the 73 m cloudy scene this many times finer (e.g. 2 3: "
                             "about 37 and 24 m), its labels repeated")
    parser.add_argument("--cloudy-share", type=float, default=0.5,
                        help="share of the tiles drawn from scenes with cloud (the rest clear)")
    parser.add_argument("--normalise", choices=("none", "dataset"), default="none",
                        help="dataset: z-score the input with the training tiles' mean and "
                             "std (a lever measured; the shipped models take reflectance)")
    parser.add_argument("--soft", action="store_true",
                        help="soft distillation: the teacher's probabilities as targets")
    parser.add_argument("--pixel-kernel", type=int, choices=(1, 3), default=1,
                        help="the full-resolution path's first convolution: 1 x 1, or 3 x 3 "
                             "(each pixel with its neighbours)")
    args = parser.parse_args(argv)
    out = args.out or weights_path(args.bands)
    train(args.bands, args.steps, args.batch, args.tile, args.lr, args.seed, args.data, out,
          cloud_weight=args.cloud_weight, threads=args.threads, upsample=args.upsample,
          width=args.width, pixel_kernel=args.pixel_kernel, augment=args.augment,
          s2cloudless=args.s2cloudless, synthetic_p=args.synthetic,
          cloud_alpha=args.cloud_alpha, confidence=args.confidence,
          pixel_sizes=not args.one_pixel_size, finer=tuple(args.finer),
          soft=args.soft, cloudy_share=args.cloudy_share, normalise=args.normalise)
    # No held-out score here: the held-out scenes are scored once, by evaluate.py.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
