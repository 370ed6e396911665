"""The mixed op: one edge of a supernet, the single interface between strategies and spaces.

``MixedOp.forward(x, weights)`` understands four kinds of ``weights``:

* a float tensor ``[n_ops]`` - DARTS: ``sum_i w_i * op_i(x)``;
* an ``int`` - a one-hot sample (ENAS): only that op runs;
* a tuple of ints - a mask of surviving ops (TE-NAS pruning, or ENAS picking the same input
  twice): the plain sum of those ops, nothing else runs;
* ``None`` - the edge is not used; the caller skips it.

The ``none`` op is never computed: its output is zero, so ``w_none * 0`` adds nothing to the
sum and nothing to the gradient of the weights (alpha_none still gets its gradient through the
softmax normalisation of the other weights).

Partial channel connections (PC-DARTS, Xu et al., ICLR 2020) are an option: with ``partial=K``
only ``C/K`` channels go through the candidate ops, the rest bypass the edge, and the result is
channel-shuffled so every channel gets its turn across cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from oneshot.ops import make_op


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

    def forward(self, x: torch.Tensor, weights=None):
        if self.partial > 1:
            return self._partial_forward(x, weights)
        return self._forward(x, weights)

    def _forward(self, x, weights):
        if weights is None:
            return None
        if isinstance(weights, int):
            return self.ops[weights](x)
        if isinstance(weights, torch.Tensor):
            live = self._live
            if not live:
                return self.ops[0](x)
            out = weights[live[0]] * self.ops[live[0]](x)
            for i in live[1:]:
                out = out + weights[i] * self.ops[i](x)
            return out
        chosen = tuple(weights)
        if not chosen:
            return None
        out = self.ops[chosen[0]](x)
        for i in chosen[1:]:
            out = out + self.ops[i](x)
        return out

    def _partial_forward(self, x, weights):
        k = x.shape[1] // self.partial
        x_op, x_bypass = x[:, :k], x[:, k:]
        out = self._forward(x_op, weights)
        if out is None:
            return None
        if self.stride > 1:
            x_bypass = F.max_pool2d(x_bypass, 2, 2, ceil_mode=True)
        return channel_shuffle(torch.cat([out, x_bypass], dim=1), self.partial)
