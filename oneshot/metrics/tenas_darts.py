"""TE-NAS' metric networks for the DARTS space, as the reference builds them.

The reference (VITA-Group/TENAS, ``prune_tenas.py::main``, ``search_space_name == 'darts'``)
measures both indicators on ``NASNetworkDARTS(C=1, N=1, depth=2, stem_multiplier=1,
affine=True)``: a stem, one normal and one reduction ``NASNetSearchCell``, BN-ReLU, global
pooling and a linear classifier; the linear-region copy has no stem and reads one-channel crops.
It is not the DARTS search supernet (``oneshot.spaces.darts.SearchCell``), in three ways that
change the numbers:

* every BN is affine, so the NTK (taken over every parameter named ``weight``) also spans the
  BN weights: 274 more Jacobian columns with all candidates;
* pools are bare (``POOLING`` with equal channels: no BN after them; DARTS' supernet adds a
  non-affine BN after each pool, 56 BNs in this network);
* each edge lists its ops in the reference's order, ``DARTS_SPACE`` in ``cell_operations.py``
  (``REFERENCE_ORDER``): the prune visits candidates in that order, and exact ties in the
  rank sum go to the candidate visited first.

The ops themselves (separable and dilated convs, factorized reduce, 3x3 pools with
``count_include_pad=False``) are the same modules as ``oneshot.ops``'; an edge with a mask of
``k`` ops is their plain sum, made a mean by ``oneshot.prune.average_masked_ops`` as the
reference's ``-INF`` logits make it (``softmax`` = 1/k on each survivor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oneshot.mixed import MixedOp, add_edges_from, leaving_edges
from oneshot.ops import FactorizedReduce, ReLUConvBN, Zero
from oneshot.spaces.darts import cell_edges

# lib/models/cell_operations.py::DARTS_SPACE
REFERENCE_ORDER = (
    "none",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "avg_pool_3x3",
    "max_pool_3x3",
)


def reference_order(ops: Sequence[str]) -> tuple[str, ...]:
    """``ops`` in the reference's order; ops it does not have keep their order, after it."""
    rank = {op: i for i, op in enumerate(REFERENCE_ORDER)}
    return tuple(sorted(ops, key=lambda op: rank.get(op, len(rank))))


class TenasDartsCell(nn.Module):
    """The reference's ``NASNetSearchCell`` with ``affine=True``: inputs preprocessed by 1x1
    ReLU-Conv-BN (a factorized reduce after a reduction cell), ``steps`` nodes each summing its
    edges input by input, the last ``multiplier`` nodes concatenated."""

    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction, reduction_prev, candidates):
        super().__init__()
        self.steps, self.multiplier, self.reduction = steps, multiplier, reduction
        self.preprocess0 = (
            FactorizedReduce(C_pp, C, affine=True)
            if reduction_prev
            else ReLUConvBN(C_pp, C, 1, 1, 0, affine=True)
        )
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=True)
        edges = cell_edges(steps)  # the reference's edge keys '{node}<-{input}' sort the same way
        self.edges = nn.ModuleList(
            MixedOp(C, C, 2 if reduction and j < 2 else 1, candidates[e], affine=True)
            for e, (_, j) in enumerate(edges)
        )
        self._zero = Zero(C, C, 2 if reduction else 1)
        self._leaving = leaving_edges(edges)

    def forward(self, s0, s1, weights):
        """``weights``: one MixedOp entry per edge (a mask of ops, or ``None``: edge removed).
        A node sums its edges in input order, as the reference's ``sum(clist)``; the edges
        leaving one state share its ReLU (``add_edges_from``), which changes no number."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        totals: dict[int, torch.Tensor] = {}
        for source in range(self.steps + 1):
            add_edges_from(states[source], self._leaving[source], self.edges, weights, totals)
            if source >= 1:  # every edge into node source + 1 has now run
                out = totals.pop(source + 1, None)
                states.append(out if out is not None else self._zero(states[0]))
        return torch.cat(states[-self.multiplier :], dim=1)


class DartsMetricNet(nn.Module):
    """TE-NAS' small DARTS network (``NASNetworkDARTS`` with ``N=1, depth=2``): stem, one
    normal and one reduction ``TenasDartsCell``, BN-ReLU, global pooling, linear.
    ``stem=False`` is the thin copy for the linear regions: the raw ``in_channels`` input feeds
    both cell inputs. ``candidates``: ``{"normal": [ops per edge], "reduce": [...]}``; pass them
    in ``REFERENCE_ORDER`` (``reference_order``) to visit ops as the reference does."""

    def __init__(self, candidates, C=1, in_channels=3, stem=True, stem_multiplier=1, steps=4, multiplier=4,
                 num_classes=10):  # fmt: skip
        super().__init__()
        self.candidates = {t: [tuple(c) for c in candidates[t]] for t in ("normal", "reduce")}
        C_stem = C * stem_multiplier if stem else in_channels
        self.stem = (
            nn.Sequential(
                nn.Conv2d(in_channels, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem)
            )
            if stem
            else nn.Identity()
        )
        self.normal = TenasDartsCell(
            steps, multiplier, C_stem, C_stem, C, False, False, self.candidates["normal"]
        )
        self.reduce = TenasDartsCell(
            steps, multiplier, C_stem, multiplier * C, 2 * C, True, False, self.candidates["reduce"]
        )
        self.lastact = nn.Sequential(nn.BatchNorm2d(2 * C * multiplier), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(2 * C * multiplier, num_classes)

    def forward(self, x, weights):
        s = self.stem(x)
        s = self.reduce(s, self.normal(s, s, weights["normal"]), weights["reduce"])
        return self.classifier(self.lastact(s).mean((2, 3)))
