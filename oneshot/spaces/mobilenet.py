"""A MobileNetV2 / ProxylessNAS-style space written with ``oneshot.nn`` (issue 15): ``space=mobilenet``.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018; Cai, Zhu,
Han, "ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware", ICLR 2019.

Stem conv 3x3 + BN + ReLU6; a fixed first block (MBConv, expansion 1, kernel 3, as both papers
have it); stages of inverted-residual blocks, where every block chooses its kernel (3, 5, 7) x
expansion (3, 6) - ProxylessNAS' six MBConv candidates - and every block but a stage's first may
also be skipped (``skip``: the identity, ProxylessNAS' zero op on a residual block); a 1x1 conv to
``last_channels``, global pooling, a linear classifier. The stages default to ProxylessNAS'
(channels x blocks, stride): 24x4/2, 40x4/2, 80x4/2, 96x4/1, 192x4/2, 320x1/1. For small
images (side < 64, CIFAR-like 32x32) the stem and the first stage keep the resolution, so a
32x32 input ends at 4x4, as the CIFAR versions of these networks do
(``small_image_stride1_stages``: how many leading stages keep it); for 224x224 (ImageNet-like)
the stem strides too and the last feature map is 7x7. ``stem_stride`` overrides the stem's.

It is an ordinary model class: ``oneshot.fix(MobileNetSpace config, arch)`` gives the plain
MobileNetV2-style network of an architecture. A stage's non-first blocks keep the channel count,
so their candidates are factories (``channels -> block``): PC-DARTS
(``space.supernet.partial_channels=K``) searches them at 1/K of the channels.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

from torch import nn

from oneshot.nn import LayerChoice

PROXYLESS_STAGES = ((24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNetV2's channel rounding: to a multiple of 8, never more than 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn_relu(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion (skipped at expansion 1), depthwise kxk, linear 1x1 projection; a
    residual connection where the shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, expansion: int, stride: int):
        super().__init__()
        hidden = c_in * expansion
        layers = [] if expansion == 1 else [conv_bn_relu(c_in, hidden, 1)]
        layers += [conv_bn_relu(hidden, hidden, kernel, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]  # fmt: skip
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def same_width_block(channels: int, kernel: int, expansion: int) -> InvertedResidual:
    """A stage's non-first block (stride 1, ``channels`` in and out) from its channel count."""
    return InvertedResidual(channels, channels, kernel, expansion, 1)


def identity(channels: int) -> nn.Identity:
    """The skipped block at any channel count."""
    return nn.Identity()


class MobileNetSpace(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_mult: float = 1.0,
        stages: Sequence[Sequence[int]] = PROXYLESS_STAGES,
        kernels: Sequence[int] = (3, 5, 7),
        expansions: Sequence[int] = (3, 6),
        first_channels: int = 32,
        last_channels: int = 1280,
        skip: bool = True,
        dropout: float = 0.0,
        small_image_stride1_stages: int = 1,
        stem_stride: int | None = None,
    ):
        super().__init__()
        if width_mult <= 0 or not stages or any(len(s) != 3 or min(s) < 1 for s in stages):
            raise ValueError(f"impossible mobilenet sizes: width_mult={width_mult}, stages={stages}; valid: "
                             "width_mult > 0 and stages a list of [channels, blocks, stride] with each >= 1")  # fmt: skip
        small = image_size < 64  # CIFAR-like: the stem and the first stage keep the resolution
        c = make_divisible(first_channels * width_mult)
        self.stem = conv_bn_relu(in_channels, c, 3, stem_stride or (1 if small else 2))
        c_first = make_divisible(16 * width_mult)
        self.first = InvertedResidual(c, c_first, 3, 1, 1)
        c = c_first
        blocks = []
        for s, (channels, n, stride) in enumerate(stages, 1):
            c_out = make_divisible(channels * width_mult)
            stride = 1 if small and s <= small_image_stride1_stages else stride
            for b in range(1, n + 1):
                if b == 1:  # changes the width (or the resolution): candidates are modules
                    ops = OrderedDict((f"k{k}e{e}", InvertedResidual(c, c_out, k, e, stride))
                                      for k in kernels for e in expansions)  # fmt: skip
                    blocks.append(LayerChoice(ops, label=f"s{s}b{b}"))
                else:  # keeps c_out channels: factories, so PC-DARTS can build them at c_out / K
                    ops = OrderedDict((f"k{k}e{e}", partial(same_width_block, kernel=k, expansion=e))
                                      for k in kernels for e in expansions)  # fmt: skip
                    if skip:  # a residual block may be left out: the stage gets shallower
                        ops["skip"] = identity
                    blocks.append(LayerChoice(ops, label=f"s{s}b{b}", channels=c_out))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.last_channels = (
            make_divisible(last_channels * max(1.0, width_mult)) if last_channels else c
        )
        self.head = conv_bn_relu(c, self.last_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.first(self.stem(x)))
        return self.classifier(self.dropout(self.pool(self.head(x)).flatten(1)))
