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
  ``D``-dimensional latent (``D`` = :data:`LATENT_DIM`) per 32 x 32 pixel cell (320 m at 10 m).
  Fully convolutional with stride 32, so a cell's latent depends only on pixels around it, not on
  where the tile window starts (up to the zero padding at window edges).
* ``manifest.extra["change"]`` (:func:`change_extra`)::

      {"distance": "l2",            # or "cosine"; between dequantised latents of one cell
       "latent_scale": s,           # int8 codes q = clip(round(z / s), -127, 127); z ~ q * s
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

The network uses only Conv, ReLU and stride-2 downsampling (batch norm folds into the
convolutions at export), so it exports to ONNX opset 17 and quantises to INT8 cleanly.
"""

from __future__ import annotations

from pathlib import Path

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
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ChangeEncoder(nn.Module):
    """Five stride-2 3x3 stages (1/2 ... 1/32) and a 1x1 projection to the latent.

    About 80 M multiply-accumulates per 256 x 256 tile (1.2 k per input pixel).
    """

    def __init__(self, in_bands: int = 13, latent_dim: int = LATENT_DIM,
                 widths: tuple[int, ...] = (24, 32, 48, 64, 64)) -> None:
        super().__init__()
        self.in_bands = in_bands
        self.latent_dim = latent_dim
        layers: list[nn.Module] = []
        cin = in_bands
        for i, width in enumerate(widths):
            layers.append(_ConvBN(cin, width, stride=2))
            if i in (2, 3):  # 1/8 and 1/16: a second conv where cells start to see context
                layers.append(_ConvBN(width, width))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, latent_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PairHead(nn.Module):
    """Training only: the logistic link from a cell's latent distance to "changed"."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0))
        self.b = nn.Parameter(torch.tensor(-2.0))

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        d = torch.sqrt(((z1 - z2) ** 2).sum(1) + 1e-6)
        return self.a * d + self.b


def build(bands: int = 13) -> ChangeEncoder:
    return ChangeEncoder(in_bands=bands)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- export and bundle ------------------------------------------------------------------------

def export_onnx(model: ChangeEncoder, path: Path, tile: int = TILE) -> Path:
    """ONNX opset 17 with the interface's tensor names; batch, height and width are free."""
    import warnings

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.zeros(1, model.in_bands, tile, tile)
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


