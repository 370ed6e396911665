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
changes nothing. NB201 adds one rule: the cell must connect its input to its output through
non-``none`` ops (the frontier is kept per set of reached nodes).
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


def nb201_edges(n_edges: int) -> tuple[list[tuple[int, int]], int]:
    """``(source, target)`` of every edge of an NB201 cell in the supernet's order, and its nodes."""
    n_nodes = int(round((1 + (1 + 8 * n_edges) ** 0.5) / 2))
    return [(i, j) for j in range(1, n_nodes) for i in range(j)], n_nodes


def nb201_connected(ops) -> bool:
    """Whether an NB201 cell (its edge ops in the supernet's order) has a path of non-``none``
    ops from its input to its output. Without one the cell outputs zeros, and since every cell
    of the network reads only the one before it, the whole network computes a constant."""
    edges, n_nodes = nb201_edges(len(ops))
    reached = {0}
    for (i, j), op in zip(edges, ops):
        if op != "none" and i in reached:
            reached.add(j)
    return n_nodes - 1 in reached


class _Reach:
    """The DP's state for NB201: the bit set of nodes reached from the cell's input through
    non-``none`` ops. Edges come in target order, so a source's bit is final when its out-edges
    are decided; an architecture counts only if it reaches the output node. Other spaces: one
    state (every DARTS node takes two non-``none`` inputs; a model space has no such rule)."""

    def __init__(self, cost: CostModel, groups: list[Group]):
        self.on = cost.space == "nb201"
        if not self.on:
            return
        edges, n_nodes = nb201_edges(len(cost.candidates["cell"]))
        self.output = 1 << (n_nodes - 1)
        self.moves = []
        for group in groups:
            (_, e, _), = group.picks[0]
            live = np.array([cost.candidates["cell"][e][k] != "none" for ((_, _, k),) in group.picks])
            self.moves.append((1 << edges[e][0], 1 << edges[e][1], live))

    def step(self, g: int, states: np.ndarray, n_options: int) -> np.ndarray:
        if not self.on:
            return np.zeros((len(states), n_options), dtype=np.int64)
        source, target, live = self.moves[g]
        reach = live[None, :] & ((states[:, None] & source) != 0)
        return np.where(reach, states[:, None] | target, states[:, None])

    def accept(self, states: np.ndarray) -> np.ndarray:
        return (states & self.output) != 0 if self.on else np.ones(len(states), dtype=bool)


def _best(groups: list[Group], scores: list[np.ndarray], slack: float, reach: _Reach):
    """The picks of the highest total score whose cost is at most ``slack`` (fixed part taken
    off) among the architectures ``reach`` accepts; None if there is none."""
    least = [float(g.costs.min()) for g in groups]
    rest = np.concatenate([np.cumsum(least[::-1])[::-1][1:], [0.0]])  # cheapest after group g
    f_cost, f_score, f_state = np.zeros(1), np.zeros(1), np.ones(1, dtype=np.int64)
    back = []  # per group: (frontier index before, option index) of every frontier point
    for g, group in enumerate(groups):
        n = len(group.costs)
        c = (f_cost[:, None] + group.costs[None, :]).ravel()
        s = (f_score[:, None] + scores[g][None, :]).ravel()
        st = reach.step(g, f_state, n).ravel()
        keep = np.flatnonzero(c + rest[g] <= slack)
        fronts = []
        for state in np.unique(st[keep]):  # a Pareto frontier per state
            idx = keep[st[keep] == state]
            order = idx[np.lexsort((-s[idx], c[idx]))]  # by cost, then best score first
            best_before = np.maximum.accumulate(s[order])
            fronts.append(order[np.concatenate([[True], s[order][1:] > best_before[:-1]])])
        front = np.concatenate(fronts) if fronts else np.zeros(0, dtype=np.int64)
        back.append((front // n, front % n))
        f_cost, f_score, f_state = c[front], s[front], st[front]
    ok = np.flatnonzero(reach.accept(f_state))
    if not len(ok):
        return None
    i = int(ok[np.argmax(f_score[ok])])
    chosen = []
    for g in range(len(groups) - 1, -1, -1):
        prev, option = back[g][0][i], back[g][1][i]
        chosen.append(groups[g].picks[int(option)])
        i = int(prev)
    return [p for pick in reversed(chosen) for p in pick]


def cheapest_cost(cost: CostModel) -> float:
    """The smallest cost of any architecture of the space (NB201: of any connected cell)."""
    groups = decision_groups(cost)
    picks = _best(groups, [-g.costs for g in groups], np.inf, _Reach(cost, groups))
    return cost.fixed + sum(float(cost.per_choice[t][e, k]) for t, e, k in picks)


def derive_within_budget(supernet_or_logits, cost: CostModel, budget: float, edge_logits=None):
    """The genotype (NB201, DARTS) or ``Arch`` (model spaces) of highest total log-probability
    whose cost is at most ``budget`` (in ``cost.unit``); ``BudgetError`` when none is.
    ``edge_logits``: with a dict of logits, PC-DARTS' edge logits (betas) per cell type.
    NB201: among the cells with a path of non-``none`` ops from input to output only (a cell
    without one makes the whole network a constant: a budget never buys that)."""
    lp = _log_probs(supernet_or_logits, cost, edge_logits)
    groups = decision_groups(cost)
    scores = [np.array([sum(lp[t][e, k] for t, e, k in pick) for pick in g.picks]) for g in groups]
    slack = budget + RTOL * max(1.0, abs(budget)) - cost.fixed
    picks = _best(groups, scores, slack, _Reach(cost, groups))
    if picks is None:  # nothing fits: say what the least is
        raise BudgetError(f"budget.max={budget:g} {cost.unit} is below the cheapest architecture, "
                          f"{cheapest_cost(cost):.6g} {cost.unit}")  # fmt: skip
    return _genotype(cost, picks, lp)


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
