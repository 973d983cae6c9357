"""The change model's interface without torch: bands and normalisation, the int8 latent
codes, distances, the calibrated K-memory score and the bundle manifest. The rules are stated
in :mod:`onboard.models.change.model`'s docstring; this module is what evaluation, the zoo
entry and the bundle writer share."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CELL = 32
SUBCELLS = 16  # 8 x 8 px sub-cells of a 32 x 32 cell, each with its own latent
SUB_DIM = 8
LATENT_DIM = SUB_DIM * SUBCELLS
TILE = 256
INPUT_NAME = "input"
OUTPUT_NAME = "latent"
POSITIVE_RULE = "more than 1 % of the cell's pixels changed"
POSITIVE_FRACTION = 0.01

# Sentinel-2 L1C order, as OSCD stores them; the runtime resolves own names before common ones.
BANDS_13 = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11",
            "B12"]
BANDS_4 = ["blue", "green", "red", "nir"]
_S2_OF_4 = ["B02", "B03", "B04", "B08"]
# Per-band DN mean and standard deviation over both dates of the training cities (abudhabi,
# aguasclaras, bercy, hongkong, paris). The standard deviation has a floor of 250 DN so that
# cirrus (B10, 8 DN spread over clear land) is not amplified 30-fold: a thin cirrus veil would
# otherwise take the whole per-tensor INT8 input range.
_MEAN_DN = dict(zip(BANDS_13, [1809.0, 1663.0, 1661.0, 1824.0, 1923.0, 2238.0, 2437.0, 2324.0,
                               2550.0, 779.0, 17.0, 2522.0, 1950.0], strict=True))
_STD_DN = dict(zip(BANDS_13, [353.0, 513.0, 716.0, 1050.0, 1028.0, 980.0, 1039.0, 1037.0,
                              1095.0, 399.0, 250.0, 1408.0, 1242.0], strict=True))


def band_names(bands: int) -> list[str]:
    """The manifest's band names for the 13-band model or the 4-band (RGB+NIR) variant."""
    if bands == 13:
        return list(BANDS_13)
    if bands == 4:
        return list(BANDS_4)
    raise ValueError(f"the change model has 13-band and 4-band variants, not {bands}")


def source_bands(bands: int) -> list[str]:
    """The Sentinel-2 band names to read from an OSCD folder for a variant, in input order."""
    return list(BANDS_13) if bands == 13 else list(_S2_OF_4)


def input_scale_offset(bands: int) -> tuple[list[float], list[float]]:
    """Per-band ``scale`` and ``offset`` so that ``DN * scale + offset`` is standardised."""
    names = source_bands(bands)
    scale = [1.0 / _STD_DN[b] for b in names]
    offset = [-_MEAN_DN[b] / _STD_DN[b] for b in names]
    return scale, offset


def normalise(dn: np.ndarray, bands: int) -> np.ndarray:
    """Raw DN ``(C, H, W)`` or ``(N, C, H, W)`` -> the model input, as the runtime computes it."""
    scale, offset = input_scale_offset(bands)
    s = np.asarray(scale, np.float32).reshape(-1, 1, 1)
    o = np.asarray(offset, np.float32).reshape(-1, 1, 1)
    return (np.asarray(dn).astype(np.float32) * s + o).astype(np.float32)


# --- the scoring rule (numpy; the runtime implements the same arithmetic without torch) -------

def quantise(z: np.ndarray, latent_scale: float) -> np.ndarray:
    """int8 codes of latents, as the reference store keeps them."""
    return np.clip(np.round(np.asarray(z, np.float32) / latent_scale), -127, 127).astype(np.int8)


def dequantise(q: np.ndarray, latent_scale: float) -> np.ndarray:
    return np.asarray(q, np.float32) * np.float32(latent_scale)


def cell_distance(z1: np.ndarray, z2: np.ndarray, distance: str = "l2", axis: int = 0,
                  subcells: int = 1) -> np.ndarray:
    """Distance between latents along ``axis`` (the latent dimension).

    With ``subcells`` S > 1 the latent holds S sub-cell latents, feature-major (``D = d x S``,
    element ``f * S + s`` is feature ``f`` of sub-cell ``s``), and a cell's L2 distance is the
    largest over its sub-cells: a change a few pixels wide is not diluted by the rest of the
    cell."""
    z1, z2 = np.asarray(z1, np.float32), np.asarray(z2, np.float32)
    if distance == "l2":
        diff = np.moveaxis(z1 - z2, axis, -1)
        if diff.shape[-1] % subcells:
            raise ValueError(f"a latent of {diff.shape[-1]} values does not split into "
                             f"{subcells} sub-cells")
        diff = diff.reshape(*diff.shape[:-1], -1, subcells)
        return np.sqrt((diff ** 2).sum(-2)).max(-1)
    if distance == "cosine":
        if subcells != 1:
            raise ValueError("the cosine distance is of whole cells (subcells = 1)")
        dot = (z1 * z2).sum(axis)
        norms = np.sqrt((z1 ** 2).sum(axis) * (z2 ** 2).sum(axis))
        return 1.0 - dot / np.maximum(norms, 1e-12)
    raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")


def block_distance(z1: np.ndarray, z2: np.ndarray, change: dict[str, Any], axis: int = 0
                   ) -> np.ndarray:
    """:func:`cell_distance` as a bundle's ``extra["change"]`` block states it (distance and
    sub-cells; a block without ``subcells``, version 0.1's, has one latent per cell)."""
    return cell_distance(z1, z2, change["distance"], axis, int(change.get("subcells", 1)))


def calibrated(d: np.ndarray, a: float, b: float) -> np.ndarray:
    """The probability-like change score of a distance."""
    return (1.0 / (1.0 + np.exp(-(a * np.asarray(d, np.float64) + b)))).astype(np.float32)


def memory_score(latent: np.ndarray, references: list[np.ndarray], change: dict[str, Any]
                 ) -> np.ndarray:
    """Change score per cell of one tile against its last K references.

    ``latent`` (D, h, w) float from the engine; ``references`` int8 codes (D, h, w), newest last.
    The new latent is quantised like the references; the distance is the minimum over them.
    """
    if not references:
        raise ValueError("a cell with no reference has no change score ('new')")
    s = float(change["latent_scale"])
    z = dequantise(quantise(latent, s), s)
    d = np.min([block_distance(z, dequantise(r, s), change) for r in references], axis=0)
    return calibrated(d, change["calibration"]["a"], change["calibration"]["b"])


def change_extra(latent_scale: float, a: float, b: float, distance: str = "l2",
                 latent_dim: int = LATENT_DIM, subcells: int = SUBCELLS, **more: Any
                 ) -> dict[str, Any]:
    """The ``manifest.extra["change"]`` block the runtime reads (see the module docstring)."""
    for name, value in (("latent_scale", latent_scale), ("a", a), ("b", b)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if latent_scale <= 0:
        raise ValueError(f"latent_scale must be positive, got {latent_scale}")
    return {"distance": distance, "latent_scale": float(latent_scale),
            "calibration": {"a": float(a), "b": float(b)}, "cell_size": CELL,
            "positive_rule": POSITIVE_RULE, "memory": "min over the last K references",
            "latent_dim": int(latent_dim), "subcells": int(subcells), **more}


def manifest(bands: int, change: dict[str, Any], precision: str, engines: dict[str, str],
             version: str, metrics: dict[str, float] | None = None,
             toolchain: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
             ) -> Any:
    """The bundle manifest of a change encoder (schema 2: the output is a per-cell vector)."""
    from onboard.runtime.bundle import InputSpec, Manifest, OutputSpec

    scale, offset = input_scale_offset(bands)
    return Manifest(
        name=f"change-{bands}band", version=version, task="change",
        inputs=[InputSpec(bands=band_names(bands), dtype="float32", scale=scale, offset=offset,
                          tile_size=TILE, gsd_m=10.0, layout="NCHW", name=INPUT_NAME)],
        outputs=[OutputSpec(kind="vector", channels=int(change.get("latent_dim", LATENT_DIM)),
                            cell_size=CELL, name=OUTPUT_NAME,
                            description=f"one latent per {CELL} x {CELL} cell; change = "
                                        "calibrated min distance to the last K references")],
        precision=precision, engines=engines, metrics=metrics or {},
        toolchain=toolchain or {}, extra={"change": change, **(extra or {})})
