"""Collapse guards for differentiable search (``strategy.regularizer``): pure functions of the
architecture parameters and the search's progress, used by DARTS, GDAS and DrNAS alike.

DARTS drifts towards parameter-free ops (on NAS-Bench-201 it ends at the all-skip cell). Two
published fixes, each off unless chosen (``regularizer: null`` keeps DARTS exactly DARTS):

* ``beta`` - beta-DARTS (Ye et al., "beta-DARTS: Beta-Decay Regularization for Differentiable
  Architecture Search", CVPR 2022). The architecture loss gets ``lambda(t) * L_beta`` with

      L_beta = mean over edges of logsumexp_k(alpha_{e,k})

  whose gradient, ``softmax(alpha_e) / n_edges``, decays every alpha by its own softmax weight
  (the "beta-decay"), keeping the softmax weights from running away. ``lambda`` grows linearly
  over the search, from 0 at the first epoch to ``weight`` (default 50) at the end; the authors'
  code (github.com/Sunshine-Ye/Beta-DARTS, ``optimizers/darts/architect.py``: ``mlc_loss``,
  ``weights = 0 + 50*epoch/100``) writes that for a 100-epoch search.
* ``auxiliary_skip`` - DARTS- (Chu et al., "DARTS-: Robustly Stepping out of Performance
  Collapse Without Indicators", ICLR 2021). Every edge gets an auxiliary skip connection
  ``beta(t) * skip(x)`` next to its mixed op, so the skip candidate no longer has to win the
  softmax to let gradients through; ``beta`` decays linearly from ``weight`` (default 1) to 0
  at the end of the search, when the supernet is the plain DARTS one again. It is written as
  ``beta`` added to the ``skip_connect`` candidate's mixing weight, ``(w_skip + beta) *
  skip(x)``: identical on stride-1 edges (skip is the identity); on reduction edges the
  auxiliary path shares the candidate's factorized reduce instead of owning a copy. Edges
  without a ``skip_connect`` candidate get none.
"""

from __future__ import annotations

import torch

REGULARIZERS = ("beta", "auxiliary_skip")
DEFAULT_WEIGHT = {"beta": 50.0, "auxiliary_skip": 1.0}
SKIP = "skip_connect"


def progress(epoch: int, max_epochs: int | None) -> float:
    """How far the search is, 0 at the first epoch and 1 at the last (a 1-epoch search: 0)."""
    if not max_epochs or max_epochs <= 1:
        return 0.0
    return min(1.0, epoch / (max_epochs - 1))


def beta_decay_loss(arch_parameters) -> torch.Tensor:
    """``L_beta``: the mean over every edge (row) of every cell type of ``logsumexp(alpha)``."""
    rows = torch.cat([a.reshape(-1, a.shape[-1]) for a in arch_parameters])
    return torch.logsumexp(rows, dim=-1).mean()


def add_auxiliary_skip(weights: dict, candidates: dict, beta: float) -> dict:
    """``weights`` (per cell type, a ``[n_edges, n_ops]`` tensor or a list of per-edge rows) with
    ``beta`` added to each edge's ``skip_connect`` weight; a new dict, the input is unchanged."""
    out = {}
    for t, rows in weights.items():
        new_rows = []
        for e, row in enumerate(rows):
            if SKIP in candidates[t][e] and beta:
                row = row + beta * torch.nn.functional.one_hot(
                    torch.tensor(candidates[t][e].index(SKIP), device=row.device), row.shape[-1]
                ).to(row.dtype)
            new_rows.append(row)
        out[t] = new_rows
    return out


class Regularizer:
    """One of ``REGULARIZERS`` with its weight schedule. ``penalty`` is added to the
    architecture loss; ``mix`` rewrites the per-edge mixing weights of a supernet forward."""

    def __init__(self, name: str, weight: float | None = None):
        if name not in REGULARIZERS:
            raise ValueError(f"strategy.regularizer={name!r} is not known; valid: null, {', '.join(REGULARIZERS)}")
        weight = DEFAULT_WEIGHT[name] if weight is None else float(weight)
        if weight < 0:
            raise ValueError(f"strategy.regularizer_weight={weight} is out of range; valid: a number >= 0")
        self.name, self.weight = name, weight

    def coefficient(self, epoch: int, max_epochs: int | None) -> float:
        """beta: lambda grows 0 -> weight; auxiliary_skip: beta decays weight -> 0."""
        t = progress(epoch, max_epochs)
        return self.weight * t if self.name == "beta" else self.weight * (1.0 - t)

    def penalty(self, arch_parameters, epoch: int, max_epochs: int | None) -> torch.Tensor | None:
        if self.name != "beta":
            return None
        return self.coefficient(epoch, max_epochs) * beta_decay_loss(arch_parameters)

    def mix(self, supernet, weights: dict | None, epoch: int, max_epochs: int | None) -> dict | None:
        if self.name != "auxiliary_skip":
            return weights
        if weights is None:
            weights = supernet.arch_weights()
        return add_auxiliary_skip(weights, supernet.candidates, self.coefficient(epoch, max_epochs))


def make_regularizer(name: str | None, weight: float | None = None) -> Regularizer | None:
    """``None`` (no regulariser) or the named one."""
    return None if name in (None, "null", "none") else Regularizer(name, weight)
