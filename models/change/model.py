"""ChangeEncoder: a tiny siamese encoder whose latent distance scores change, and its bundle.

The interface the flight runtime relies on (the change stage and the reference store):

* **Bundle** (task ``"change"``): an *encoder* run on each tile window on its own. One input
  named ``"input"``, float32 ``(N, C, H, W)``, normalised with the manifest's per-band
  ``scale``/``offset`` (model input = ``DN * scale + offset``: a per-band standardisation fitted
  on the training cities); ``C`` = 13 Sentinel-2 bands in L1C order (``B01`` ... ``B12``,
  ``B8A`` after ``B08``, named by their own names because the three red-edge bands share one
  common name), or 4 for the RGB+NIR variant (``blue``, ``green``, ``red``, ``nir``). ``H`` and
  ``W`` are multiples of 32 (``tile_size`` 256 in the manifest; the graph takes any multiple).
  One output named ``"latent"``, kind ``vector``, ``cell_size`` 32: ``(N, D, H/32, W/32)``, one
  ``D``-long latent (``D`` = :data:`LATENT_DIM` = 8 x 16) per 32 x 32 pixel cell (320 m at
  10 m): the 8-long latents of its 16 sub-cells of 8 x 8 px, feature-major (element
  ``f * 16 + s`` is feature ``f`` of sub-cell ``s = 4 * row + column``). Fully convolutional
  with stride 8 and sub-cells grouped by 4 x 4, so a cell's latent depends only on pixels
  around it, not on where a tile window on the cell grid starts (up to the zero padding at
  window edges).
* ``manifest.extra["change"]`` (:func:`change_extra`)::

      {"distance": "l2",            # or "cosine"; between dequantised latents of one cell
       "latent_scale": s,           # int8 codes q = clip(round(z / s), -127, 127); z ~ q * s
       "subcells": 16,              # a cell's distance: the largest of its sub-cells' L2
       "calibration": {"a": a, "b": b},   # score = sigmoid(a * d + b), d the distance
       "cell_size": 32,
       "positive_rule": "more than 1 % of the cell's pixels changed",
       "memory": "min over the last K references", "latent_dim": D}

* **Scoring** (:func:`memory_score`): the store keeps the int8 codes of the last K clear
  observations of each cell. The change score of a cell is the *minimum* distance between the new
  latent and each stored reference (RaVAEn's memory variant: a cell that looks like any recent
  clear view of itself has not changed; one bad reference, a hazy or misregistered one, cannot
  raise the score), then the calibration maps it to a probability-like score in [0, 1] that is
  comparable across scenes and dates: it was fitted by logistic regression of "the cell changed"
  on the distance over the training cities (OSCD labels, more than 1 % of its pixels changed).
  The runtime quantises the new latent exactly as the references were before measuring the
  distance, so scores do not depend on whether a latent came from the store or the engine.

The network uses only Conv, ReLU, one 4 x 4 average pool and the final ``pixel_unshuffle``
(Reshape and Transpose); batch norm folds into the convolutions at export, so it exports to ONNX
opset 17 and quantises to INT8 cleanly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from onboard.models.change.scoring import (  # noqa: F401  (the interface, re-exported)
    BANDS_4,
    BANDS_13,
    CELL,
    INPUT_NAME,
    LATENT_DIM,
    OUTPUT_NAME,
    POSITIVE_FRACTION,
    POSITIVE_RULE,
    SUB_DIM,
    SUBCELLS,
    TILE,
    band_names,
    calibrated,
    cell_distance,
    change_extra,
    dequantise,
    input_scale_offset,
    manifest,
    memory_score,
    normalise,
    quantise,
    source_bands,
)


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2,
                                   bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ChangeEncoder(nn.Module):
    """Per-pixel spectral features, averaged over 4 x 4 px, context at 1/4 and 1/8, and one
    ``sub_dim``-long latent per 8 x 8 px sub-cell; a 32 x 32 cell's latent is its 16 sub-cells'
    (:data:`SUBCELLS`), feature-major (``pixel_unshuffle``: element ``f * 16 + s`` is feature
    ``f`` of sub-cell ``s``, ``s = 4 * row + column``).

    Why sub-cells: a cell is changed when more than 1 % of it (ten pixels) changed, and a cell
    latent dilutes a change that small in the rest of the cell; the distance is the largest over
    the sub-cells. About 4.6 k multiply-accumulates per input pixel (300 M per 256 x 256 tile).
    """

    def __init__(self, in_bands: int = 13, sub_dim: int = SUB_DIM, width: int = 32,
                 ignore_bands: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.in_bands = in_bands
        # A lever measured on the folds (``train.py --ignore-bands``): these input bands are
        # multiplied by zero, so the encoder cannot read them.
        self.ignore_bands = tuple(ignore_bands)
        if self.ignore_bands:
            mask = torch.ones(1, in_bands, 1, 1)
            mask[:, list(self.ignore_bands)] = 0.0
            self.register_buffer("band_mask", mask, persistent=False)
        self.latent_dim = sub_dim * SUBCELLS
        self.spectral = nn.Sequential(_ConvBN(in_bands, width, kernel=1),
                                      _ConvBN(width, width, kernel=1))
        self.pool = nn.AvgPool2d(4)
        self.context = nn.Sequential(_ConvBN(width, 48), _ConvBN(48, 48),
                                     _ConvBN(48, 64, stride=2), _ConvBN(64, 64))
        self.head = nn.Conv2d(64, sub_dim, 1)

    def subcell_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, sub_dim, H/8, W/8): one latent per 8 x 8 px sub-cell."""
        if self.ignore_bands:
            x = x * self.band_mask
        return self.head(self.context(self.pool(self.spectral(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_unshuffle(self.subcell_latents(x), CELL // 8)


def subcell_distances(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """(N, S, h, w) L2 distance of each sub-cell between two (N, d x S, h, w) cell latents."""
    n, dim, h, w = z1.shape
    squared = ((z1 - z2) ** 2).view(n, dim // SUBCELLS, SUBCELLS, h, w).sum(1)
    return torch.sqrt(squared + 1e-6)


class PairHead(nn.Module):
    """Training only: a logistic link from a latent distance to "changed"."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-2.0))

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return self.a * distance + self.b


def build(bands: int = 13, ignore_bands: Sequence[str] = ()) -> ChangeEncoder:
    """The encoder of a variant; ``ignore_bands`` (band names, as the calibration file lists
    them) are multiplied by zero at its input."""
    names = band_names(bands)
    unknown = [b for b in ignore_bands if b not in names]
    if unknown:
        raise ValueError(f"ignore_bands: {unknown} are not bands of the {bands}-band model "
                         f"{names}")
    return ChangeEncoder(in_bands=bands, ignore_bands=tuple(names.index(b) for b in ignore_bands))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
