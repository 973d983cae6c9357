"""PSNR, SSIM and SAM, and the classical baselines every model is measured against.

Peaks are in the data's own units: 10000 DN (reflectance 1.0) for Sentinel-2 L1C, 2047 for the
11-bit WorldView pan crops. Baselines resample float32 planes with PIL (bicubic, Lanczos), the
reference the issue fixes (scipy's cubic zoom is about 1 dB weaker and would flatter a model).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter


def psnr(estimate: np.ndarray, truth: np.ndarray, peak: float) -> float:
    mse = float(np.mean((np.asarray(estimate, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def psnr_bands(estimate: np.ndarray, truth: np.ndarray, peak: float) -> list[float]:
    return [psnr(e, t, peak) for e, t in zip(estimate, truth, strict=True)]


def ssim(estimate: np.ndarray, truth: np.ndarray, peak: float, sigma: float = 1.5) -> float:
    """Mean SSIM of one plane (Wang et al. 2004: Gaussian window σ 1.5, K1 0.01, K2 0.03)."""
    x, y = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = gaussian_filter(x, sigma), gaussian_filter(y, sigma)
    sxx = gaussian_filter(x * x, sigma) - mx * mx
    syy = gaussian_filter(y * y, sigma) - my * my
    sxy = gaussian_filter(x * y, sigma) - mx * my
    index = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(index.mean())


def ssim_bands(estimate: np.ndarray, truth: np.ndarray, peak: float) -> list[float]:
    return [ssim(e, t, peak) for e, t in zip(estimate, truth, strict=True)]


def sam_degrees(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Mean spectral angle (degrees) between (C, H, W) estimate and truth, per pixel."""
    e = np.asarray(estimate, np.float64).reshape(estimate.shape[0], -1)
    t = np.asarray(truth, np.float64).reshape(truth.shape[0], -1)
    dot = (e * t).sum(0)
    norms = np.linalg.norm(e, axis=0) * np.linalg.norm(t, axis=0)
    ok = norms > 0
    cos = np.clip(dot[ok] / norms[ok], -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def resize(image: np.ndarray, factor: int, method: str = "bicubic") -> np.ndarray:
    """(C, H, W) -> (C, H·f, W·f) with PIL on float32 planes."""
    resample = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}[method]
    h, w = image.shape[1:]
    return np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
                   .resize((w * factor, h * factor), resample), np.float32)
        for plane in image])


def _area_down(image: np.ndarray, factor: int) -> np.ndarray:
    c, h, w = image.shape
    return image.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def detail_injection(coarse: np.ndarray, fine: np.ndarray, factor: int = 2) -> np.ndarray:
    """High-pass detail injection: ``coarse`` (C, h, w) onto ``fine``'s grid (K, h·f, w·f).

    Each coarse band is fitted by least squares (with a constant) on the fine bands averaged to
    the coarse grid; the fit's coefficients then carry the fine bands' high frequencies (fine
    minus its own bicubic-upsampled average) onto the bicubic upsampling of the coarse band.
    No learning beyond the per-scene fit.
    """
    fine_low = _area_down(fine, factor)
    design = np.concatenate([fine_low.reshape(len(fine), -1),
                             np.ones((1, fine_low[0].size))]).T
    detail = fine - resize(fine_low.astype(np.float32), factor)
    out = resize(coarse.astype(np.float32), factor)
    for band in range(len(coarse)):
        coefficients, *_ = np.linalg.lstsq(design, coarse[band].reshape(-1), rcond=None)
        out[band] += np.tensordot(coefficients[:-1], detail, axes=1).astype(np.float32)
    return out
