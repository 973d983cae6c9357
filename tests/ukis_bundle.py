"""Bundles built from a real trained cloud model, for the bundle and engine tests.

The ``ukis-csmask`` package ships ONNX U-Nets (EfficientNet-B4 encoder) trained on Sentinel-2 to
segment clear / cloud / cloud shadow. They are ~40 MB each and are never committed: the tests
build bundles from them in their tmp_path and skip without the package.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from onboard.runtime.bundle import Manifest, write_bundle

MODEL = "model_4b_l1c"
# Sentinel-2 L1C digital numbers are reflectance x 10000.
DN_PER_REFLECTANCE = 10000.0


def _package_dir() -> Path:
    ukis = pytest.importorskip("ukis_csmask", reason="ukis-csmask (the real test model) is not "
                               "installed: pip install ukis-csmask")
    return Path(ukis.__file__).parent


@functools.lru_cache(maxsize=2)
def onnx_bytes(dynamic_tiles: bool = True) -> bytes:
    """The model's ONNX; with ``dynamic_tiles`` its fixed 256x256 input made H x W dynamic.

    The U-Net is fully convolutional, so smaller tiles keep the tests fast.
    """
    path = _package_dir() / f"{MODEL}.onnx"
    if not dynamic_tiles:
        return path.read_bytes()
    onnx = pytest.importorskip("onnx", reason="onnx is needed to relax the test model's shape")
    model = onnx.load(path)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "height", "width"
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def openvino_ir(dynamic_tiles: bool = True) -> tuple[bytes, bytes]:
    """(xml, bin) of the model as OpenVINO IR, weights kept in fp32."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    import tempfile

    model = ov.Core().read_model(onnx_bytes(dynamic_tiles))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        # save_model compresses weights to fp16 unless told not to.
        ov.save_model(model, xml, compress_to_fp16=False)
        return xml.read_bytes(), xml.with_suffix(".bin").read_bytes()


def manifest(engines: dict[str, str] | None = None, **changes: object) -> Manifest:
    """The manifest of the ukis 4-band L1C model, for inputs in Sentinel-2 DN."""
    pytest.importorskip("ukis_csmask", reason="ukis-csmask (the real test model) is not "
                        "installed: pip install ukis-csmask")
    from onboard.models.peers import ukis_csmask_manifest

    base = ukis_csmask_manifest(4, "l1c", DN_PER_REFLECTANCE)
    base.output.classes = {0: "clear", 1: "cloud", 2: "cloud shadow"}
    fields: dict[str, object] = {"engines": engines or {"onnxruntime": "model.onnx"}, **changes}
    return replace(base, **fields)  # type: ignore[arg-type]


def build(path: Path, *, openvino: bool = False, dynamic_tiles: bool = True,
          **changes: object) -> Path:
    """Write a bundle of the model at ``path``: ONNX, and the OpenVINO IR if asked."""
    members: dict[str, bytes | Path] = {"model.onnx": onnx_bytes(dynamic_tiles)}
    engines = {"onnxruntime": "model.onnx"}
    if openvino:
        xml, weights = openvino_ir(dynamic_tiles)
        members.update({"model.xml": xml, "model.bin": weights})
        engines["openvino"] = "model.xml"
    engines = changes.pop("engines", engines)  # type: ignore[assignment]
    return write_bundle(path, manifest(engines, **changes), members)


def ukis_tiles(test_data: Path, size: int = 64) -> np.ndarray:
    """Real Sentinel-2 tiles (N, 4, size, size) in DN from the committed ukis crop."""
    img = np.load(test_data / "ukis_6band_crop.npz")["img"]  # (128, 128, 6) reflectance
    chw = np.moveaxis(img[:, :, :4], -1, 0) * DN_PER_REFLECTANCE
    tiles = [chw[:, y:y + size, x:x + size] for y in range(0, 128 - size + 1, size)
             for x in range(0, 128 - size + 1, size)]
    return np.stack(tiles).astype(np.float32)


def ukis_labels(test_data: Path) -> np.ndarray:
    """The crop's reference mask mapped to the model's classes (0 clear, 1 cloud, 2 shadow)."""
    from onboard.models.cloud.dataset import ukis_labels as remap

    return remap(np.load(test_data / "ukis_6band_crop.npz")["msk"][:, :, 0])
