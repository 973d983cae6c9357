"""Two small super-resolution networks that keep their precision through INT8.

Both predict a residual over a fixed, parameter-free upsampling of their input and combine the
two in the graph. The split is what makes them quantise. ONNX Runtime's QDQ quantiser quantises
Conv, Mul, Add, DepthToSpace and their inputs, and quantises a data-movement op (Resize, Slice,
AveragePool) only when its input already is; it has no rule for Sub. So:

- the convolution body sees the input through an in-graph centring (``Sub``, then ``Mul``):
  the raw input tensor itself is never quantised;
- the skip (bicubic ``Resize`` for ×2; for sharpening, bicubic upsampling of the
  nearest-resampled 20 m bands as a fixed 7-tap filter) reads that float input and stays float;
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

from onboard.models.superres import FIT_WINDOW

# Reflectance statistics of the training scenes, rounded: a fixed centring for the body input.
MEAN_10 = (0.12, 0.11, 0.11, 0.20)
MEAN_20 = (0.13, 0.18, 0.20, 0.22, 0.22, 0.16)
SPREAD = 0.08
# What the body sees of its input and may add, in units of SPREAD: the INT8 ranges follow these
# bounds instead of the rare saturated pixel (a 2.8-reflectance cloud top set a 114 DN input
# step without them). Pixels outside keep their value through the float skip.
INPUT_RANGE = (-3.0, 6.0)
RESIDUAL_LIMIT = 3.0  # 0.24 reflectance, 2400 DN
X2_DEPTH = 4


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
        self.body_depth = depth
        self.shuffle = nn.PixelShuffle(2)

    def load_shallower(self, state: dict[str, torch.Tensor]) -> None:
        """Start from a shallower model's weights with the same function (Net2DeeperNet):
        the extra 3 x 3 convolutions go after its last one as identities, which the ReLU after
        them keeps exact, since their input is already a ReLU's output (non-negative)."""
        convs = [i for i, layer in enumerate(self.body.features) if isinstance(layer, nn.Conv2d)]
        own = self.state_dict()
        given = sorted({int(k.split(".")[2]) for k in state if k.startswith("body.features.")})
        for index in convs[len(given):]:
            conv = self.body.features[index]
            identity = torch.zeros_like(conv.weight)
            for channel in range(conv.out_channels):
                identity[channel, channel, 1, 1] = 1.0
            state = {**state, f"body.features.{index}.weight": identity,
                     f"body.features.{index}.bias": torch.zeros_like(conv.bias)}
        if set(state) != set(own):
            raise ValueError(f"cannot grow a model with {sorted(set(state) ^ set(own))}")
        self.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        residual = self.shuffle(self.body(_centred(x, self.mean)))
        return skip - residual / (-1.0 / SPREAD)  # Div and Sub stay float: see the docstring


# Keys' cubic (a = -0.5, PIL's BICUBIC) at the two quarter-pixel offsets of a 2 x 2 nearest-
# resampled grid, folded into one symmetric 7-tap filter: on such a grid it equals bicubic
# upsampling of the coarse samples, whatever the phase of the blocks (a tile may start on an odd
# pixel). Outer to centre: h3 = w(1.75), h2 = w(1.25) - h3, h1 = w(0.75) - h2, h0 = w(0.25) - h1,
# which is [-3, -6, 35, 76, 35, -6, -3] / 128.
PAIRS_BICUBIC = (-3 / 128, -6 / 128, 35 / 128, 76 / 128, 35 / 128, -6 / 128, -3 / 128)


def pairs_bicubic_kernels(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The vertical and horizontal depthwise kernels of :func:`bicubic_on_pairs`."""
    taps = torch.tensor(PAIRS_BICUBIC, dtype=torch.float32)
    return (taps.view(1, 1, 7, 1).repeat(channels, 1, 1, 1),
            taps.view(1, 1, 1, 7).repeat(channels, 1, 1, 1))


def bicubic_on_pairs(x: torch.Tensor,
                     kernels: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Bicubic upsampling of a grid that was nearest-resampled 2 x 2 onto this one, computed on
    this grid: a fixed separable 7-tap filter (``PAIRS_BICUBIC``), edges replicated. ONNX:
    ``Pad`` (edge) and a depthwise ``Conv`` with constant weights, outside ``/body/``.
    ``kernels`` (a module's constant buffers, so that the exporter sees their shape) default
    to :func:`pairs_bicubic_kernels` of ``x``'s channels."""
    c = x.shape[1]
    vertical, horizontal = kernels or pairs_bicubic_kernels(c)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), vertical.to(x.dtype), groups=c)
    return F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), horizontal.to(x.dtype), groups=c)


def _smooth3(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 mean, edges averaged over what is inside the image."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _box2(x: torch.Tensor) -> torch.Tensor:
    """The mean of the 2 x 2 block starting at every pixel: a 20 m average that does not depend
    on where a tile starts (the phase of the 2 x 2 blocks)."""
    return F.avg_pool2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), 2, stride=1)


def _cholesky_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for symmetric positive definite ``a`` (N, k, k, ...) and ``b``
    (N, k, m, ...), one system per trailing position, unrolled for the small fixed k: ONNX has
    no linear solver, and this exports as Sqrt, Mul, Sub and Div that every engine runs in
    float."""
    k = a.shape[1]
    low: list[list[torch.Tensor]] = [[] for _ in range(k)]
    for i in range(k):
        for j in range(i + 1):
            s = a[:, i, j]
            for p in range(j):
                s = s - low[i][p] * low[j][p]
            low[i].append(torch.sqrt(torch.clamp(s, min=1e-12)) if i == j else s / low[j][j])
    forward: list[torch.Tensor] = []
    for i in range(k):
        s = b[:, i]
        for p in range(i):
            s = s - low[i][p][:, None] * forward[p]
        forward.append(s / low[i][i][:, None])
    solution: list[torch.Tensor] = [forward[0]] * k
    for i in reversed(range(k)):
        s = forward[i]
        for p in range(i + 1, k):
            s = s - low[p][i][:, None] * solution[p]
        solution[i] = s / low[i][i][:, None]
    return torch.stack(solution, 1)


# Ridge of the fit: relative to the window's variance of the 10 m bands, plus an absolute floor
# (20 DN of texture): a flat window (water, a cloud deck) gets small coefficients, not a fit to
# noise.
RIDGE = 1e-3
RIDGE_FLOOR = 4e-6
COEFFICIENT_LIMIT = 4.0


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    # Separable box: two 1-D AveragePools cost 2 x 31 adds a pixel, not 31 x 31.
    r = FIT_WINDOW // 2
    x = F.avg_pool2d(x, (FIT_WINDOW, 1), stride=1, padding=(r, 0), count_include_pad=False)
    return F.avg_pool2d(x, (1, FIT_WINDOW), stride=1, padding=(0, r), count_include_pad=False)


def local_detail(fine: torch.Tensor, coarse_low: torch.Tensor,
                 fine_mean: torch.Tensor, coarse_mean: torch.Tensor) -> torch.Tensor:
    """Detail injection fitted in a window around every pixel (a guided filter with the four
    10 m bands as guide): each 20 m band's low-pass regressed, with a constant, on the 10 m
    bands' low-pass over the window; the coefficients then carry the 10 m bands' high-pass onto
    that 20 m band. Returns the injected detail, (N, 6, H, W).

    What a convolution cannot do by itself: the spectral relation between the bands changes
    from scene to scene and field to field, and the fit reads it from the data. It depends only
    on the window, so a tiled run agrees with a whole-image one. Inputs are centred on fixed
    band means first, for float32's sake."""
    fine_low = _smooth3(_box2(fine))
    f = fine_low - fine_mean
    c = coarse_low - coarse_mean
    k, m = f.shape[1], c.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    products = [f[:, i] * f[:, j] for i, j in pairs] + [
        f[:, i] * c[:, j] for i in range(k) for j in range(m)]
    means = _window_mean(torch.cat([f, c, torch.stack(products, 1)], 1))
    mf, mc = means[:, :k], means[:, k:k + m]
    second = means[:, k + m:]
    gram_entries = {pair: second[:, n] - mf[:, pair[0]] * mf[:, pair[1]]
                    for n, pair in enumerate(pairs)}
    variance = sum(gram_entries[(i, i)] for i in range(k)) / k
    ridge = RIDGE * variance + RIDGE_FLOOR
    gram = torch.stack([torch.stack([
        gram_entries[(min(i, j), max(i, j))] + (ridge if i == j else 0.0)
        for j in range(k)], 1) for i in range(k)], 1)
    cross = second[:, len(pairs):].reshape(f.shape[0], k, m, *f.shape[2:]) - (
        mf[:, :, None] * mc[:, None, :])
    beta = torch.clamp(_cholesky_solve(gram, cross), -COEFFICIENT_LIMIT, COEFFICIENT_LIMIT)
    high = fine - fine_low
    return (beta * high[:, :, None]).sum(1)


class Sharpen20(nn.Module):
    """Guided 20 m -> 10 m sharpening: input the four 10 m and six 20 m bands on the 10 m grid
    (20 m bands nearest-resampled), output the six 20 m bands sharpened, (N, 10, H, W) ->
    (N, 6, H, W). Works on the 2:1 ratio of the grids, not on metres.

    ``guided`` (version 0.2) adds a detail injection fitted around each pixel
    (``local_detail``): the body sees it as six more input channels and the skip carries a
    learned share of it per band; the fit and the skip stay float (the compiler quantises only
    ``/body/`` nodes). ``skip`` "bicubic" (0.3) is bicubic upsampling of the 20 m bands
    (``bicubic_on_pairs``); "smooth3" (0.1, 0.2) their 3 x 3 mean, 1.1-2.5 dB blurrier."""

    def __init__(self, width: int = 40, depth: int = 5, guided: bool = True,
                 skip: str = "bicubic") -> None:
        super().__init__()
        if skip not in ("bicubic", "smooth3"):
            raise ValueError(f"skip must be 'bicubic' or 'smooth3', got {skip!r}")
        self.scale = 1
        self.guided = guided
        self.skip = skip
        self.register_buffer("mean", torch.tensor(MEAN_10 + MEAN_20).view(1, 10, 1, 1))
        vertical, horizontal = pairs_bicubic_kernels(6)
        self.register_buffer("skip_vertical", vertical, persistent=False)
        self.register_buffer("skip_horizontal", horizontal, persistent=False)
        self.body = _Body(16 if guided else 10, width, depth, 6, 3)
        if guided:
            self.detail_share = nn.Parameter(torch.zeros(1, 6, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = _smooth3(x[:, 4:10])
        skip = low if self.skip == "smooth3" else bicubic_on_pairs(
            x[:, 4:10], (self.skip_vertical, self.skip_horizontal))
        features = _centred(x, self.mean)
        if self.guided:
            detail = local_detail(x[:, :4], low, self.mean[:, :4], self.mean[:, 4:])
            features = torch.cat([features, torch.clamp(detail / SPREAD, -RESIDUAL_LIMIT,
                                                        RESIDUAL_LIMIT)], 1)
            skip = skip + detail * self.detail_share  # float: outside /body/
        return skip - self.body(features) / (-1.0 / SPREAD)  # float: see above

    def load_unguided(self, state: dict[str, torch.Tensor]) -> None:
        """Start from version 0.1's weights: the six new input channels and the detail share at
        zero, so the network begins exactly where 0.1 ended."""
        first = "body.features.0.weight"
        grown = torch.zeros_like(self.body.features[0].weight)
        grown[:, : state[first].shape[1]] = state[first]
        self.load_state_dict({**state, first: grown,
                              "detail_share": torch.zeros_like(self.detail_share)})


def build_x2(depth: int | None = None) -> SuperRes2x:
    return SuperRes2x(depth=depth or X2_DEPTH)


def build_sharpen() -> Sharpen20:
    return Sharpen20()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
