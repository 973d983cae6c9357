"""The peers of each stage, measured in the same run as the bundles, on the same pixels.

* every zoo model in the matrix in PyTorch eager (``model.py`` + weights): what a user runs
  without onboard; torch is imported only in these children, never by the flight runtime;
* clouds: ukis-csmask's U-Nets through the same engine as ours (the model is the only
  difference), the ukis-csmask package as its users call it (``CSmask``), and s2cloudless;
* change (when a change bundle is present): RaVAEn's pixel baselines (cosine, RMSE per cell);
* super-resolution (when present): bicubic.

Each child reports what an engine row reports (latency p50/p99 per tile, Mpx/s of input, peak
RSS, the metric on the same evaluation set where the peer can be scored on it, else "n/a" with
the reason); :func:`add_ratios` puts each bundle row over its peers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onboard.bench.measure import peak_rss_mb, sample_tiles, timed_calls

PEER_CACHE = Path("/tmp/onboard-bench")


_budget_s: float | None = None  # per timing loop, from the child's spec


def _timed(fn: Any, calls: int) -> list[float]:
    return timed_calls(fn, calls, _budget_s)


def _throughput(fn: Any, calls: int, mpx_per_call: float) -> dict[str, Any]:
    from onboard.bench.power import EnergyMeter

    with EnergyMeter().measure() as energy:
        times = _timed(fn, calls)
    calls = len(times)
    median = float(np.median(times))
    return {"mpx_s": mpx_per_call / median, "mpx_s_best": mpx_per_call / float(np.min(times)),
            "energy_j_per_mpx": energy.per_mpx(mpx_per_call * calls),
            "energy_source": energy.source}


# -- children (each in a fresh process) -----------------------------------------------------------


def child_torch(spec: dict[str, Any]) -> dict[str, Any]:
    """The zoo model in PyTorch eager, on the same tiles, at the same thread count."""
    import torch

    from onboard.models import zoo

    torch.set_num_threads(spec["threads"])
    entry = zoo.get(spec["zoo"])
    model = entry.build()
    model.load_state_dict(torch.load(entry.weights, weights_only=True, map_location="cpu"))
    model.eval()
    scale = np.asarray(entry.input_scale, np.float32)[:, None, None]
    offset = np.asarray(entry.input_offset, np.float32)[:, None, None]
    size, batch = entry.tile_size, spec["batch"]
    tiles = sample_tiles(list(entry.bands), batch, size).astype(np.float32) * scale + offset
    one, many = torch.from_numpy(tiles[:1].copy()), torch.from_numpy(tiles)
    result: dict[str, Any] = {"tile": size, "batch": batch}
    with torch.inference_mode():
        for _ in range(3):
            model(one)
        result["latency_s"] = _timed(lambda: model(one), spec["latency_calls"])
        result.update(_throughput(lambda: model(many), spec["throughput_calls"],
                                  batch * size * size / 1e6))
        if spec.get("evaluate", True):
            result.update(_torch_metric(model, entry, spec["data"]))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _torch_metric(model: Any, entry: Any, data: str) -> dict[str, Any]:
    import torch

    if entry.validation_batches is None or entry.metric is None:
        return {"metric": "n/a", "why": "the zoo entry exposes no evaluation"}
    try:
        batches = entry.validation_batches(Path(data))
    except (OSError, KeyError) as error:
        return {"metric": "n/a", "why": f"evaluation data unavailable: {error}"}
    outputs = [model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
               for x, _ in batches]
    return {"metric": entry.metric_name,
            "value": float(entry.metric(outputs, [y for _, y in batches]))}


def child_csmask(spec: dict[str, Any]) -> dict[str, Any]:
    """The ukis-csmask package as its users call it (its own tiling and ONNX Runtime)."""
    from ukis_csmask.mask import CSmask

    from onboard.models.cloud.dataset import BANDS_6

    bands, threads = spec["bands"], spec["threads"]
    common = ["blue", "green", "red", "nir", "swir16", "swir22"][:bands]
    tile = sample_tiles(common, 1, 256)[0].astype(np.float32) * 1e-4
    hwc = np.ascontiguousarray(tile.transpose(1, 2, 0))

    def run() -> None:
        CSmask(hwc, band_order=list(BANDS_6[:bands]), product_level="l1c",
               intra_op_num_threads=threads, inter_op_num_threads=1)

    run()
    result: dict[str, Any] = {"tile": 256, "batch": 1,
                              "latency_s": _timed(run, spec["latency_calls"])}
    result.update(_throughput(run, spec["throughput_calls"], 256 * 256 / 1e6))
    if spec.get("evaluate", True):
        try:
            from onboard.models.cloud import dataset
            from onboard.models.cloud.evaluate import predict_csmask, score_scene

            ukis = dataset.ukis_scene(Path(spec["data"]))
            scores = score_scene(predict_csmask(ukis.image, bands), ukis)
            result.update(metric="boa", value=float(scores["cloud_boa"]),
                          eval_set="the whole UKIS scene (human masks), through CSmask")
        except (OSError, KeyError) as error:
            result.update(metric="n/a", why=f"evaluation data unavailable: {error}")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_s2cloudless(spec: dict[str, Any]) -> dict[str, Any]:
    """s2cloudless (LightGBM on 10 bands, with its default smoothing) on the sample."""
    from s2cloudless import S2PixelCloudDetector

    from onboard.models.cloud.dataset import S2CLOUDLESS_BANDS

    tile = sample_tiles(list(S2CLOUDLESS_BANDS), 1, 256)[0].astype(np.float32) * 1e-4
    image = np.ascontiguousarray(tile.transpose(1, 2, 0))[None]
    detector = S2PixelCloudDetector(all_bands=False)

    def run() -> None:
        detector.get_cloud_masks(image)

    run()
    result: dict[str, Any] = {"tile": 256, "batch": 1,
                              "latency_s": _timed(run, spec["latency_calls"])}
    result.update(_throughput(run, spec["throughput_calls"], 256 * 256 / 1e6))
    result.update(metric="n/a", why="needs 10 Sentinel-2 bands; the held-out human-labelled UKIS "
                                    "scene has 6 (it is the teacher on the 13-band scenes)")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_change_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """RaVAEn's pixel baselines per 32² cell on both dates of the sample; AUPRC of the cosine
    baseline on the change zoo entry's held-out batches when they load."""
    from onboard.models.change.metrics import auprc, pixel_baselines

    pixels = sample_tiles(["B02", "B03", "B04", "B08"], 2, 256)
    before, after = pixels[0], pixels[1]
    result: dict[str, Any] = {"tile": 256, "batch": 1,
                              "latency_s": _timed(lambda: pixel_baselines(before, after),
                                                  spec["latency_calls"])}
    result.update(_throughput(lambda: pixel_baselines(before, after), spec["throughput_calls"],
                              256 * 256 / 1e6))
    result.update(metric="n/a", why="the pixel baselines' AUPRC is in models/change/results.md")
    if spec.get("zoo") and spec.get("evaluate", True):
        try:
            from onboard.models import zoo

            entry = zoo.get(spec["zoo"])
            scale = np.asarray(entry.input_scale, np.float32)[:, None, None]
            offset = np.asarray(entry.input_offset, np.float32)[:, None, None]
            scores: dict[str, list[np.ndarray]] = {"cosine": [], "rmse": []}
            truth = []
            for x, y in entry.validation_batches(Path(spec["data"])):
                n = len(x) // 2
                for a, b, cells in zip(x[:n], x[n:], np.asarray(y), strict=True):
                    both = pixel_baselines((a - offset) / scale, (b - offset) / scale)
                    keep = cells >= 0
                    for name in scores:
                        scores[name].append(both[name][keep])
                    truth.append(cells[keep] == 1)
            positive = np.concatenate(truth)
            result.update(metric="auprc (cosine baseline)",
                          value=float(auprc(np.concatenate(scores["cosine"]), positive)),
                          value_rmse=float(auprc(np.concatenate(scores["rmse"]), positive)),
                          eval_set=entry.extra.get("heldout", "the change zoo entry's set"))
            result.pop("why", None)
        except Exception as error:  # a zoo entry being built right now: say why, go on
            result["why"] = f"baseline not scored on the zoo's batches: {error}"
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def child_bicubic(spec: dict[str, Any]) -> dict[str, Any]:
    """Bicubic ×2 of a 20 m band stack (PIL on float32 planes), the super-resolution floor."""
    from onboard.models.superres.metrics import resize

    x = sample_tiles(["B05", "B06", "B07", "B8A", "B11", "B12"], 1, 128)[0].astype(np.float32)
    result: dict[str, Any] = {"tile": 128, "batch": 1,
                              "latency_s": _timed(lambda: resize(x, 2), spec["latency_calls"])}
    result.update(_throughput(lambda: resize(x, 2), spec["throughput_calls"], 128 * 128 / 1e6))
    result["output_mpx_s"] = result["mpx_s"] * 4
    if spec.get("evaluate", True):
        result.update(_bicubic_psnr(Path(spec["data"])))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _bicubic_psnr(data: Path) -> dict[str, Any]:
    """Bicubic's PSNR on the super-resolution zoo's held-out scenes, both tasks, as the models
    are scored (Wald's protocol, peak reflectance 1.0)."""
    try:
        from onboard.models import zoo
        from onboard.models.superres.metrics import resize

        values = {}
        for task in ("x2", "sharpen"):
            entry = zoo.get(f"superres-{task}")
            outputs, truths = [], []
            for x, y in entry.validation_batches(data):
                # Sharpening's input is the 10 m bands then the 20 m ones nearest-resampled:
                # bicubic sees only the 20 m ones, at their own (coarser) sampling.
                coarse = x[0] if task == "x2" else x[0, 4:, ::2, ::2]
                outputs.append(resize(coarse, 2)[None])
                truths.append(y)
            values[task] = float(entry.metric(outputs, truths))
    except Exception as error:  # data or zoo missing: say why, go on
        return {"metric": "n/a", "why": f"bicubic not scored on the zoo's scenes: {error}"}
    return {"metric": "psnr (×2 task)", "value": values["x2"],
            "value_sharpen": values["sharpen"],
            "eval_set": "the super-resolution held-out scenes, both tasks"}


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    global _budget_s
    _budget_s = spec.get("budget_s")
    return CHILDREN[kind](spec)


CHILDREN = {"torch": child_torch, "csmask": child_csmask, "s2cloudless": child_s2cloudless,
            "change_baseline": child_change_baseline, "bicubic": child_bicubic}


# -- planning and ratios --------------------------------------------------------------------------


def ukis_bundle(bands: int) -> Path | None:
    """ukis-csmask's L1C U-Net as a bundle (written once into the cache; ~40 MB)."""
    try:
        from onboard.models.peers import ukis_csmask_bundle
    except ImportError:
        return None
    path = PEER_CACHE / f"ukis-csmask-{bands}b-l1c.onboard"
    if not path.exists():
        PEER_CACHE.mkdir(parents=True, exist_ok=True)
        ukis_csmask_bundle(path, bands=bands)
    return path


def plan_rows(bundle_rows: list[dict[str, Any]], threads: list[int], data: Path,
              quick: bool) -> list[dict[str, Any]]:
    """Peer rows for the models and tasks present among ``bundle_rows``."""
    budget = 1.5 if quick else 20.0
    calls = {"latency_calls": 15 if quick else 60, "throughput_calls": 4 if quick else 12,
             "batch": 4 if quick else 8, "data": str(data), "budget_s": budget}
    slow_calls = {"latency_calls": 3 if quick else 10, "throughput_calls": 2 if quick else 5,
                  "data": str(data), "budget_s": budget}
    models = sorted({r["model"] for r in bundle_rows if "model" in r and r.get("kind")})
    tasks = {r.get("task") for r in bundle_rows}
    rows: list[dict[str, Any]] = []

    def add(name: str, kind: str, spec: dict[str, Any], **row: Any) -> None:
        for n in threads:
            rows.append({"model": name, "task": row.get("task"),
                "bundle": row.get("bundle", "(peer)"), "backend": row.get("backend"),
                "how": row.get("how", "peer"), "precision": "fp32", "threads": n,
                "size_kb": row.get("size_kb"), "kind": kind, "peer_of": row.get("peer_of"),
                "spec": {**spec, "threads": n, "evaluate": n == threads[-1] and not quick},
                **({"why": "not evaluated in a --quick run"} if quick else {})})

    from onboard.bench.engines import zoo_entry

    for model in models:
        entry = zoo_entry(model)
        if entry is None:
            continue
        size = entry.weights.stat().st_size / 1024 if entry.weights.exists() else None
        add(f"{model} (PyTorch eager)", "torch", {**calls, "zoo": model}, task=entry.task,
            backend="torch", how="model.py + weights, eager", peer_of=model,
            size_kb=round(size, 1) if size else None)
    if "cloud" in tasks:
        for bands in (4, 6):
            zoo_name = f"cloud-{bands}band"
            if zoo_name not in models:
                continue
            path = ukis_bundle(bands)
            if path is not None:
                # Scored on the human-labelled scene only: the OSCD gate dates are
                # labelled by ukis-csmask itself.
                add(f"ukis-csmask-{bands}b (same engine)", "bundle",
                    {**calls, "bundle": str(path), "backend": "onnxruntime", "zoo": zoo_name,
                     "metric_batches": [0],
                     "eval_set": "the whole UKIS scene (human masks)"},
                    task="cloud", backend="onnxruntime", how="its ONNX U-Net, our engine",
                    peer_of=zoo_name, size_kb=round(path.stat().st_size / 1024, 1))
            if not quick:  # seconds per tile: the full run only
                add(f"ukis-csmask-{bands}b (package)", "csmask", {**slow_calls, "bands": bands},
                    task="cloud", backend="onnxruntime", how="ukis_csmask.CSmask",
                    peer_of=zoo_name)
        add("s2cloudless", "s2cloudless", slow_calls, task="cloud", backend="lightgbm",
            how="S2PixelCloudDetector, 10 bands", peer_of="cloud")
    if "change" in tasks:
        zoo_name = next((m for m in models if zoo_entry(m) and zoo_entry(m).task == "change"),
                        None)
        add("pixel baselines (cosine, RMSE)", "change_baseline", {**calls, "zoo": zoo_name},
            task="change", backend="numpy", how="RaVAEn's per-cell baselines",
            peer_of="change")
    if "superres" in tasks:
        add("bicubic ×2", "bicubic", calls, task="superres", backend="PIL", how="bicubic",
            peer_of="superres")
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each bundle row's throughput over its peers' at the same thread count: ``vs`` maps the
    peer's name to (bundle Mpx/s) / (peer Mpx/s), medians over medians."""
    peers = [r for r in rows if r.get("peer_of") and "mpx_s" in r]
    for row in rows:
        if row.get("peer_of") or "mpx_s" not in row:
            continue
        vs = {}
        for peer in peers:
            if peer["threads"] != row["threads"]:
                continue
            same_model = peer["peer_of"] == row["model"]
            same_task = peer["peer_of"] in (row.get("task"), row["model"])
            if same_model or same_task:
                vs[peer["model"]] = row["mpx_s"] / peer["mpx_s"]
        if vs:
            row["vs"] = vs
