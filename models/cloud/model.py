"""CloudNet: a tiny fully-convolutional clear / cloud / shadow classifier.

Two paths, sized for ~1500 multiply-accumulates per pixel so that it runs at tens of Mpx/s on two
CPU cores:

* a full-resolution per-pixel path (1x1 convolutions only) that keeps cloud edges sharp, and
* a context path that starts from a 4x4 average of the input and goes down to 1/16 resolution,
  where 3x3 convolutions see far enough (hundreds of metres) to tie a shadow to its cloud.

The context is brought back up with nearest-neighbour resizes, to full resolution too, and added
to the per-pixel features, which keep the edges sharp. Nearest rather than bilinear for the last
4x resize: it is a copy that OpenVINO runs in INT8, where a bilinear resize at full resolution
stays in f32 and took 40 % of the INT8 model's time (measured, compile/README.md). Only Conv,
ReLU, Add, Concat, Resize and AveragePool are used, so the graph exports to ONNX opset 17 and
quantises to INT8 (QDQ) cleanly; ``onboard compile`` (``onboard.compile.export``) is the one
exporter. Input: TOA reflectance (DN x 1e-4 for Sentinel-2 L1C), height
and width multiples of 16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 3


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation)


class CloudNet(nn.Module):
    def __init__(self, in_bands: int = 4, width: int = 24, upsample: str = "nearest",
                 pixel_kernel: int = 1, input_mean: list[float] | None = None,
                 input_std: list[float] | None = None) -> None:
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        if pixel_kernel not in (1, 3):
            raise ValueError(f"pixel_kernel must be 1 or 3, got {pixel_kernel}")
        w = width
        self.in_bands = in_bands
        self.upsample = upsample
        # Full resolution: per pixel, or (pixel_kernel 3) with its 8 neighbours, which lets a
        # pixel at a cloud's edge overrule the context's 4 x 4 blocks.
        self.pix = _conv(in_bands, w, pixel_kernel)
        # A measured lever only (train --normalise dataset): the peer's habit of z-scoring the
        # input with its training set's statistics. The shipped models take reflectance as is.
        self.normalise = input_mean is not None and input_std is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(input_mean).reshape(1, -1, 1, 1))
            self.register_buffer("std", torch.tensor(input_std).reshape(1, -1, 1, 1))
        self.pix2 = _conv(w, w, 1)
        self.head = _conv(w, NUM_CLASSES, 1)
        # Context: 1/4 -> 1/8 -> 1/16 and back to 1/4.
        self.pool = nn.AvgPool2d(4)
        self.e4 = _conv(in_bands, w, 3)
        self.e8 = _conv(w, w * 3 // 2, 3, stride=2)
        self.e8b = _conv(w * 3 // 2, w * 3 // 2, 3)
        self.e16 = _conv(w * 3 // 2, 2 * w, 3, stride=2)
        self.e16b = _conv(2 * w, 2 * w, 3)
        self.e16c = _conv(2 * w, 2 * w, 3, dilation=2)
        self.d8 = _conv(2 * w + w * 3 // 2, w * 3 // 2, 1)
        self.d4 = _conv(w * 3 // 2 + w, w, 1)
        self.ctx = _conv(w, w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = F.relu
        if self.normalise:
            x = (x - self.mean) / self.std
        c4 = relu(self.e4(self.pool(x)))
        c8 = relu(self.e8b(relu(self.e8(c4))))
        c16 = relu(self.e16c(relu(self.e16b(relu(self.e16(c8))))))
        up = F.interpolate(c16, scale_factor=2.0, mode="nearest")
        d8 = relu(self.d8(torch.cat([up, c8], 1)))
        up = F.interpolate(d8, scale_factor=2.0, mode="nearest")
        d4 = self.ctx(relu(self.d4(torch.cat([up, c4], 1))))
        if self.upsample == "bilinear":
            ctx = F.interpolate(d4, scale_factor=4.0, mode="bilinear", align_corners=False)
        else:
            ctx = F.interpolate(d4, scale_factor=4.0, mode="nearest")
        h = relu(self.pix2(relu(self.pix(x) + ctx)))
        return self.head(h)


def build(in_bands: int = 4, upsample: str = "nearest", width: int = 24,
          pixel_kernel: int = 1, input_mean: list[float] | None = None,
          input_std: list[float] | None = None) -> CloudNet:
    return CloudNet(in_bands=in_bands, width=width, upsample=upsample,
                    pixel_kernel=pixel_kernel, input_mean=input_mean, input_std=input_std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_pixel(model: CloudNet) -> float:
    """Multiply-accumulates per input pixel (convolutions only)."""
    total = 0.0
    size = 64
    shapes: dict[str, float] = {}

    def hook(name: str) -> Any:
        def fn(module: nn.Conv2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            k = module.kernel_size[0] * module.kernel_size[1]
            shapes[name] = output.numel() * module.in_channels * k / module.groups
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, model.in_bands, size, size))
    for h in handles:
        h.remove()
    total = sum(shapes.values())
    return total / (size * size)
