"""A user's own model with choices (not part of the package): what tests/test_nn.py,
tests/test_model_space.py and the app tests search, and its hand-written fixed counterpart."""

from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from oneshot.nn import InputChoice, LayerChoice, Repeat


def conv(c_in, c_out, k):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


def same_conv(channels, k):
    return conv(channels, channels, k)


def avg_pool(channels):
    return nn.AvgPool2d(3, 1, 1)


class TinyNet(nn.Module):
    """Two LayerChoices (one label shared by two places), an InputChoice and a Repeat."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv(in_channels, width, 3)
        # candidate factories (channels -> module): PC-DARTS may build them at width / K
        self.op1 = LayerChoice(OrderedDict(k3=lambda c: conv(c, c, 3), k5=partial(same_conv, k=5), pool=avg_pool),
                               label="op1", channels=width)  # fmt: skip
        self.op2 = LayerChoice([conv(width, width, 3), nn.Identity()], label="op2")
        # the same label: one decision shared by two places
        self.op2_again = LayerChoice([conv(width, width, 1), nn.Identity()], label="op2")
        self.skip = InputChoice(3, n_chosen=1, label="skip")
        self.blocks = Repeat(lambda i: conv(width, width, 3), depth=(1, 3), label="depth")
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        x0 = self.stem(x)
        x1 = self.op1(x0)
        x2 = self.op2_again(self.op2(x1))
        x = self.skip([x0, x1, x2])
        x = self.blocks(x)
        return self.classifier(x.mean((2, 3)))


class TinyNetByHand(nn.Module):
    """TinyNet at {"op1": "k5", "op2": "0", "skip": [2], "depth": 2}, written without choices."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = conv(in_channels, width, 3)
        self.op1 = conv(width, width, 5)
        self.op2 = conv(width, width, 3)
        self.op2_again = conv(width, width, 1)
        self.blocks = nn.Sequential(conv(width, width, 3), conv(width, width, 3))
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.op2_again(self.op2(self.op1(self.stem(x))))
        return self.classifier(self.blocks(x).mean((2, 3)))


class TwoInputs(nn.Module):
    """DARTS' "two strongest inputs": an InputChoice of 2 out of 4."""

    def __init__(self, width: int = 4, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.branches = nn.ModuleList(conv(in_channels, width, k) for k in (1, 3, 5, 7))
        self.pick = InputChoice(4, n_chosen=2, label="pick")
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.classifier(self.pick([b(x) for b in self.branches]).mean((2, 3)))


class NoChoices(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.classifier = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.classifier(x.mean((2, 3)))


class BadShapes(nn.Module):
    """A candidate that changes the output shape differently from its sibling."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.op = LayerChoice(
            {"same": nn.Conv2d(3, 4, 3, padding=1), "smaller": nn.Conv2d(3, 4, 3)}, label="op"
        )
        self.classifier = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.classifier(self.op(x).mean((2, 3)))


class SameLabelDifferentCounts(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.a = LayerChoice([nn.Identity(), nn.Identity()], label="op")
        self.b = LayerChoice([nn.Identity(), nn.Identity(), nn.Identity()], label="op")
        self.classifier = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.classifier(self.b(self.a(x)).mean((2, 3)))


def one_hot_output(space, arch, x):
    """The supernet's output with every decision's weights one-hot on ``arch``."""
    weights = {}
    for label, (index,) in space.weights_for(arch).items():
        row = torch.zeros(len(space.candidates[label][0]))
        row[index] = 1.0
        weights[label] = [row]
    return space(x, weights)
