"""Candidate operations of the DARTS and NAS-Bench-201 cell spaces.

One registry, ``OPS: name -> factory(C_in, C_out, stride, affine) -> nn.Module``, holds both
spaces' primitives. Where the two papers disagree on a building block the registry keeps both
under distinct names (DARTS' ``sep_conv_*``/``dil_conv_*`` are ReLU-Conv-BN without bias;
NAS-Bench-201's ``nor_conv_*`` follow the benchmark's ``ReLUConvBN`` with ``bias=not affine``).

References: Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019;
Dong, Yang, "NAS-Bench-201", ICLR 2020.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DARTS_PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
NB201_PRIMITIVES = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


class ReLUConvBN(nn.Sequential):
    """ReLU -> Conv -> BN, the order both papers use for every conv candidate."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation=1, affine=True, bias=False):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride, padding, dilation, bias=bias),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        """``relu_x``: ``relu(x)`` already made (a node's shared ReLU, see oneshot/mixed.py)."""
        return self[2](self[1](self[0](x) if relu_x is None else relu_x))

    @property
    def first_relu(self) -> nn.ReLU:
        return self[0]


class DilConv(nn.Sequential):
    """ReLU -> depthwise (dilated) conv -> pointwise conv -> BN (DARTS)."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        return self[3](self[2](self[1](self[0](x) if relu_x is None else relu_x)))

    @property
    def first_relu(self) -> nn.ReLU:
        return self[0]


class SepConv(nn.Sequential):
    """Two stacked DilConv blocks with dilation 1; only the first one strides (DARTS)."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )

    def forward(self, x: torch.Tensor, relu_x: torch.Tensor | None = None) -> torch.Tensor:
        return self[1](self[0](x, relu_x))

    @property
    def first_relu(self) -> nn.ReLU:
        return self[0][0]


class Zero(nn.Module):
    """The `none` op: a zero tensor of the output shape. Mixed ops skip it (its output is 0)."""

    def __init__(self, C_in, C_out, stride):
        super().__init__()
        self.C_out, self.stride = C_out, stride

    def forward(self, x):
        n, _, h, w = x.shape
        if self.stride > 1:
            h, w = (h + self.stride - 1) // self.stride, (w + self.stride - 1) // self.stride
        return x.new_zeros(n, self.C_out, h, w)


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 stride-2 convs on offset grids, concatenated (DARTS).

    The offset branch pads one row/column first so odd sizes (7x7) give the same shape as the
    first branch; on even sizes this is exactly the original ``x[:, :, 1:, 1:]``.
    """

    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([_every_second_pixel(self.conv_1, x), _every_second_pixel(self.conv_2, shifted)], dim=1))


def _every_second_pixel(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1x1 stride-2 conv, computed as the 1x1 conv of every second pixel: the
    same sums (one product per input channel), without torch's strided 1x1 kernel. On CPU, torch
    2.14's channels-last backward of a 1x1 stride-2 conv with fewer than 8 input channels corrupts
    the heap (double free, segfault): PC-DARTS' reduction edges (C=16, K=4 gives 4 channels) and
    TE-NAS' C=1 networks have exactly such convs."""
    return F.conv2d(x[:, :, :: conv.stride[0], :: conv.stride[1]], conv.weight, conv.bias)


def avg_pool_3x3(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)`` as a depthwise box filter:
    a conv with a ones kernel, divided by the number of real pixels under each window.

    Same numbers (tests/test_perf_equivalence.py), but on CPU with torch 2.14 ``avg_pool2d``'s
    forward and backward took a third of a NAS-Bench-201 search step; the depthwise conv is
    several times faster in both directions, and its weight gradient is never needed.
    """
    C, (H, W) = x.shape[1], x.shape[-2:]
    kernel = x.new_ones(C, 1, 3, 3)
    count = F.conv2d(x.new_ones(1, 1, H, W), kernel[:1], stride=stride, padding=1)
    return F.conv2d(x, kernel, stride=stride, padding=1, groups=C) / count


class _MaxPool3x3(torch.autograd.Function):
    """3x3 max pooling (padding 1) that keeps only its input for backward and finds the argmax
    again there: ``max_pool2d`` keeps int64 indices, twice the bytes of its output, for every
    max-pool op of the supernet (the input is kept alive by the node's other ops anyway)."""

    generate_vmap_rule = True  # torch.func transforms (TE-NAS' vectorised NTK) work through it

    @staticmethod
    def forward(x, stride):
        return F.max_pool2d(x, 3, stride, 1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.stride = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, indices = F.max_pool2d(x.detach(), 3, ctx.stride, 1, return_indices=True)
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, x, [3, 3], [ctx.stride, ctx.stride], [1, 1], [1, 1], False, indices
        )
        return grad_x, None


class MaxPool3x3(nn.Module):
    """``nn.MaxPool2d(3, stride, padding=1)`` with less memory for backward (``_MaxPool3x3``)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool2d(x, 3, self.stride, 1)
        return _MaxPool3x3.apply(x, self.stride)


class BoxAvgPool3x3(nn.Module):
    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return avg_pool_3x3(x, self.stride)


class Pool(nn.Module):
    """3x3 pooling; a 1x1 ReLU-Conv-BN first when the channel count changes (NAS-Bench-201)."""

    def __init__(self, kind, C_in, C_out, stride, affine=True):
        super().__init__()
        self.preprocess = None if C_in == C_out else ReLUConvBN(C_in, C_out, 1, 1, 0, affine=affine)
        self.pool = BoxAvgPool3x3(stride) if kind == "avg" else MaxPool3x3(stride)

    def forward(self, x):
        return self.pool(x if self.preprocess is None else self.preprocess(x))


def skip_connect(C_in, C_out, stride, affine):
    """Identity, or a factorized reduce when the edge strides or changes channels."""
    if stride == 1 and C_in == C_out:
        return nn.Identity()
    return FactorizedReduce(C_in, C_out, affine)


OPS: dict[str, Callable[[int, int, int, bool], nn.Module]] = {
    "none": lambda C_in, C_out, stride, affine: Zero(C_in, C_out, stride),
    "skip_connect": skip_connect,
    "avg_pool_3x3": lambda C_in, C_out, stride, affine: Pool("avg", C_in, C_out, stride, affine),
    "max_pool_3x3": lambda C_in, C_out, stride, affine: Pool("max", C_in, C_out, stride, affine),
    "sep_conv_3x3": lambda C_in, C_out, stride, affine: SepConv(C_in, C_out, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C_in, C_out, stride, affine: SepConv(C_in, C_out, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C_in, C_out, stride, affine: SepConv(C_in, C_out, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C_in, C_out, stride, affine: DilConv(C_in, C_out, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C_in, C_out, stride, affine: DilConv(C_in, C_out, 5, stride, 4, 2, affine),
    # NAS-Bench-201 keeps a conv bias exactly when BN has no affine parameters.
    "nor_conv_1x1": lambda C_in, C_out, stride, affine: ReLUConvBN(
        C_in, C_out, 1, stride, 0, affine=affine, bias=not affine
    ),
    "nor_conv_3x3": lambda C_in, C_out, stride, affine: ReLUConvBN(
        C_in, C_out, 3, stride, 1, affine=affine, bias=not affine
    ),
}


def make_op(name: str, C_in: int, C_out: int, stride: int, affine: bool) -> nn.Module:
    """Build one candidate op, with a clear error for an unknown name."""
    try:
        factory = OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(sorted(OPS))}") from None
    return factory(C_in, C_out, stride, affine)
