"""Evaluate the change encoder against RaVAEn's pixel baselines on held-out cities, in one run.

    python -m onboard.models.change.evaluate [--bands 13 4] [--data DIR]

On the held-out OSCD cities (beihai, bordeaux, nantes: never trained or calibrated on), cells of
32 x 32 pixels at 10 m, positive when more than 1 % of their pixels changed:

* AUPRC pooled over the cities (the downlink ranks tiles of many scenes at once, so one
  threshold must work everywhere) and per city, for ours and for the pixel baselines RaVAEn
  compares with: the cosine distance and the RMSE of the two dates' raw cell pixels
  (reflectance), on the same cells;
* ours as trained (torch fp32) and, where the bundles exist, as shipped: the fp32 and INT8
  bundles opened by the flight runtime (ONNX Runtime), so the INT8 drop is measured on the same
  cells; our scores always go through the store's int8 latent codes and the calibration;
* the calibration on held-out cells: mean score against the rate of change, Brier score, and the
  rate of change among cells scored above 0.5;
* the K-memory on sequences built from the two dates: (date 1, date 1 again, date 2) on the
  held-out and the unlabelled cities, and (date 1, date 2, date 1 again), where the minimum over
  the memory must recognise the return of an earlier state.

Encoding is window by window (256 x 256, the runtime's tiling), every window on its own.
Writes ``results.json``, ``results.md`` and ``heldout_change.png`` beside this file. ``--data``
defaults to ``$ONBOARD_DATA``, else ``../shared/data`` (:mod:`onboard.models.data`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onboard.models.change import dataset
from onboard.models.change.metrics import auprc, pixel_baselines
from onboard.models.change.scoring import (
    block_distance,
    calibrated,
    dequantise,
    memory_score,
    quantise,
)
from onboard.models.data import default_data_root

HERE = Path(__file__).resolve().parent
THREADS = 2
Encode = Callable[[np.ndarray], np.ndarray]


def torch_encoder(bands: int, weights: Path | None = None) -> Encode:
    import torch

    from onboard.models.change import calibration
    from onboard.models.change.model import build

    torch.set_num_threads(THREADS)
    path = weights or HERE / f"weights_{bands}band.pt"
    info = calibration(bands) if weights is None else json.loads(
        (path.parent / f"calibration_{bands}band.json").read_text())
    model = build(bands, info.get("ignore_bands", ()))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()

    def encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
    return encode


def bundle_encoder(path: Path) -> tuple[Encode, dict[str, Any]]:
    """The flight runtime's engine for a bundle, and the bundle's ``extra["change"]``."""
    from onboard.runtime.engines import open_engine

    engine = open_engine(path, "onnxruntime", "cpu", threads=THREADS, batch_size=8)
    name = engine.manifest.outputs[0].name
    input_name = engine.manifest.inputs[0].name

    def encode(x: np.ndarray) -> np.ndarray:
        return engine.run_named({input_name: x})[name]
    return encode, engine.manifest.extra["change"]


def city_scores(encode: Encode, city: dataset.City, change: dict[str, Any]
                ) -> dict[str, np.ndarray]:
    """Per cell: our calibrated score (date 2 against a one-reference memory of date 1), the
    distance it comes from, the two pixel baselines and the truth."""
    s = float(change["latent_scale"])
    z1 = dataset.run_tiled(encode, city.before)
    z2 = dataset.run_tiled(encode, city.after)
    q1, q2 = dequantise(quantise(z1, s), s), dequantise(quantise(z2, s), s)
    d = block_distance(q1, q2, change)
    base = pixel_baselines(city.before_dn, city.after_dn)
    out = {"distance": d, "score": memory_score(z2, [quantise(z1, s)], change),
           "cosine": base["cosine"], "rmse": base["rmse"], "z1": z1, "z2": z2}
    if city.cells is not None:
        out["truth"] = city.cells
    return out


def auprc_table(per_city: dict[str, dict[str, np.ndarray]], keys: tuple[str, ...]
                ) -> dict[str, dict[str, float]]:
    """AUPRC of each score ``key`` per city and pooled over all cells of all cities."""
    table: dict[str, dict[str, float]] = {}
    for key in keys:
        row = {name: auprc(r[key], r["truth"]) for name, r in per_city.items()}
        row["pooled"] = auprc(np.concatenate([r[key].ravel() for r in per_city.values()]),
                              np.concatenate([r["truth"].ravel() for r in per_city.values()]))
        table[key] = row
    return table


def calibration_check(per_city: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    score = np.concatenate([r["score"].ravel() for r in per_city.values()])
    truth = np.concatenate([r["truth"].ravel() for r in per_city.values()]).astype(float)
    bins = np.array([0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0001])
    which = np.digitize(score, bins) - 1
    reliability = []
    for i in range(len(bins) - 1):
        inside = which == i
        if inside.any():
            reliability.append({"bin": f"{bins[i]:.1f}-{min(bins[i + 1], 1.0):.1f}",
                                "cells": int(inside.sum()),
                                "mean_score": float(score[inside].mean()),
                                "changed_rate": float(truth[inside].mean())})
    high = score > 0.5
    return {"mean_score": float(score.mean()), "changed_rate": float(truth.mean()),
            "brier": float(((score - truth) ** 2).mean()),
            "brier_constant": float(((truth.mean() - truth) ** 2).mean()),
            "cells_above_0.5": int(high.sum()),
            "changed_rate_above_0.5": float(truth[high].mean()) if high.any() else float("nan"),
            "reliability": reliability}


def memory_sequences(encode: Encode, cities: list[dataset.City], change: dict[str, Any],
                     cached: dict[str, dict[str, np.ndarray]] | None = None, k: int = 3
                     ) -> dict[str, Any]:
    """Replays (date 1, date 1 again, date 2) and (date 1, date 2, date 1 again) per city with a
    memory of the last ``k`` references; reports what each step scores."""
    s = float(change["latent_scale"])
    rows: dict[str, Any] = {}
    for city in cities:
        r = cached.get(city.name) if cached else None
        z1 = r["z1"] if r is not None else dataset.run_tiled(encode, city.before)
        z2 = r["z2"] if r is not None else dataset.run_tiled(encode, city.after)
        row: dict[str, Any] = {"cells": int(z1[0].size)}
        for label, sequence in (("d1,d1,d2", (z1, z1, z2)), ("d1,d2,d1", (z1, z2, z1))):
            memory: list[np.ndarray] = []
            steps = []
            for z in sequence:
                if not memory:
                    steps.append({"scored": False})  # a first sighting is "new", not scored
                else:
                    score = memory_score(z, memory, change)
                    steps.append({"scored": True, "mean": float(score.mean()),
                                  "max": float(score.max()),
                                  "above_0.5": float((score > 0.5).mean())})
                    if city.cells is not None:
                        steps[-1]["auprc"] = auprc(score, city.cells)
                memory = (memory + [quantise(z, s)])[-k:]
            row[label] = steps
        rows[city.name] = row
    floor = float(calibrated(np.zeros(1), change["calibration"]["a"],
                             change["calibration"]["b"])[0])
    return {"k": k, "score_of_an_identical_view": floor, "cities": rows}


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, black -> red -> yellow -> white (a heat ramp)."""
    v = np.clip(np.nan_to_num(values), 0, 1)[..., None]
    ramp = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1),
                           np.clip(3 * v - 2, 0, 1)], -1)
    return (ramp * 255).astype(np.uint8)


def _rgb(image: np.ndarray) -> np.ndarray:
    rgb = (image[[3, 2, 1]] if image.shape[0] == 13 else image[[2, 1, 0]]).astype(np.float32)
    lo, hi = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return (np.clip((rgb - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8) \
        .transpose(1, 2, 0)


def figure(path: Path, per_city: dict[str, dict[str, np.ndarray]],
           cities: dict[str, dataset.City], gap: int = 8) -> Path:
    """One row per city: date 1, date 2 (true colour), the truth per cell (white: more than
    1 % changed), our calibrated score (heat ramp, 0 to 1) and the pixel cosine baseline (heat
    ramp, 0 to its 99th percentile), cells drawn 32 px wide on the 10 m grid."""
    from onboard.runtime.png import write_png

    rows = []
    for name, r in per_city.items():
        city = cities[name]
        up = np.ones((dataset.CELL, dataset.CELL))
        cos = r["cosine"] / max(float(np.percentile(r["cosine"], 99)), 1e-12)
        panels = [_rgb(city.before_dn), _rgb(city.after_dn),
                  _heat(np.kron(r["truth"].astype(float), up)),
                  _heat(np.kron(r["score"], up)), _heat(np.kron(cos, up))]
        h = panels[0].shape[0]
        spacer = np.full((h, gap, 3), 255, np.uint8)
        row = [p for panel in panels for p in (panel, spacer)][:-1]
        rows.append(np.concatenate(row, 1))
    width = max(r.shape[1] for r in rows)
    padded = []
    for row in rows:
        pad = np.full((row.shape[0], width - row.shape[1], 3), 255, np.uint8)
        padded += [np.concatenate([row, pad], 1), np.full((gap, width, 3), 255, np.uint8)]
    image = np.concatenate(padded[:-1], 0)
    # A third of full size: a reviewer sees the whole figure at once.
    write_png(path, np.ascontiguousarray(image[::3, ::3]))
    return path


def evaluate_variant(bands: int, root: Path, bundles: dict[str, Path] | None = None,
                     png: Path | None = None, weights: Path | None = None,
                     change: dict[str, Any] | None = None, memory: bool = True
                     ) -> dict[str, Any]:
    """Everything above for one variant: the committed weights and calibration unless
    ``weights`` and ``change`` are given."""
    import onboard.models.change as zoo_entry

    started = time.perf_counter()
    change = change or zoo_entry.change_block(bands)
    heldout = dataset.load_cities(root, dataset.HELDOUT, bands)
    encode = torch_encoder(bands, weights)
    per_city = {c.name: city_scores(encode, c, change) for c in heldout}
    table = auprc_table(per_city, ("score", "cosine", "rmse"))
    result: dict[str, Any] = {
        "bands": bands, "heldout_cities": list(dataset.HELDOUT),
        "training_cities": list(dataset.TRAINING),
        "cells": {n: int(r["truth"].size) for n, r in per_city.items()},
        "positives": {n: int(r["truth"].sum()) for n, r in per_city.items()},
        "auprc": {"ours_torch_fp32": table["score"], "pixel_cosine": table["cosine"],
                  "pixel_rmse": table["rmse"]},
        "calibration": calibration_check(per_city),
        "change": change,
    }
    for label, path in (bundles or {}).items():
        if path.exists():
            engine_encode, bundle_change = bundle_encoder(path)
            scored = {c.name: city_scores(engine_encode, c, bundle_change) for c in heldout}
            result["auprc"][f"ours_bundle_{label}"] = auprc_table(scored, ("score",))["score"]
            result.setdefault("bundles", {})[label] = path.name
    if memory:
        unlabelled = dataset.load_cities(root, dataset.UNLABELLED, bands)
        sequences = memory_sequences(encode, heldout, change, per_city)
        sequences["cities"].update(memory_sequences(encode, unlabelled, change)["cities"])
        result["memory"] = sequences
    if png is not None:
        figure(png, per_city, {c.name: c for c in heldout})
        result["figure"] = png.name
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Change encoder: held-out results", "",
             "Cells of 32 x 32 pixels at 10 m on the held-out OSCD cities, positive when more "
             "than 1 % of their pixels changed. AUPRC (average precision); the pixel baselines "
             "are computed in the same run on the same cells. Produced by "
             "`python -m onboard.models.change.evaluate`.", ""]
    for key, r in results["variants"].items():
        cities = r["heldout_cities"]
        lines += [f"## {key} ({r['bands']} bands)", "",
                  "| scorer | " + " | ".join(cities) + " | pooled |",
                  "|---|" + "---|" * (len(cities) + 1)]
        for scorer, row in r["auprc"].items():
            lines.append(f"| {scorer} | " + " | ".join(_fmt(row[c]) for c in cities)
                         + f" | **{_fmt(row['pooled'])}** |")
        lines.append("| (positive rate) | " + " | ".join(
            _fmt(r["positives"][c] / r["cells"][c]) for c in cities) + " | "
            + _fmt(sum(r["positives"].values()) / sum(r["cells"].values())) + " |")
        cal = r["calibration"]
        lines += ["", f"Calibration on held-out cells: mean score {_fmt(cal['mean_score'])} vs "
                  f"changed rate {_fmt(cal['changed_rate'])}; Brier {_fmt(cal['brier'])} "
                  f"(constant predictor {_fmt(cal['brier_constant'])}); "
                  f"{cal['cells_above_0.5']} cells above 0.5, of which "
                  f"{_fmt(cal['changed_rate_above_0.5'])} changed.", "",
                  "| score bin | cells | mean score | changed rate |", "|---|---|---|---|"]
        for b in cal["reliability"]:
            lines.append(f"| {b['bin']} | {b['cells']} | {_fmt(b['mean_score'])} | "
                         f"{_fmt(b['changed_rate'])} |")
        mem = r["memory"]
        lines += ["", f"K-memory (K = {mem['k']}; a view identical to a reference scores "
                  f"{_fmt(mem['score_of_an_identical_view'])}): mean score / share of cells "
                  "above 0.5 / AUPRC at each scored step", "",
                  "| city | d1,d1,d2: d1 again | d1,d1,d2: d2 | d1,d2,d1: d2 | "
                  "d1,d2,d1: d1 again |", "|---|---|---|---|---|"]

        def step(s: dict[str, Any]) -> str:
            text = f"{s['mean']:.3f} / {s['above_0.5']:.3f}"
            return text + (f" / {s['auprc']:.3f}" if "auprc" in s else "")
        for city, row in mem["cities"].items():
            a, b = row["d1,d1,d2"], row["d1,d2,d1"]
            lines.append(f"| {city} | {step(a[1])} | {step(a[2])} | {step(b[1])} | "
                         f"{step(b[2])} |")
        if r.get("figure"):
            lines += ["", f"Figure `{r['figure']}`: one row per held-out city "
                      f"({', '.join(cities)}); panels date 1, date 2 (true colour), the truth "
                      "per cell (white: changed), our calibrated score and the pixel cosine "
                      "baseline (heat ramps black -> red -> yellow -> white)."]
        lines.append("")
    return "\n".join(lines) + "\n"


def run(root: Path, bands_list: tuple[int, ...] = (13, 4), out: Path = HERE) -> dict[str, Any]:
    results: dict[str, Any] = {"variants": {}}
    for bands in bands_list:
        if not (HERE / f"weights_{bands}band.pt").exists():
            continue
        bundles = {p: out / f"change-{bands}band-{p}-ort.onboard" for p in ("fp32", "int8")}
        png = out / "heldout_change.png" if bands == bands_list[0] else None
        results["variants"][f"change-{bands}band"] = evaluate_variant(bands, root, bundles, png)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bands", type=int, nargs="+", default=[13, 4])
    parser.add_argument("--data", type=Path, default=default_data_root())
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    results = run(args.data, tuple(args.bands), args.out)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
