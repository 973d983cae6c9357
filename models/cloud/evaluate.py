"""Evaluate the cloud model against its peer on whole held-out scenes, in one run.

``python -m onboard.models.cloud.evaluate`` scores the SHIPPED bundles (``cloud-{4,6}band-
{fp32-ort,int8-ort,int8-ov}.onboard``, run by the flight runtime's engines: the numbers are
those of what flies, exported by ``onboard compile``) and ukis-csmask (its own pipeline, its
4- and 6-band L1C U-Nets) on the same pixels of scenes no model of ours trained on:

* ``ukis``: the whole UKIS Sentinel-2 test scene, human masks, ~30 m (versions 0.3 and 0.4
  train on none of it);
* ``ukis@60m``: the same scene averaged 2 x 2, a coarser sensor (labels by 75 % majority);
* ``ukis-landsat-like``: the same scene through a fixed, seeded band-response and calibration
  change (neighbouring bands mixed, gains and offsets per band), a proxy for another sensor;
* ``oscd-CITY-DATE``: the held-out OSCD dates at 30 m with ukis-csmask's 6-band labels: the
  teacher's own output (agreement, not truth; the 6-band peer is the teacher, so only its
  4-band model is compared there). These scenes hold almost no cloud, so they measure false
  cloud on bright cities and desert (not-cloud accuracy);
* ``oscd-CITY-DATE@10m``: the same dates at 10 m, the teacher's 30 m labels repeated.

Writes ``results.json``, ``results.md`` and ``heldout_masks.png`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.cloud import VERSIONS, dataset
from onboard.models.cloud.dataset import BANDS_6, IGNORE, LabelledScene
from onboard.models.cloud.metrics import scores

HERE = Path(__file__).resolve().parent
THREADS = 2
BUNDLE_KINDS = ("fp32-ort", "int8-ort", "int8-ov")


def _pad16(image: np.ndarray) -> tuple[np.ndarray, int, int]:
    h, w = image.shape[1:]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, ph), (0, pw)), mode="reflect")
    return image, h, w


def predict_torch(model: Any, image: np.ndarray) -> np.ndarray:
    """Class map (H, W) of a torch model for one (bands, H, W) reflectance image."""
    import torch

    padded, h, w = _pad16(image)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.ascontiguousarray(padded, np.float32))[None])
    return logits[0, :, :h, :w].argmax(0).numpy().astype(np.uint8)


def bundle_path(bands: int, kind: str) -> Path:
    return HERE / f"cloud-{bands}band-{kind}.onboard"


def open_bundle(path: Path, threads: int = THREADS) -> Any:
    """The flight engine a bundle carries (ONNX Runtime or OpenVINO), on CPU."""
    from onboard.runtime.bundle import Bundle
    from onboard.runtime.engines import open_engine

    engines = Bundle.open(path).manifest.engines
    backend = "onnxruntime" if "onnxruntime" in engines else next(iter(engines))
    return open_engine(path, backend, "cpu", threads=threads)


def predict_engine(engine: Any, image: np.ndarray) -> np.ndarray:
    """Class map (H, W) of a flight engine for one (bands, H, W) reflectance image, whole
    (the bundles take any height and width that is a multiple of 16)."""
    padded, h, w = _pad16(image)
    logits = engine.run(np.ascontiguousarray(padded[None], np.float32))
    return np.asarray(logits)[0, :, :h, :w].argmax(0).astype(np.uint8)


def predict_csmask(image: np.ndarray, bands: int) -> np.ndarray:
    """ukis-csmask's class map (0 clear, 1 cloud, 2 shadow, like ours), its L1C model."""
    from ukis_csmask.mask import CSmask

    hwc = np.ascontiguousarray(image[:bands].transpose(1, 2, 0), np.float32)
    mask = CSmask(hwc, band_order=list(BANDS_6[:bands]), product_level="l1c",
                  intra_op_num_threads=THREADS, inter_op_num_threads=1)
    return mask.csm[..., 0].astype(np.uint8)


def load_model(bands: int, weights: Path | None = None) -> Any:
    import torch

    from onboard.models.cloud.model import build
    from onboard.models.cloud.train import weights_path

    path = Path(weights or weights_path(bands))
    options = path.with_suffix(".json")  # train.py's record of non-default architectures
    model = build(bands, **(json.loads(options.read_text()) if options.exists() else {}))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def score_scene(pred: np.ndarray, scene: LabelledScene, rows: slice | None = None) -> dict:
    """Scores of a class map on ``scene`` (optionally on some rows only; bench/peers.py)."""
    labels = scene.labels if rows is None else scene.labels[rows]
    return scores(pred if rows is None else pred[rows], labels)


def landsat_like(scene: LabelledScene, seed: int = 7) -> LabelledScene:
    """``scene`` through one fixed draw of another band response and calibration: each band
    mixed 10 % with a neighbour, gains 0.9-1.1 and offsets up to 0.01 per band. Fixed before
    any model was scored on it; not one of the training draws (another generator)."""
    rng = np.random.default_rng(seed)
    x = scene.image
    bands = x.shape[0]
    mixed = np.empty_like(x)
    for b in range(bands):
        n = b + 1 if b + 1 < bands else b - 1
        mixed[b] = 0.9 * x[b] + 0.1 * x[n]
    gain = rng.uniform(0.9, 1.1, (bands, 1, 1)).astype(np.float32)
    offset = rng.uniform(-0.01, 0.01, (bands, 1, 1)).astype(np.float32)
    return LabelledScene(f"{scene.name}-landsat-like", mixed * gain + offset, scene.labels,
                         scene.gsd_m, scene.human)


def heldout_scenes(root: Path | None = None) -> list[LabelledScene]:
    """The UKIS rows, then the held-out OSCD dates at 30 m and at 10 m (the grid the gate and
    the bundled sample use: a model can hold at one and call bright roofs or hazy sea cloud at
    the other)."""
    ukis = dataset.ukis_scene(root)
    scenes = [ukis, dataset.degraded(ukis, 2), landsat_like(ukis)]
    for city in dataset.OSCD_HELDOUT:
        scenes += [dataset.heldout_oscd(city, date, root) for date in (1, 2)]
    for city in dataset.OSCD_HELDOUT:
        for date in (1, 2):
            fine = dataset.heldout_oscd(city, date, root, fine=True)
            scenes.append(replace(fine, name=f"{fine.name}@10m"))
    return scenes


def _rgb(image: np.ndarray) -> np.ndarray:
    rgb = image[[2, 1, 0]].transpose(1, 2, 0)
    return (np.clip(rgb / 0.35, 0, 1) ** 0.8 * 255).astype(np.uint8)


PALETTE = np.array([[30, 110, 50], [245, 245, 245], [120, 60, 170]], np.uint8)


def _colour(classes: np.ndarray) -> np.ndarray:
    out = np.zeros(classes.shape + (3,), np.uint8)
    known = classes < 3
    out[known] = PALETTE[classes[known]]
    return out


def mask_panel(image: np.ndarray, maps: list[np.ndarray], columns: int = 3) -> np.ndarray:
    """RGB then each class map (clear green, cloud white, shadow purple) in a grid, with
    4-pixel white gaps."""
    panels = [_rgb(image)] + [_colour(m) for m in maps]
    h, w = panels[0].shape[:2]
    while len(panels) % columns:
        panels.append(np.full((h, w, 3), 255, np.uint8))
    rows = []
    for i in range(0, len(panels), columns):
        parts: list[np.ndarray] = []
        for p in panels[i : i + columns]:
            parts += [p, np.full((h, 4, 3), 255, np.uint8)]
        rows += [np.concatenate(parts[:-1], axis=1)]
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def run(root: Path | None = None, out: Path = HERE, band_sets: tuple[int, ...] = (4, 6),
        kinds: tuple[str, ...] = BUNDLE_KINDS) -> dict:
    """Every shipped bundle and the peer on every held-out scene; writes the results."""
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    engines = {(b, k): open_bundle(bundle_path(b, k)) for b in band_sets for k in kinds}
    results: dict[str, Any] = {"scenes": {}}
    maps: dict[str, np.ndarray] = {}
    for scene in heldout_scenes(root):
        human = scene.human
        entry: dict[str, Any] = {
            "labels": "human masks" if human else "ukis-csmask 6-band (teacher: agreement)",
            "shape": list(scene.labels.shape), "gsd_m": scene.gsd_m,
            "labelled_pixels": int((scene.labels != IGNORE).sum()),
            "cloud_fraction": float((scene.labels == dataset.CLOUD).mean()), "models": {}}
        for b in band_sets:
            for k in kinds:
                pred = predict_engine(engines[(b, k)], scene.image[:b])
                entry["models"][f"ours-{b}band-{k}"] = scores(pred, scene.labels)
                if scene.name == "ukis" and k == "int8-ort":
                    maps[f"ours-{b}band"] = pred
            if human or b == 4:  # the 6-band peer made the OSCD labels
                pred = predict_csmask(scene.image, b)
                entry["models"][f"ukis-csmask-{b}band"] = scores(pred, scene.labels)
                if scene.name == "ukis":
                    maps[f"ukis-csmask-{b}band"] = pred
        results["scenes"][scene.name] = entry
        print(f"{scene.name} done", flush=True)
    for engine in engines.values():
        engine.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    from onboard.runtime.png import write_png

    ukis = dataset.ukis_scene(root)
    order = [f"{who}-{b}band" for b in sorted(band_sets, reverse=True)
             for who in ("ours", "ukis-csmask")]
    write_png(out / "heldout_masks.png",
              mask_panel(ukis.image, [ukis.labels] + [maps[k] for k in order]))
    return results


def compare_weights(weights: dict[str, Path], bands: int, root: Path | None = None
                    ) -> dict[str, dict[str, dict]]:
    """Torch fp32 scores of several trained weights (the levers) and the peer on every
    held-out scene: {scene: {name: scores}}."""
    models = {name: load_model(bands, path) for name, path in weights.items()}
    out: dict[str, dict[str, dict]] = {}
    for scene in heldout_scenes(root):
        row = {name: scores(predict_torch(m, scene.image[:bands]), scene.labels)
               for name, m in models.items()}
        if scene.human or bands == 4:
            row[f"ukis-csmask-{bands}band"] = scores(predict_csmask(scene.image, bands),
                                                     scene.labels)
        out[scene.name] = row
    return out


def labelled_npz(path: Path) -> LabelledScene:
    """A labelled scene from an .npz like the UKIS test file: ``img`` (H, W, 4 or 6) reflectance
    in BANDS_6 order and ``msk`` (H, W[, 1]) in UKIS coding (0 shadow, 1/3 clear, 4 cloud)."""
    from onboard.runtime.errors import SceneError

    data = np.load(path)
    if "img" not in data or "msk" not in data:
        raise SceneError(path, f"needs arrays 'img' and 'msk', has {sorted(data.files)}")
    img, msk = data["img"], data["msk"]
    msk = msk[..., 0] if msk.ndim == 3 else msk
    if img.ndim != 3 or img.shape[2] not in (4, 6) or img.shape[:2] != msk.shape:
        raise SceneError(path, f"img {img.shape} and msk {msk.shape} do not fit (H, W, 4|6)")
    image = np.ascontiguousarray(img.transpose(2, 0, 1), np.float32)
    return LabelledScene(Path(path).stem, image, dataset.ukis_labels(msk), 0.0, human=True)


def score_any(scene: LabelledScene, kind: str = "int8-ort") -> dict[str, dict]:
    """The shipped ``kind`` bundles and ukis-csmask on every labelled pixel of one scene, for
    each band set the scene has."""
    out = {}
    for b in (4, 6):
        if scene.image.shape[0] < b:
            continue
        engine = open_bundle(bundle_path(b, kind))
        try:
            out[f"ours-{b}band-{kind}"] = scores(predict_engine(engine, scene.image[:b]),
                                                 scene.labels)
        finally:
            engine.close()
        out[f"ukis-csmask-{b}band"] = scores(predict_csmask(scene.image, b), scene.labels)
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def markdown(results: dict) -> str:
    versions = ", ".join(f"{b}-band {v}" for b, v in VERSIONS.items())
    lines = [f"# Cloud models ({versions}): held-out results (whole scenes)", "",
             "Generated by `python -m onboard.models.cloud.evaluate` from the shipped bundles "
             "(flight engines) and ukis-csmask in the same run. BOA: balanced overall accuracy "
             "of the cloud class; not-cloud acc: share of not-cloud pixels called not cloud.", ""]
    for name, entry in results["scenes"].items():
        lines += [f"## {name}: {entry['labels']}, {entry['shape'][0]}x{entry['shape'][1]} px "
                  f"at {entry['gsd_m']:g} m, {entry['labelled_pixels']} labelled, "
                  f"{entry['cloud_fraction']:.1%} cloud", "",
                  "| model | cloud BOA | cloud F1 | recall | precision | not-cloud acc | "
                  "shadow F1 |", "|---|---|---|---|---|---|---|"]
        for model, s in entry["models"].items():
            lines.append(f"| {model} | {_fmt(s['cloud_boa'])} | {_fmt(s['cloud_f1'])} | "
                         f"{_fmt(s['cloud_recall'])} | {_fmt(s['cloud_precision'])} | "
                         f"{_fmt(s['cloud_specificity'])} | {_fmt(s.get('shadow_f1'))} |")
        lines.append("")
    lines += ["`heldout_masks.png` (the whole UKIS scene), left to right and top to bottom: RGB, "
              "reference, ours 6-band INT8 (ORT), ukis-csmask 6-band, ours 4-band INT8 (ORT), "
              "ukis-csmask 4-band (clear green, cloud white, shadow purple).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="ONBOARD_DATA folder")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--bands", type=int, nargs="+", choices=(4, 6), default=[4, 6])
    parser.add_argument("--scene", type=Path, default=None,
                        help="score one labelled .npz (img, msk as in the UKIS file) and stop")
    parser.add_argument("--weights", nargs="+", metavar="NAME=PATH", default=None,
                        help="compare these torch weights (one band set, --bands) and stop")
    args = parser.parse_args(argv)
    if args.weights:
        pairs = dict(w.split("=", 1) for w in args.weights)
        table = compare_weights({k: Path(v) for k, v in pairs.items()}, args.bands[0],
                                args.data)
        for scene, row in table.items():
            for name, s in row.items():
                print(f"| {scene} | {name} | {s['cloud_boa']:.4f} | {s['cloud_f1']:.4f} | "
                      f"{s['cloud_recall']:.4f} | {s['cloud_specificity']:.4f} |")
        return 0
    if args.scene is not None:
        for name, s in score_any(labelled_npz(args.scene)).items():
            print(name, json.dumps({k: round(v, 4) for k, v in s.items()}))
        return 0
    results = run(args.data, args.out, band_sets=tuple(args.bands))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
