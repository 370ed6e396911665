"""The mixed op: one edge of a supernet, the single interface between strategies and spaces.

``MixedOp.forward(x, weights)`` understands five kinds of ``weights``:

* a float tensor ``[n_ops]`` - DARTS: ``sum_i w_i * op_i(x)``;
* an ``int`` - a one-hot sample (ENAS): only that op runs;
* a pair ``(index, weight)``, ``weight`` a 0-dim tensor - a sample with a gradient (GDAS'
  straight-through one-hot): only op ``index`` runs, times ``weight`` (value 1, gradient into
  the architecture parameters);
* a tuple of ints - a mask of surviving ops (TE-NAS pruning, or ENAS picking the same input
  twice): the plain sum of those ops, nothing else runs;
* ``None`` - the edge is not used; the caller skips it.

The ``none`` op is never computed: its output is zero, so ``w_none * 0`` adds nothing to the
sum and nothing to the gradient of the weights (alpha_none still gets its gradient through the
softmax normalisation of the other weights).

Partial channel connections (PC-DARTS, Xu et al., ICLR 2020) are an option: with ``partial=K``
only ``C/K`` channels go through the candidate ops, the rest bypass the edge, and the result is
channel-shuffled so every channel gets its turn across cells.

Every candidate that starts with a ReLU (ReLU-Conv-BN, separable and dilated convs) reads one
shared ``relu(node)`` (``NodeInput``, ``add_edges_from``): computed, and kept for backward, once
per node instead of once per op per edge. The DARTS space has 4 such ops on each of up to 5
edges leaving a node: its search step saves 15% fewer activations for backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oneshot.ops import make_op


class NodeInput:
    """A node's output as the edges leaving it read it: the tensor, and its ReLU made once on
    first use, through the first ReLU module that asks (forward hooks on ``nn.ReLU``, e.g. the
    linear-region count, still see it; a shared ReLU only drops duplicate units)."""

    __slots__ = ("x", "_relu", "_heads")

    def __init__(self, x: torch.Tensor):
        self.x, self._relu, self._heads = x, None, {}

    def relu(self, module: nn.Module) -> torch.Tensor:
        if self._relu is None:  # an in-place ReLU would overwrite the node the other ops read
            self._relu = torch.relu(self.x) if getattr(module, "inplace", False) else module(self.x)
        return self._relu

    def head(self, k: int) -> NodeInput:
        """The first ``k`` channels (PC-DARTS' partial edges all take the same ones), shared too."""
        if k not in self._heads:
            self._heads[k] = NodeInput(self.x[:, :k])
        return self._heads[k]


def run_op(op: nn.Module, node: NodeInput) -> torch.Tensor:
    """``op(node.x)``, handing the node's shared ReLU to ops that start with one (``first_relu``)."""
    first_relu = getattr(op, "first_relu", None)
    if first_relu is None:
        return op(node.x)
    return op(node.x, relu_x=node.relu(first_relu))


def leaving_edges(edges: Sequence[tuple[int, int]]) -> dict[int, list[tuple[int, int]]]:
    """``{source: [(edge index, target), ...]}`` for a cell's ``(target, source)`` edge list."""
    out: dict[int, list[tuple[int, int]]] = {}
    for e, (target, source) in enumerate(edges):
        out.setdefault(source, []).append((e, target))
    return out


def add_edges_from(x: torch.Tensor, leaving, edges: Sequence[MixedOp], weights: Sequence, totals: dict,
                   edge_weights=None) -> None:  # fmt: skip
    """Run the edges ``leaving`` node ``x`` (``(edge index, target)`` pairs) with the node's ReLU
    made once for all their ops that start with one, adding each output (times
    ``edge_weights[e]`` where given) into ``totals[target]``, in the order of ``leaving``."""
    node = NodeInput(x)
    for e, target in leaving:
        out = edges[e](node, weights[e])
        if out is None:
            continue
        if edge_weights is not None:
            out = edge_weights[e] * out
        totals[target] = out if target not in totals else totals[target] + out


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class MixedOp(nn.Module):
    """All candidate ops of one edge. ``pool_bn`` appends a BN without affine parameters after
    pooling, as DARTS' supernet does, so parameter-free pools are on the scale of the convs."""

    def __init__(
        self,
        C_in: int,
        C_out: int,
        stride: int,
        candidates: Sequence[str],
        affine: bool = False,
        pool_bn: bool = False,
        partial: int = 1,
    ):
        super().__init__()
        if not candidates:
            raise ValueError("a mixed op needs at least one candidate op")
        if partial > 1 and (C_in % partial or C_in != C_out):
            raise ValueError(f"partial channels K={partial} needs C_in == C_out divisible by K (got {C_in}, {C_out})")
        self.candidates = tuple(candidates)
        self.partial, self.stride = partial, stride
        C_in_op, C_out_op = C_in // partial, C_out // partial
        ops = []
        for name in self.candidates:
            op = make_op(name, C_in_op, C_out_op, stride, affine)
            if pool_bn and "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(C_out_op, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)
        # Indices of ops that produce something; `none` is skipped, see the module docstring.
        self._live = tuple(i for i, n in enumerate(self.candidates) if n != "none")

    def forward(self, x: torch.Tensor | NodeInput, weights=None):
        node = x if isinstance(x, NodeInput) else NodeInput(x)
        if self.partial > 1:
            return self._partial_forward(node, weights)
        return self._forward(node, weights)

    def _forward(self, node: NodeInput, weights):
        if weights is None:
            return None
        if isinstance(weights, int):
            return run_op(self.ops[weights], node)
        if isinstance(weights, torch.Tensor):
            live = self._live
            if not live:
                return self.ops[0](node.x)
            out = weights[live[0]] * run_op(self.ops[live[0]], node)
            for i in live[1:]:
                out = out + weights[i] * run_op(self.ops[i], node)
            return out
        if isinstance(weights, tuple) and len(weights) == 2 and isinstance(weights[1], torch.Tensor):
            index, weight = weights  # (index, weight): GDAS' sampled op times its straight-through weight
            return weight * run_op(self.ops[index], node)
        chosen = tuple(weights)
        if not chosen:
            return None
        out = run_op(self.ops[chosen[0]], node)
        for i in chosen[1:]:
            out = out + run_op(self.ops[i], node)
        return out

    def _partial_forward(self, node: NodeInput, weights):
        x = node.x
        k = x.shape[1] // self.partial
        x_bypass = x[:, k:]
        out = self._forward(node.head(k), weights)
        if out is None:
            return None
        if self.stride > 1:
            x_bypass = F.max_pool2d(x_bypass, 2, 2, ceil_mode=True)
        return channel_shuffle(torch.cat([out, x_bypass], dim=1), self.partial)
