"""Evaluate the cloud model against its peers on the same pixels, in one run.

``python -m onboard.models.cloud.evaluate`` scores, on the held-out split (see ``dataset``):

* human masks (UKIS rows [0, 224)): ours (4 and 6 bands, fp32 ONNX via ONNX Runtime) and
  ukis-csmask (its 4- and 6-band L1C U-Nets); s2cloudless cannot run there (6 bands only);
* teacher labels (13-band scene rows [512, 856), held-out OSCD cities at 10 m): agreement of ours
  and ukis-csmask with s2cloudless;
* throughput (Mpx/s, 2 threads) of each model, measured in the same run.

Every model sees the whole scene (so context is the same for all) and is scored on the same
pixels. Writes ``results.json``, ``results.md`` and ``heldout_masks.png`` next to this file.
The functions (``predict_onnx``, ``predict_csmask``, ``predict_s2cloudless``, ``score_scene``)
work on any labelled scene.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.cloud import dataset
from onboard.models.cloud.dataset import BANDS_6, IGNORE, LabelledScene
from onboard.models.cloud.metrics import scores

HERE = Path(__file__).resolve().parent
THREADS = 2
# Sanity limits so that the fixed-size peers are not fed a degenerate scene.
MIN_PEER_SIZE = 256


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


def onnx_session(path: str | Path, threads: int = THREADS) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session: Any, image: np.ndarray) -> np.ndarray:
    """Class map (H, W) of our ONNX model for one (bands, H, W) reflectance image."""
    padded, h, w = _pad16(image)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: np.ascontiguousarray(padded[None], np.float32)})[0]
    return logits[0, :, :h, :w].argmax(0).astype(np.uint8)


def predict_csmask(image: np.ndarray, bands: int) -> np.ndarray:
    """ukis-csmask's class map (0 clear, 1 cloud, 2 shadow, like ours), its L1C model."""
    from ukis_csmask.mask import CSmask

    hwc = np.ascontiguousarray(image[:bands].transpose(1, 2, 0), np.float32)
    mask = CSmask(hwc, band_order=list(BANDS_6[:bands]), product_level="l1c",
                  intra_op_num_threads=THREADS, inter_op_num_threads=1)
    return mask.csm[..., 0].astype(np.uint8)


def predict_s2cloudless(s2c_bands: np.ndarray) -> np.ndarray:
    """s2cloudless's default mask as a class map (1 cloud, 0 clear) from (H, W, 10) bands."""
    return dataset.teacher_labels(s2c_bands)


def throughput(fn: Any, pixels: int, repeat: int = 3) -> float:
    """Best-of-``repeat`` Mpx/s of ``fn()`` (one warm-up call first)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return pixels / best / 1e6


def load_model(bands: int, weights: Path | None = None) -> Any:
    import torch

    from onboard.models.cloud.model import build
    from onboard.models.cloud.train import weights_path

    model = build(bands)
    model.load_state_dict(torch.load(weights or weights_path(bands), weights_only=True))
    return model.eval()


def _export(bands: int, folder: Path) -> Path:
    from onboard.models.cloud.model import export_onnx

    path = folder / f"cloud_{bands}band.onnx"
    export_onnx(load_model(bands), str(path), bands)
    return path


def score_scene(pred: np.ndarray, scene: LabelledScene, rows: slice | None = None) -> dict:
    labels = scene.labels if rows is None else scene.labels[rows]
    pred = pred if rows is None else pred[rows]
    return scores(pred, labels)


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


def run(root: Path | None = None, out: Path = HERE, teacher: bool = True,
        band_sets: tuple[int, ...] = (4, 6)) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    ukis = dataset.ukis_scene(root)
    held = slice(0, dataset.UKIS_HELDOUT_ROWS)
    results: dict[str, Any] = {
        "heldout_human": {"scene": "UKIS Sentinel-2 6-band, rows 0-223 of 512 (x all 512 columns)",
                          "pixels": int((ukis.labels[held] != IGNORE).sum()), "models": {}},
        "heldout_teacher": {"scenes": [], "models": {}},
        "throughput_mpx_s": {},
    }
    maps: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {b: onnx_session(_export(b, Path(tmp))) for b in band_sets}
        for b in band_sets:
            pred = predict_onnx(sessions[b], ukis.image[:b])
            maps[f"ours-{b}band"] = pred
            results["heldout_human"]["models"][f"ours-{b}band"] = score_scene(pred, ukis, held)
            pred = predict_csmask(ukis.image, b)
            maps[f"ukis-csmask-{b}band"] = pred
            results["heldout_human"]["models"][f"ukis-csmask-{b}band"] = score_scene(
                pred, ukis, held)
            print(f"human {b} bands done", flush=True)

        # Throughput on the UKIS scene (512 x 512) at 2 threads, plus ours on 256-pixel tiles.
        tp = results["throughput_mpx_s"]
        for b in band_sets:
            s = sessions[b]
            tile = np.ascontiguousarray(ukis.image[:b, :256, :256][None])
            name = s.get_inputs()[0].name
            tp[f"ours-{b}band (fp32 ORT, 256x256 tiles)"] = throughput(
                lambda s=s, t=tile, n=name: s.run(None, {n: t}), 256 * 256, repeat=10)
            tp[f"ours-{b}band (fp32 ORT, 512x512 scene, with argmax)"] = throughput(
                lambda s=s, b=b: predict_onnx(s, ukis.image[:b]), 512 * 512, repeat=5)
            tp[f"ukis-csmask-{b}band (512x512 scene)"] = throughput(
                lambda b=b: predict_csmask(ukis.image, b), 512 * 512, repeat=1)
        s2c = dataset.s2cloudless_scene(root)
        assert s2c.s2c_bands is not None
        crop = s2c.s2c_bands[:512]
        tp["s2cloudless (512x512 of the 13-band scene)"] = throughput(
            lambda: predict_s2cloudless(crop), 512 * 512, repeat=1)
        print("throughput done", flush=True)

        if teacher:
            totals: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
            for scene in dataset.heldout_teacher(root):
                results["heldout_teacher"]["scenes"].append(
                    {"name": scene.name, "shape": list(scene.labels.shape),
                     "cloud_fraction": float((scene.labels == 1).mean())})
                for b in band_sets:
                    preds = {f"ours-{b}band": predict_onnx(sessions[b], scene.image[:b])}
                    if min(scene.labels.shape) >= MIN_PEER_SIZE:
                        preds[f"ukis-csmask-{b}band"] = predict_csmask(scene.image, b)
                    for name, pred in preds.items():
                        valid = scene.labels != IGNORE
                        totals.setdefault(name, []).append((pred[valid], scene.labels[valid]))
                print(f"teacher {scene.name} done", flush=True)
            for name, pairs in totals.items():
                pred = np.concatenate([p for p, _ in pairs])
                lab = np.concatenate([t for _, t in pairs])
                results["heldout_teacher"]["models"][name] = scores(pred, lab)

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    from onboard.runtime.png import write_png

    order = [f"{who}-{b}band" for b in sorted(band_sets, reverse=True)
             for who in ("ours", "ukis-csmask")]
    panel = mask_panel(ukis.image[:, held], [ukis.labels[held]] + [maps[k][held] for k in order])
    write_png(out / "heldout_masks.png", panel)
    return results


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
    labels = np.full(msk.shape, IGNORE, np.uint8)
    labels[(msk == 1) | (msk == 3)] = 0
    labels[msk == 4] = 1
    labels[msk == 0] = 2
    image = np.ascontiguousarray(img.transpose(2, 0, 1), np.float32)
    return LabelledScene(Path(path).stem, image, labels, 0.0, human=True)


def score_any(scene: LabelledScene) -> dict[str, dict]:
    """Ours (torch) and ukis-csmask (when the scene is at least 256 pixels) on every labelled
    pixel of one scene, for each band set the scene has."""
    out = {}
    for b in (4, 6):
        if scene.image.shape[0] < b:
            continue
        out[f"ours-{b}band"] = scores(predict_torch(load_model(b), scene.image[:b]), scene.labels)
        if min(scene.labels.shape) >= MIN_PEER_SIZE:
            out[f"ukis-csmask-{b}band"] = scores(predict_csmask(scene.image, b), scene.labels)
    return out


def _fmt(value: float) -> str:
    return "–" if value is None or value != value else f"{value:.3f}"


def markdown(results: dict) -> str:
    lines = ["# Cloud model: held-out results", ""]
    human = results["heldout_human"]
    lines += [f"## Human masks: {human['scene']}, {human['pixels']} pixels", "",
              "| model | cloud BOA | cloud F1 | cloud IoU | shadow F1 | shadow IoU |",
              "|---|---|---|---|---|---|"]
    for name, s in human["models"].items():
        lines.append(f"| {name} | {_fmt(s['cloud_boa'])} | {_fmt(s['cloud_f1'])} | "
                     f"{_fmt(s['cloud_iou'])} | {_fmt(s.get('shadow_f1'))} | "
                     f"{_fmt(s.get('shadow_iou'))} |")
    lines += ["", "s2cloudless cannot run on this scene (it needs 10 Sentinel-2 bands).", ""]
    teacher = results["heldout_teacher"]
    if teacher["models"]:
        names = ", ".join(s["name"] for s in teacher["scenes"])
        lines += ["## Agreement with s2cloudless (teacher labels, cloud only)", "",
                  f"Scenes: {names}. Labels: s2cloudless probability averaged over a 40 m disk, "
                  "cloud >= 0.5, not cloud < 0.3, in between ignored "
                  "(`dataset.labels_from_probability`).", "",
                  "| model | cloud BOA | cloud F1 | cloud IoU | pixels |", "|---|---|---|---|---|"]
        for name, s in teacher["models"].items():
            lines.append(f"| {name} | {_fmt(s['cloud_boa'])} | {_fmt(s['cloud_f1'])} | "
                         f"{_fmt(s['cloud_iou'])} | {s['cloud_pixels']} |")
        lines.append("")
    lines += ["## Throughput (2 threads, this machine, same run)", "", "| model | Mpx/s |",
              "|---|---|"]
    for name, v in results["throughput_mpx_s"].items():
        lines.append(f"| {name} | {v:.2f} |")
    lines += ["", "`heldout_masks.png` (held-out rows), left to right and top to bottom: RGB, "
              "reference, ours 6-band, ukis-csmask 6-band, ours 4-band, ukis-csmask 4-band "
              "(clear green, cloud white, shadow purple).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="ONBOARD_DATA folder")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--no-teacher", action="store_true",
                        help="skip the agreement with s2cloudless on held-out OSCD cities")
    parser.add_argument("--bands", type=int, nargs="+", choices=(4, 6), default=[4, 6])
    parser.add_argument("--scene", type=Path, default=None,
                        help="score one labelled .npz (img, msk as in the UKIS file) and stop")
    args = parser.parse_args(argv)
    if args.scene is not None:
        for name, s in score_any(labelled_npz(args.scene)).items():
            print(name, json.dumps({k: round(v, 4) for k, v in s.items()}))
        return 0
    results = run(args.data, args.out, teacher=not args.no_teacher, band_sets=tuple(args.bands))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
