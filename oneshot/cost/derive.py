"""Derivation within a budget: the architecture of highest total log-probability whose cost fits.

Exact, by a group knapsack over the space's independent decisions: NB201 one op per edge, a model
space one candidate per label, DARTS one *pair* of ``(input, op)`` per node (two distinct inputs,
never ``none``, every pair enumerated). Each decision is a group of options ``(cost, log-prob)``;
groups are merged one by one keeping only the Pareto frontier (no kept partial choice is both
costlier and less probable than another), and partial choices that cannot fit even with the
cheapest rest are dropped. A dominated partial choice can always be swapped for its dominator in
a complete architecture without losing feasibility or probability, so the best frontier point at
the end is the optimum. Unconstrained, the objective's optimum is the space's usual derivation
(argmax per edge; DARTS' two strongest inputs per node), so a budget that the argmax meets
changes nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from oneshot.cost.model import RTOL, CostModel


class BudgetError(ValueError):
    """No architecture of the space meets the budget."""


@dataclass
class Group:
    """One decision: its options' costs, and what each option picks (``(cell type, edge, k)``s)."""

    costs: np.ndarray
    picks: list[tuple[tuple[str, int, int], ...]]
    node: tuple[str, int] | None = None  # DARTS: (cell type, node index)


def decision_groups(cost: CostModel) -> list[Group]:
    groups = []
    for t, table in cost.per_choice.items():
        c = table.numpy()
        if cost.space != "darts":
            for e in range(c.shape[0]):
                groups.append(Group(c[e].copy(), [((t, e, k),) for k in range(c.shape[1])]))
            continue
        for n, (first, n_in) in enumerate(cost.darts_nodes()):
            picks, costs = [], []
            for i, j in itertools.combinations(range(n_in), 2):
                ops_i = [
                    k for k, name in enumerate(cost.candidates[t][first + i]) if name != "none"
                ]
                ops_j = [
                    k for k, name in enumerate(cost.candidates[t][first + j]) if name != "none"
                ]
                for ki, kj in itertools.product(ops_i, ops_j):
                    picks.append(((t, first + i, ki), (t, first + j, kj)))
                    costs.append(c[first + i, ki] + c[first + j, kj])
            if not picks:
                raise ValueError(f"{t} node {n + 2} has fewer than two inputs with a non-'none' op")
            groups.append(Group(np.array(costs), picks, (t, n)))
    return groups


def _log_probs(source, cost: CostModel, edge_logits=None) -> dict[str, np.ndarray]:
    """Per cell type ``[n_edges, n_candidates]`` log-probabilities: from a supernet (its alphas,
    times PC-DARTS' edge weights where it has them, as ``derive_darts`` ranks edges) or from a
    dict of logits (log-softmaxed per edge)."""
    from oneshot.derive import edge_softmax

    if isinstance(source, torch.nn.Module):
        logits = {t: a for t, a in source.alphas.items()}
        betas = getattr(source, "betas", None) or {}
    else:
        logits, betas = dict(source), dict(edge_logits or {})
    out = {}
    for t in cost.per_choice:
        lp = torch.log_softmax(torch.as_tensor(logits[t]).detach().cpu().double(), dim=-1)
        if t in betas:
            edges = edge_softmax(
                torch.as_tensor(betas[t]).detach().cpu().double(), cost.meta["steps"]
            )
            lp = lp + torch.log(edges)[:, None]
        out[t] = lp.numpy()
    return out


def derive_within_budget(supernet_or_logits, cost: CostModel, budget: float, edge_logits=None):
    """The genotype (NB201, DARTS) or ``Arch`` (model spaces) of highest total log-probability
    whose cost is at most ``budget`` (in ``cost.unit``); ``BudgetError`` when none is.
    ``edge_logits``: with a dict of logits, PC-DARTS' edge logits (betas) per cell type."""
    lp = _log_probs(supernet_or_logits, cost, edge_logits)
    groups = decision_groups(cost)
    slack = budget + RTOL * max(1.0, abs(budget)) - cost.fixed
    least = [float(g.costs.min()) for g in groups]
    if sum(least) > slack:
        raise BudgetError(f"budget.max={budget:g} {cost.unit} is below the cheapest architecture, "
                          f"{cost.fixed + sum(least):.6g} {cost.unit}")  # fmt: skip
    rest = np.concatenate(
        [np.cumsum(least[::-1])[::-1][1:], [0.0]]
    )  # cheapest cost of the groups after g
    f_cost, f_score = np.zeros(1), np.zeros(1)
    back = []  # per group: (frontier index before, option index) of every frontier point
    for g, group in enumerate(groups):
        scores = np.array([sum(lp[t][e, k] for t, e, k in pick) for pick in group.picks])
        c = (f_cost[:, None] + group.costs[None, :]).ravel()
        s = (f_score[:, None] + scores[None, :]).ravel()
        keep = np.flatnonzero(c + rest[g] <= slack)
        order = keep[np.lexsort((-s[keep], c[keep]))]  # by cost, then best score first
        best_before = np.maximum.accumulate(s[order])
        front = order[np.concatenate([[True], s[order][1:] > best_before[:-1]])]
        back.append((front // len(group.costs), front % len(group.costs)))
        f_cost, f_score = c[front], s[front]
    i = int(np.argmax(f_score))
    chosen = []
    for g in range(len(groups) - 1, -1, -1):
        prev, option = back[g][0][i], back[g][1][i]
        chosen.append(groups[g].picks[int(option)])
        i = int(prev)
    return _genotype(cost, [p for pick in reversed(chosen) for p in pick], lp)


def _genotype(cost: CostModel, picks, lp):
    cands = cost.candidates
    if cost.space == "nb201":
        from oneshot.genotypes import NB201Genotype

        ops = [None] * len(cands["cell"])
        for _, e, k in picks:
            ops[e] = cands["cell"][e][k]
        n_nodes = int(round((1 + (1 + 8 * len(ops)) ** 0.5) / 2))
        return NB201Genotype.from_edge_ops(ops, n_nodes)
    if cost.space == "darts":
        from oneshot.genotypes import DartsGenotype

        steps, multiplier = cost.meta["steps"], cost.meta["multiplier"]
        nodes = cost.darts_nodes()
        cells = {}
        for t in ("normal", "reduce"):
            pairs = []
            for first, n_in in nodes:
                mine = [(e, k) for tt, e, k in picks if tt == t and first <= e < first + n_in]
                mine.sort(
                    key=lambda ek: (-lp[t][ek[0], ek[1]], ek[0])
                )  # stronger first, as derive_darts
                pairs += [(cands[t][e][k], e - first) for e, k in mine]
            cells[t] = tuple(pairs)
        concat = tuple(range(2 + steps - multiplier, steps + 2))
        return DartsGenotype(cells["normal"], concat, cells["reduce"], concat)
    from oneshot.arch import Arch

    kinds = cost.meta.get("kinds", {})
    return Arch({label: _value(cands[label][0][k], kinds.get(label)) for label, _, k in picks})


def _value(name: str, kind: str | None):
    """A model-space candidate name as its architecture value (``oneshot.nn``'s naming): a
    Repeat's depth ``"2"`` -> 2, an InputChoice's ``"0+2"`` -> [0, 2], a LayerChoice's name as is."""
    if kind == "repeat":
        return int(name)
    if kind == "inputchoice":
        return [int(i) for i in name.split("+")]
    return name


def total_log_prob(supernet_or_logits, cost: CostModel, genotype, edge_logits=None) -> float:
    lp = _log_probs(supernet_or_logits, cost, edge_logits)
    return float(sum(lp[t][e, k] for t, e, k in cost.choices_of(genotype)))
