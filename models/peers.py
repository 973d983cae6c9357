"""The peers we measure ourselves against, packaged as onboard bundles.

``ukis-csmask`` ships ONNX U-Nets (EfficientNet-B4 encoder, ~40 MB) trained on Sentinel-2 to
segment clear / cloud / cloud shadow. Wrapping one in a bundle runs it through the very same
engines and tiling as our own models, so comparisons differ only in the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from onboard.runtime.bundle import InputSpec, Manifest, OutputSpec, write_bundle

# Sentinel-2 L1C digital numbers are reflectance × 10000.
L1C_DN_PER_REFLECTANCE = 10000.0


def ukis_csmask_dir() -> Path:
    import ukis_csmask  # the [compile] extra installs it

    return Path(ukis_csmask.__file__).parent


def ukis_csmask_manifest(bands: int = 4, level: str = "l1c",
                         dn_per_input_unit: float = L1C_DN_PER_REFLECTANCE,
                         name: str | None = None) -> Manifest:
    """The manifest of ukis-csmask's ``bands``-band model, for inputs in which reflectance 1.0
    reads ``dn_per_input_unit`` (10000 for L1C DN, 1 for reflectance)."""
    model = f"model_{bands}b_{level}"
    meta = json.loads((ukis_csmask_dir() / f"{model}.json").read_text())
    stats = meta["data"]["dataset_statistics"]
    mean = np.asarray(stats["img"][0], np.float64)
    std = np.asarray(stats["img"][1], np.float64)
    return Manifest(
        name=name or f"ukis-csmask-{bands}b-{level}", version=meta["model"]["version"],
        task="cloud",
        input=InputSpec(bands=list(stats["band_names"]),
                        scale=(1.0 / (dn_per_input_unit * std)).tolist(),
                        offset=(-mean / std).tolist(),
                        tile_size=int(meta["data"]["target_size"][0]), gsd_m=30.0),
        output=OutputSpec(kind="classes", channels=3,
                          classes={0: "clear", 1: "cloud", 2: "shadow"},
                          description="logits; argmax over channels"),
        precision="fp32", engines={"onnxruntime": "model.onnx"},
        toolchain={"source": "ukis-csmask"},
        extra={"licence": "Apache-2.0 (dlr-eoc/ukis-csmask)"})


def ukis_csmask_bundle(path: str | Path, bands: int = 4, level: str = "l1c",
                       dn_per_input_unit: float = L1C_DN_PER_REFLECTANCE,
                       name: str | None = None) -> Path:
    """Write ukis-csmask's model as a bundle at ``path`` (never committed: ~40 MB)."""
    onnx_path = ukis_csmask_dir() / f"model_{bands}b_{level}.onnx"
    manifest = ukis_csmask_manifest(bands, level, dn_per_input_unit, name)
    return write_bundle(path, manifest, {"model.onnx": onnx_path})


def ukis_csmask_probability(image: np.ndarray, bands: int = 6, level: str = "l1c",
                            threads: int = 2) -> np.ndarray:
    """ukis-csmask's class probabilities (3, H, W: clear, cloud, shadow) for one (bands, H, W)
    TOA reflectance image in blue, green, red, nir[, swir16, swir22] order.

    The same normalisation, 256-pixel tiling with 20 % overlap and smooth blending as the
    package's ``CSmask`` (whose mask is the argmax of this), but it keeps the probabilities, so
    that a student can be trained on how sure the teacher was. Images smaller than one tile are
    reflect-padded (``CSmask`` itself only warns).
    """
    from scipy.special import softmax
    from ukis_csmask.utils import tile_array, untile_array

    from onboard.runtime.engines.onnxruntime import cpu_session

    meta = json.loads((ukis_csmask_dir() / f"model_{bands}b_{level}.json").read_text())
    stats = meta["data"]["dataset_statistics"]
    mean = np.asarray(stats["img"][0], np.float32)
    std = np.asarray(stats["img"][1], np.float32)
    size = int(meta["data"]["target_size"][0])
    h, w = image.shape[1:]
    hwc = np.ascontiguousarray(image[:bands].transpose(1, 2, 0), np.float32)
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        hwc = np.pad(hwc, ((0, ph), (0, pw), (0, 0)), mode="reflect")
    hwc = (hwc - mean) / std
    session = cpu_session(ukis_csmask_dir() / f"model_{bands}b_{level}.onnx", threads)
    name = session.get_inputs()[0].name
    tiles = np.moveaxis(tile_array(hwc, xsize=size, ysize=size, overlap=0.2), -1, 1)
    probs = np.concatenate([softmax(session.run(None, {name: tiles[i : i + 1]})[0], axis=1)
                            for i in range(len(tiles))])
    prob = untile_array(np.moveaxis(probs, 1, -1), (hwc.shape[0], hwc.shape[1], 3),
                        overlap=0.2, smooth_blending=True)
    return np.ascontiguousarray(np.moveaxis(prob, -1, 0)[:, :h, :w], np.float32)
