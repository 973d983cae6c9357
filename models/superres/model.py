"""Two small super-resolution networks that keep their precision through INT8.

Both predict a residual over a fixed, parameter-free upsampling of their input and combine the
two in the graph. The split is what makes them quantise. ONNX Runtime's QDQ quantiser quantises
Conv, Mul, Add, DepthToSpace and their inputs, and quantises a data-movement op (Resize, Slice,
AveragePool) only when its input already is; it has no rule for Sub. So:

- the convolution body sees the input through an in-graph centring (``Sub``, then ``Mul``):
  the raw input tensor itself is never quantised;
- the skip (bicubic ``Resize`` for ×2; a 3 × 3 average of the nearest-resampled 20 m bands for
  sharpening) reads that float input and stays float;
- the body's last convolution carries only the residual, a small range, so its 8-bit step is a
  few DN;
- the residual is combined with the skip by a ``Sub`` of the negated residual, which stays
  float. An ``Add`` there would be quantised, inputs and output, putting the whole reflectance
  range (0 to ~1.5) on 256 steps: ~60 DN, more than 0.2 dB at these PSNRs.

The body works in units of ``SPREAD`` (its input is centred and divided by it, its residual
multiplied by it), so weights and activations are O(1) and Adam's steps fit them.

Ops: Conv, ReLU, DepthToSpace (PixelShuffle), Resize (cubic), AveragePool, Slice, Sub, Mul:
ONNX opset 17; ONNX Runtime, OpenVINO and TensorRT run them all. Input and output are top of
atmosphere reflectance (Sentinel-2 L1C DN × 1e-4).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# Reflectance statistics of the training scenes, rounded: a fixed centring for the body input.
MEAN_10 = (0.12, 0.11, 0.11, 0.20)
MEAN_20 = (0.13, 0.18, 0.20, 0.22, 0.22, 0.16)
SPREAD = 0.08
# What the body sees of its input and may add, in units of SPREAD: the INT8 ranges follow these
# bounds instead of the rare saturated pixel (a 2.8-reflectance cloud top set a 114 DN input
# step without them). Pixels outside keep their value through the float skip.
INPUT_RANGE = (-3.0, 6.0)
RESIDUAL_LIMIT = 3.0  # 0.24 reflectance, 2400 DN


def _conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class _Body(nn.Module):
    """conv k×k + ReLU, then ``depth`` conv 3×3 + ReLU, then a linear conv 3×3 to ``out``."""

    def __init__(self, cin: int, width: int, depth: int, out: int, first_kernel: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(cin, width, first_kernel), nn.ReLU()]
        for _ in range(depth):
            layers += [_conv(width, width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.tail = _conv(width, out)
        # Start near "residual zero": the network begins close to its skip path.
        with torch.no_grad():
            self.tail.weight.mul_(0.1)
            self.tail.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.tail(self.features(x)), -RESIDUAL_LIMIT, RESIDUAL_LIMIT)


def _centred(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    # Div, not Mul: the quantiser has no rule for Div (nor Sub), so the Clip after it is float
    # and the first Conv quantises the clipped range; a Mul would be quantised on the full one.
    return torch.clamp((x - mean) / SPREAD, *INPUT_RANGE)


class SuperRes2x(nn.Module):
    """×2 single-image super-resolution of ``bands`` bands: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, bands: int = 4, width: int = 32, depth: int = 4,
                 mean: tuple[float, ...] = MEAN_10) -> None:
        super().__init__()
        self.scale = 2
        self.register_buffer("mean", torch.tensor(mean[:bands]).view(1, bands, 1, 1))
        self.body = _Body(bands, width, depth, bands * 4, 5)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        residual = self.shuffle(self.body(_centred(x, self.mean)))
        return skip - residual / (-1.0 / SPREAD)  # Div and Sub stay float: see the docstring


class Sharpen20(nn.Module):
    """Guided 20 m -> 10 m sharpening: input the four 10 m and six 20 m bands on the 10 m grid
    (20 m bands nearest-resampled), output the six 20 m bands sharpened, (N, 10, H, W) ->
    (N, 6, H, W). Works on the 2:1 ratio of the grids, not on metres."""

    def __init__(self, width: int = 40, depth: int = 5) -> None:
        super().__init__()
        self.scale = 1
        self.register_buffer("mean", torch.tensor(MEAN_10 + MEAN_20).view(1, 10, 1, 1))
        self.body = _Body(10, width, depth, 6, 3)
        self.smooth = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.smooth(x[:, 4:10])
        return skip - self.body(_centred(x, self.mean)) / (-1.0 / SPREAD)  # float: see above


def build_x2() -> SuperRes2x:
    return SuperRes2x()


def build_sharpen() -> Sharpen20:
    return Sharpen20()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
