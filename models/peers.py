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
