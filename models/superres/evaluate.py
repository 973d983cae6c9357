"""Held-out evaluation of both super-resolution models against the classical baselines, all
measured in this one run: ``python -m onboard.models.superres.evaluate``.

Wald's protocol on the held-out scenes (``dataset.HELDOUT``), whole: ×2 from the 10 m bands
averaged to 20 m, truth the 10 m bands; sharpening one scale down, truth the original 20 m
bands. PSNR (peak 10000 DN) and SSIM per band for bicubic and Lanczos (PIL on float32 planes),
high-pass detail injection (sharpening), the fp32 torch model and the shipped bundles as the
flight runtime runs them (ONNX Runtime, fp32 golden and INT8); SAM for the sharpened bands;
the ×2 model band-wise on the WorldView pan crops (peak 2047); throughput in Mpx/s of input and
of output. Writes ``results.json``, ``results.md``, ``heldout_crops.png`` and ``seams.png``
(``--seams-only``: just the seams figure, the rest untouched).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onboard.models.data import default_data_root
from onboard.models.superres import HERE, TILES, dataset, metrics
from onboard.models.superres.model import Sharpen20, build_sharpen, build_x2, count_parameters
from onboard.models.superres.train import WEIGHTS

PAN_PEAK = 2047.0
# The pan crops (11-bit DN) enter the ×2 model as reflectance-like values of the same order as
# Sentinel-2's: DN / 2047 * PAN_GAIN.
PAN_GAIN = 0.5


def bundle_path(task: str, precision: str) -> Path:
    return HERE / f"superres-{task}-{precision}-ort.onboard"


# The version before the shipped one, whose weights are kept so that each run measures what
# the new version bought.
PREVIOUS = {"x2": "0.1", "sharpen": "0.2"}


def previous_weights(task: str) -> Path:
    return HERE / f"weights_{task}_{PREVIOUS[task]}.pt"


def previous_way(task: str) -> str:
    """How the previous version is named among the ways a model is run (``torch_0.2``)."""
    return f"torch_{PREVIOUS[task]}"


def load_model(task: str, previous: bool = False) -> torch.nn.Module:
    if task == "x2":
        model: torch.nn.Module = build_x2()
    else:
        # 0.2: the guided model on a 3 x 3 mean skip.
        model = Sharpen20(skip="smooth3") if previous else build_sharpen()
    path = previous_weights(task) if previous else WEIGHTS[task]
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


class Runners:
    """The ways each model is run here: torch fp32 and the flight runtime's bundles."""

    def __init__(self, task: str, threads: int) -> None:
        from onboard.runtime.engines import open_engine

        self.task = task
        self.model = load_model(task)
        self.previous = load_model(task, previous=True) if previous_weights(task).exists() \
            else None
        self.engines: dict[str, Any] = {}
        for precision in ("fp32", "int8"):
            path = bundle_path(task, precision)
            if path.exists():
                self.engines[precision] = open_engine(path, "onnxruntime", "cpu",
                                                      threads=threads)

    def run(self, how: str, x: np.ndarray) -> np.ndarray:
        """Reflectance (N, C, H, W) in, out."""
        if how in ("torch", previous_way(self.task)):
            model = self.model if how == "torch" else self.previous
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
        return self.engines[how].run(np.ascontiguousarray(x, np.float32))

    @property
    def ways(self) -> list[str]:
        return ["torch", *([previous_way(self.task)] if self.previous is not None else []),
                *self.engines]


def _band_table(estimate: np.ndarray, truth: np.ndarray, peak: float) -> dict[str, Any]:
    p = metrics.psnr_bands(estimate, truth, peak)
    s = metrics.ssim_bands(estimate, truth, peak)
    return {"psnr": [round(v, 3) for v in p], "ssim": [round(v, 5) for v in s],
            "psnr_mean": round(float(np.mean(p)), 3), "ssim_mean": round(float(np.mean(s)), 5)}


def evaluate_x2(scenes: list[dataset.Scene], runners: Runners) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scene in scenes:
        x, truth = dataset.x2_pair(scene)
        methods = {"bicubic": metrics.resize(x, 2), "lanczos": metrics.resize(x, 2, "lanczos")}
        for how in runners.ways:
            methods[f"model_{how}"] = runners.run(how, x[None] * dataset.DN_SCALE)[0] / \
                dataset.DN_SCALE
        out[scene.name] = {m: _band_table(v, truth, dataset.PEAK_DN) for m, v in methods.items()}
    return out


def evaluate_sharpen(scenes: list[dataset.Scene], runners: Runners) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scene in scenes:
        x, truth = dataset.sharpen_pair(scene)
        coarse = dataset.area_down(truth)
        methods = {"bicubic": metrics.resize(coarse, 2),
                   "lanczos": metrics.resize(coarse, 2, "lanczos"),
                   "detail_injection": metrics.detail_injection(coarse, x[:4])}
        for how in runners.ways:
            methods[f"model_{how}"] = runners.run(how, x[None] * dataset.DN_SCALE)[0] / \
                dataset.DN_SCALE
        scores = {}
        for name, estimate in methods.items():
            scores[name] = _band_table(estimate, truth, dataset.PEAK_DN)
            scores[name]["sam_deg"] = round(metrics.sam_degrees(estimate, truth), 4)
        out[scene.name] = scores
    return out


def evaluate_pan(root: Path, runners: Runners) -> dict[str, Any]:
    """The ×2 model on each WorldView pan crop, band-wise: the one band fills all four inputs
    and the four outputs are averaged."""
    import tifffile

    out: dict[str, Any] = {}
    for path in sorted((root / "sr").glob("spacenet_pan*.tif")):
        pan = tifffile.imread(path).astype(np.float32)[None]
        pan = pan[:, : pan.shape[1] // 2 * 2, : pan.shape[2] // 2 * 2]
        low = dataset.area_down(pan)
        methods = {"bicubic": metrics.resize(low, 2), "lanczos": metrics.resize(low, 2, "lanczos")}
        x = np.repeat(low[None], 4, axis=1) * (PAN_GAIN / PAN_PEAK)
        for how in runners.ways:
            methods[f"model_{how}"] = runners.run(how, x)[0].mean(0, keepdims=True) * (
                PAN_PEAK / PAN_GAIN)
        out[path.stem] = {m: _band_table(v, pan, PAN_PEAK) for m, v in methods.items()}
    return out


def throughput(runners: Runners, batch: int = 4, repeats: int = 5) -> dict[str, Any]:
    """Mpx/s of input and of output, one batch of ``batch`` tiles at the bundle's tile size,
    median of ``repeats`` runs after a warm-up."""
    size = TILES[runners.task]
    channels = 4 if runners.task == "x2" else 10
    scale = 2 if runners.task == "x2" else 1
    x = np.random.default_rng(0).uniform(0.05, 0.3, (batch, channels, size, size)).astype(
        np.float32)
    result = {}
    for how in runners.ways:
        runners.run(how, x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runners.run(how, x)
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        pixels = batch * size * size
        result[how] = {"input_mpx_s": round(pixels / t / 1e6, 3),
                       "output_mpx_s": round(pixels * scale * scale / t / 1e6, 3),
                       "ms_per_batch": round(t * 1e3, 1)}
    return result


def _stretch(rgb: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return (np.clip((rgb - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def comparison_png(root: Path, x2: Runners, sharpen: Runners, path: Path) -> Path:
    """Bicubic | model | truth on a held-out Malmö crop: ×2 RGB on the top row, sharpened
    B12/B8A/B05 false colour below (each panel nearest-enlarged so pixels show)."""
    from PIL import Image

    scene = dataset.load(root, dataset.MALMO)
    rows = []
    x, truth = dataset.x2_pair(scene)
    model = x2.run("int8" if "int8" in x2.engines else "torch", x[None] * 1e-4)[0] * 1e4
    window = (slice(200, 328), slice(260, 388))
    panels = [metrics.resize(x, 2)[:3][::-1], model[:3][::-1], truth[:3][::-1]]
    crops = [p[(slice(None), *window)] for p in panels]
    low, high = np.percentile(crops[2], 1, axis=(1, 2))[:, None, None], np.percentile(
        crops[2], 99, axis=(1, 2))[:, None, None]
    rows.append([_stretch(c, low, high) for c in crops])
    xs, truth20 = dataset.sharpen_pair(scene)
    coarse = dataset.area_down(truth20)
    model = sharpen.run("int8" if "int8" in sharpen.engines else "torch", xs[None] * 1e-4)[0] * 1e4
    pick = [5, 3, 0]  # B12, B8A, B05
    window = (slice(60, 124), slice(130, 194))
    panels = [metrics.resize(coarse, 2)[pick], model[pick], truth20[pick]]
    crops = [p[(slice(None), *window)] for p in panels]
    low, high = np.percentile(crops[2], 1, axis=(1, 2))[:, None, None], np.percentile(
        crops[2], 99, axis=(1, 2))[:, None, None]
    rows.append([np.repeat(np.repeat(_stretch(c, low, high), 2, 1), 2, 2) for c in crops])
    gap = 6
    height = sum(r[0].shape[1] for r in rows) + gap
    width = sum(p.shape[2] for p in rows[0]) + 2 * gap
    canvas = np.full((height, width, 3), 255, np.uint8)
    top = 0
    for row in rows:
        left = 0
        for panel in row:
            image = np.moveaxis(panel, 0, -1)
            canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
            left += image.shape[1] + gap
        top += row[0].shape[1] + gap
    scale = 3
    big = np.repeat(np.repeat(canvas, scale, 0), scale, 1)
    Image.fromarray(big).save(path)
    return path


# The seams figure: a held-out scene large enough for 4 x 4 tiles of the x2 bundle's own size
# (128, overlap 32); the sharpening bundle's 256-pixel tiles would make 2 x 2 of it, so its run
# takes 144-pixel tiles (overlap 48, twice its stated context), 4 x 4 as well.
SEAMS_SCENE = "lasvegas/imgs_1"
SEAMS_TILE: dict[str, int | None] = {"x2": None, "sharpen": 144}
SEAMS_GAIN = 128  # the |difference| panel: grey levels per DN


def _tiled_and_whole(task: str, x: np.ndarray, georef: Any, folder: Path, threads: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Any], int, int]:
    """The INT8 bundle over the Wald input ``x`` (DN): streamed by ``onboard predict`` from
    files (tile by tile, as on board), run once on the whole array by the same engine with the
    runtime's own DN conversions, and, as a control, tiled in memory with no overlap (what a
    seam looks like). Returns the three outputs (DN float32), the streamed run's tile
    placements, its tile size and its overlap."""
    from onboard.runtime.cli import main as cli
    from onboard.runtime.downlink.products import write_geotiff
    from onboard.runtime.engines import open_engine
    from onboard.runtime.frame import Frame
    from onboard.runtime.georef import Georef
    from onboard.runtime.sources.geotiff import GeoTiffScene
    from onboard.runtime.stages.superres import DEFAULT_OVERLAP, SuperResolver
    from onboard.runtime.windows import TileGrid, Window

    dn = np.rint(x).astype(np.uint16)  # what a band file holds
    coarse = Georef(georef.crs, georef.transform.scaled(0.5))  # the 10 m grid at 20 m
    if task == "x2":
        source = folder / "x2_input.tif"
        write_geotiff(source, dn, list(dataset.BANDS_10), coarse)
    else:  # a band folder, each band at its own (Wald) resolution: 20 m and 40 m
        source = folder / "sharpen_input"
        source.mkdir()
        coarser = Georef(georef.crs, georef.transform.scaled(0.25))
        for i, band in enumerate(dataset.SHARPEN_INPUT):
            pixels, grid = (dn[i], coarse) if i < 4 else (dn[i, ::2, ::2], coarser)
            write_geotiff(source / f"wald_{band}.tif", pixels[None], [band], grid)
    out = folder / f"{task}_streamed.tif"
    tile = SEAMS_TILE[task]
    assert cli(["predict", str(bundle_path(task, "int8")), str(source), "--out", str(out),
                "--threads", str(threads), *(["--tile", str(tile)] if tile else [])]) == 0
    with GeoTiffScene(out) as tif:
        streamed = tif.read_pixels(Window(0, 0, tif.height, tif.width)).astype(np.float32)
    engine = open_engine(bundle_path(task, "int8"), "onnxruntime", "cpu", threads=threads)
    try:
        resolver = SuperResolver(engine, overlap=DEFAULT_OVERLAP, tile=tile)
        bands = dataset.BANDS_10 if task == "x2" else dataset.SHARPEN_INPUT
        whole = resolver.whole_image(Frame(dn, bands, 20.0)).astype(np.float32)
        grid = TileGrid(*dn.shape[1:], resolver.tile, resolver.overlap)
        resolver.overlap = 0  # below the context the bundle states: only for the control
        control = resolver.upsample(Frame(dn, bands, 20.0)).pixels.astype(np.float32)
        return streamed, whole, control, list(grid), resolver.tile, grid.overlap
    finally:
        engine.close()


def seams(root: Path, path: Path, threads: int = 2) -> dict[str, Any]:
    """Streamed against whole-image runs of both INT8 bundles on a held-out scene (Wald's
    protocol, ``SEAMS_SCENE``), as a figure: per row the streamed output, the whole-image
    output and their |difference| (``SEAMS_GAIN`` grey levels per DN) with the tile cores'
    edges, where seams would be, in red. ×2 in true colour (shown at half its 10 m size, the
    difference max-pooled so no pixel of it is lost), sharpening as B12/B8A/B05. Returns the
    numbers the caption states."""
    import tempfile

    from PIL import Image, ImageDraw, ImageFont

    from onboard.runtime.sources.oscd import OscdScene

    scene = dataset.load(root, SEAMS_SCENE)
    band_files = OscdScene(root / "oscd" / SEAMS_SCENE, ("B02",))
    georef = band_files.georef
    band_files.close()
    stats: dict[str, Any] = {"scene": SEAMS_SCENE}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for task in ("x2", "sharpen"):
            x, truth = (dataset.x2_pair if task == "x2" else dataset.sharpen_pair)(scene)
            streamed, whole, control, grid, tile, overlap = _tiled_and_whole(
                task, x, georef, Path(folder), threads)
            diff = np.abs(streamed - whole)
            p_streamed = float(np.mean(metrics.psnr_bands(streamed, truth, dataset.PEAK_DN)))
            p_whole = float(np.mean(metrics.psnr_bands(whole, truth, dataset.PEAK_DN)))
            n_rows = len({p.window.row_off for p in grid})
            stats[task] = {"tiles": [n_rows, len(grid) // n_rows], "tile": tile,
                           "overlap": overlap, "output_shape": list(streamed.shape[1:]),
                           "max_abs_diff_dn": float(diff.max()),
                           "pixels_differing": int((diff > 0).any(axis=0).sum()),
                           "psnr_streamed": round(p_streamed, 4), "psnr_whole": round(p_whole, 4),
                           "psnr_difference_db": round(p_streamed - p_whole, 4)}
            pick = [2, 1, 0] if task == "x2" else [5, 3, 0]
            shrink = 2 if task == "x2" else 1
            low = np.percentile(whole[pick], 1, axis=(1, 2))[:, None, None]
            high = np.percentile(whole[pick], 99, axis=(1, 2))[:, None, None]
            h, w = (d // shrink * shrink for d in streamed.shape[1:])
            panels = [_stretch(dataset.area_down(img[pick][:, :h, :w], shrink), low, high)
                      for img in (streamed, whole)]
            greys = []
            for d in (diff, np.abs(control - whole)):
                pooled = d.max(axis=0)[:h, :w].reshape(h // shrink, shrink, w // shrink,
                                                       shrink).max(axis=(1, 3))
                greys.append(np.clip(pooled * SEAMS_GAIN, 0, 255).astype(np.uint8))
            stats[task]["control_max_abs_diff_dn"] = float(np.abs(control - whole).max())
            marked = np.stack([greys[0]] * 3)
            # The cores split the grid into rows and columns of tiles: a seam can only be on
            # the lines between them.
            # One shown pixel per input pixel: x2 doubles the grid and is shown at half size.
            for r in {p.core.row_off for p in grid} - {0}:
                marked[:, min(r, marked.shape[1] - 1)] = [[255], [0], [0]]
            for c in {p.core.col_off for p in grid} - {0}:
                marked[:, :, min(c, marked.shape[2] - 1)] = [[255], [0], [0]]
            rows.append(panels + [marked, np.stack([greys[1]] * 3)])
    font = ImageFont.load_default(size=15)
    gap, text_h = 8, 44
    width = max(sum(p.shape[2] for p in row) + 2 * gap for row in rows)
    height = sum(row[0].shape[1] + text_h for row in rows) + text_h + 4
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    top = 0
    for task, row in zip(("x2", "sharpen"), rows, strict=True):
        t = stats[task]
        what = ("x2 of B04/B03/B02, 20 m -> 10 m (shown at half size)" if task == "x2" else
                "sharpening of B12/B8A/B05, 40 m -> 20 m guided by 20 m")
        draw.text((0, top + 2), f"{what}: {t['tiles'][0]} x {t['tiles'][1]} tiles of "
                  f"{t['tile']} px, overlap {t['overlap']}. Streamed | whole image | "
                  f"|difference| x{SEAMS_GAIN} (tile cores' edges in red) | control: "
                  f"{t['tile']}-px tiles without overlap (max {t['control_max_abs_diff_dn']:.0f}"
                  " DN)",
                  fill="black", font=font)
        draw.text((0, top + 21), f"max |diff| {t['max_abs_diff_dn']:.0f} DN "
                  f"({t['pixels_differing']} of {np.prod(t['output_shape'])} pixels differ); "
                  f"PSNR streamed {t['psnr_streamed']:.3f} dB, whole {t['psnr_whole']:.3f} dB, "
                  f"difference {t['psnr_difference_db']:+.4f} dB", fill="black", font=font)
        top += text_h
        left = 0
        for panel in row:
            canvas.paste(Image.fromarray(np.ascontiguousarray(np.moveaxis(panel, 0, -1))),
                         (left, top))
            left += panel.shape[2] + gap
        top += row[0].shape[1]
    draw.text((0, top + 4), f"{SEAMS_SCENE} (held out), Wald's protocol, INT8 bundles on ONNX "
              "Runtime: `onboard predict` tile by tile from band files against one engine run "
              "on the whole array;", fill="black", font=font)
    draw.text((0, top + 23), "PSNR at peak 10000 DN against the truth. Written by `python -m "
              "onboard.models.superres.evaluate --seams-only`.", fill="black", font=font)
    canvas.save(path, optimize=True)
    return stats


def seams_markdown(stats: dict[str, Any]) -> str:
    """The results.md section on ``seams.png``."""
    lines = ["## Streaming without seams", "",
             f"`onboard predict` streams tile by tile; on {stats['scene']} (held out, Wald's "
             "protocol, INT8 bundles) its output against one engine run on the whole array "
             "(`python -m onboard.models.superres.evaluate --seams-only`). The x2 run takes "
             "the bundle's own tiles; the sharpening bundle's 256-px tiles would make 2 × 2 of "
             "this scene, so its run takes `--tile 144`. The input files hold whole DN, so "
             "the PSNR differs from the tables above in the third decimal.", ""]
    for task in ("x2", "sharpen"):
        t = stats[task]
        lines.append(f"- {task}: {t['tiles'][0]} × {t['tiles'][1]} tiles of {t['tile']} px, "
                     f"overlap {t['overlap']}: max |diff| {t['max_abs_diff_dn']:.0f} DN "
                     f"({t['pixels_differing']} of {int(np.prod(t['output_shape']))} pixels), "
                     f"PSNR {t['psnr_streamed']:.3f} dB streamed, {t['psnr_whole']:.3f} dB "
                     f"whole, difference {t['psnr_difference_db']:+.4f} dB (control, "
                     f"{t['tile']}-px tiles without overlap: max "
                     f"{t['control_max_abs_diff_dn']:.0f} DN).")
    lines += ["", "![streamed / whole image / |difference| with the tile cores' edges](seams.png)",
              ""]
    return "\n".join(lines) + "\n"


def _gain_summary(results: dict[str, Any], task: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for scene, methods in results.items():
        bic = np.array(methods["bicubic"]["psnr"])
        row: dict[str, Any] = {}
        for name, table in methods.items():
            if name == "bicubic":
                continue
            row[f"{name}_gain_db"] = round(float(np.mean(np.array(table["psnr"]) - bic)), 3)
        if task == "sharpen":
            di = np.array(methods["detail_injection"]["psnr"])
            for how in ("model_torch", f"model_{previous_way(task)}", "model_int8"):
                if how in methods:
                    row[f"{how}_over_detail_injection_db"] = [
                        round(float(v), 3) for v in np.array(methods[how]["psnr"]) - di]
        if "model_int8" in methods:
            row["int8_minus_fp32_db"] = round(methods["model_int8"]["psnr_mean"]
                                              - methods["model_torch"]["psnr_mean"], 3)
        summary[scene] = row
    return summary


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Super-resolution: held-out results", "",
             f"Measured in one run by `python -m onboard.models.superres.evaluate` on "
             f"{report['machine']}. Wald's protocol, whole held-out scenes "
             f"({', '.join(dataset.HELDOUT)}; first date of each OSCD city); PSNR in dB at peak "
             "10000 DN (pan crops: 2047), SSIM (Gaussian σ 1.5), SAM in degrees.", ""]
    for task, bands in (("x2", list(dataset.BANDS_10)), ("sharpen", list(dataset.BANDS_20))):
        title = "×2 of the 10 m bands (20 m → 10 m)" if task == "x2" else \
            "Sharpening 20 m bands, one scale down (40 m → 20 m guided by 20 m)"
        lines += [f"## {title}", "",
                  f"Parameters: {report['params'][task]}.", "",
                  "| scene | method | " + " | ".join(f"PSNR {b}" for b in bands)
                  + " | PSNR mean | SSIM mean |" + (" SAM |" if task == "sharpen" else ""),
                  "|---|---|" + "---|" * (len(bands) + 2 + (task == "sharpen"))]
        for scene, methods in report[task].items():
            for name, t in methods.items():
                lines.append(f"| {scene} | {name} | " + " | ".join(f"{v:.2f}" for v in t["psnr"])
                             + f" | {t['psnr_mean']:.2f} | {t['ssim_mean']:.4f} |"
                             + (f" {t['sam_deg']:.3f} |" if task == "sharpen" else ""))
        lines += ["", "Gains (dB, mean over bands, against bicubic; INT8 − fp32):", ""]
        for scene, row in report["gains"][task].items():
            lines.append(f"- {scene}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
        lines += ["", "Throughput (one batch of 4 tiles, "
                  f"{TILES[task]}² input, {report['threads']} threads):", ""]
        for how, t in report["throughput"][task].items():
            lines.append(f"- {how}: {t['input_mpx_s']} Mpx/s input, {t['output_mpx_s']} Mpx/s "
                         f"output ({t['ms_per_batch']} ms per batch)")
        lines.append("")
    lines += ["## ×2 on the WorldView pan crops (second sensor, band-wise)", "",
              "| crop | method | PSNR | SSIM |", "|---|---|---|---|"]
    for crop, methods in report["pan"].items():
        for name, t in methods.items():
            lines.append(f"| {crop} | {name} | {t['psnr_mean']:.2f} | {t['ssim_mean']:.4f} |")
    lines += ["", "![bicubic / model / truth](heldout_crops.png)", ""]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + seams_markdown(report["seams"]) if "seams" in report else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=default_data_root())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--seams-only", action="store_true",
                        help="only write seams.png (streamed against whole-image runs) and "
                             "print its results.md section; nothing else is evaluated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.seams_only:
        stats = seams(args.root, args.out / "seams.png", args.threads)
        print(json.dumps(stats, indent=2))
        print(seams_markdown(stats))
        return
    scenes = dataset.heldout_scenes(args.root)
    x2, sharpen = Runners("x2", args.threads), Runners("sharpen", args.threads)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), load "
                   f"{os.getloadavg()[0]:.1f}",
        "threads": args.threads,
        "heldout": [s.name for s in scenes],
        "params": {"x2": count_parameters(x2.model), "sharpen": count_parameters(sharpen.model)},
        "x2": evaluate_x2(scenes, x2),
        "sharpen": evaluate_sharpen(scenes, sharpen),
        "pan": evaluate_pan(args.root, x2),
    }
    report["gains"] = {"x2": _gain_summary(report["x2"], "x2"),
                       "sharpen": _gain_summary(report["sharpen"], "sharpen"),
                       "pan": _gain_summary(report["pan"], "x2")}
    report["throughput"] = {"x2": throughput(x2), "sharpen": throughput(sharpen)}
    comparison_png(args.root, x2, sharpen, args.out / "heldout_crops.png")
    report["seams"] = seams(args.root, args.out / "seams.png", args.threads)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
