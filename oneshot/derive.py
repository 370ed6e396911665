"""Derivation: architecture parameters -> discrete genotype. Pure functions, no modules.

NB201 (Dong & Yang 2020): the argmax op of every edge, `none` included (the benchmark has it).
DARTS (Liu et al. 2019, sec. 2.4): for every intermediate node keep the two incoming edges whose
strongest non-`none` op has the largest softmax weight, and on each that op. With PC-DARTS' edge
normalisation (Xu et al. 2020, sec. 3.2) an edge's strength is its beta weight (softmax over the
node's incoming edges) times that op weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from oneshot.genotypes import DartsGenotype, NB201Genotype


def _as_probs(alphas) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(alphas, dtype=torch.float64).detach().cpu(), dim=-1)


def derive_nb201(alphas, candidates: Sequence[Sequence[str]]) -> NB201Genotype:
    """``alphas``: ``[n_edges, n_ops]`` logits; ``candidates[e]`` names the ops of edge ``e``."""
    probs = _as_probs(alphas)
    if probs.shape[0] != len(candidates):
        raise ValueError(f"{probs.shape[0]} rows of alphas for {len(candidates)} edges")
    ops = [candidates[e][int(probs[e].argmax())] for e in range(len(candidates))]
    n_nodes = int(round((1 + (1 + 8 * len(ops)) ** 0.5) / 2))  # n(n-1)/2 edges
    return NB201Genotype.from_edge_ops(ops, n_nodes)


def edge_softmax(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """PC-DARTS edge normalisation: ``betas`` holds one logit per edge (in ``cell_edges`` order);
    each node's incoming edges get a softmax of their own, so every node's edge weights sum to 1."""
    out, start = [], 0
    for node in range(steps):
        out.append(torch.softmax(betas[start : start + node + 2], dim=-1))
        start += node + 2
    if start != betas.shape[0]:
        raise ValueError(f"{betas.shape[0]} edge logits do not fit a {steps}-node DARTS cell ({start} edges)")
    return torch.cat(out)


def _darts_cell(probs: torch.Tensor, candidates, steps: int):
    edges, start = [], 0
    for node in range(steps):
        n_in = node + 2
        best = []  # (strength, input, op) per incoming edge
        for j in range(n_in):
            row, names = probs[start + j], candidates[start + j]
            live = [k for k, name in enumerate(names) if name != "none"]
            if not live:
                continue
            k = max(live, key=lambda k: float(row[k]))
            best.append((float(row[k]), j, names[k]))
        if len(best) < 2:
            raise ValueError(f"node {node + 2} has fewer than two inputs with a non-'none' op")
        # Stable sort: ties go to the lower input index, so derivation is deterministic.
        top = sorted(best, key=lambda t: -t[0])[:2]
        edges += [(name, j) for _, j, name in top]
        start += n_in
    if start != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows of alphas do not fit a {steps}-node DARTS cell ({start} edges)")
    return tuple(edges)


def derive_darts(alphas_normal, alphas_reduce, candidates_normal, candidates_reduce, steps: int = 4,
                 multiplier: int = 4, betas_normal=None, betas_reduce=None) -> DartsGenotype:  # fmt: skip
    """``betas_*``: PC-DARTS edge-normalisation logits (one per edge), or ``None`` without it."""
    concat = tuple(range(2 + steps - multiplier, steps + 2))

    def probs(alphas, betas):
        p = _as_probs(alphas)
        if betas is None:
            return p
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        return p * edge_softmax(betas, steps)[:, None]

    return DartsGenotype(
        normal=_darts_cell(probs(alphas_normal, betas_normal), candidates_normal, steps),
        normal_concat=concat,
        reduce=_darts_cell(probs(alphas_reduce, betas_reduce), candidates_reduce, steps),
        reduce_concat=concat,
    )
