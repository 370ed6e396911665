"""TE-NAS: prune a supernet by importance, training-free (Chen, Gong, Wang, ICLR 2021, Alg. 1).

Start with every op on every edge. Each round, for every edge and every surviving op, measure
the NTK condition number kappa and the number of linear regions R of the supernet *without that
op* (one edge's mask loses one op, the others stay full), as relative changes from the current
supernet: ``dk = (k - k_without) / k`` and ``dR = (R - R_without) / R``. An op whose removal
lowers kappa most (large dk) and costs fewest regions (small dR) matters least: rank all
candidates by dk (descending) and by dR (ascending), dense ranks, and on every edge remove the
ops with the smallest rank sum. Repeat until ``keep`` ops per edge remain. In the DARTS space
every node then keeps two inputs: within each node the incoming edges are ranked the same way
(removing a whole edge) and all but the two most important are removed.

Followed from the reference (VITA-Group/TENAS, ``prune_tenas.py``, ``prune_launch.py``):
``none`` is pruned before the first round; ranks use changes rounded to ``precision`` (3)
decimals, ties share a rank and the rank sum's ties go to the larger dk; changes are averaged
over ``num_inits`` (3) Kaiming initialisations, fan-out for the NTK net, fan-in for the regions
net; pruned ops are masked with -inf logits, so an edge computes the *mean* of its surviving
ops (``average_masked_ops`` does that with our masks); the metric networks and batch sizes are
the reference's (``nb201_space``, ``darts_space``), and so is the order ops are visited in
(the DARTS space's ``reference_order``), which decides exact ties. Ours: one fixed NTK batch
and one fixed set of crops, and in each round the same initialisations for the current supernet
and every candidate (the reference draws new data per candidate), so candidates are compared
on common random numbers and the current supernet is measured once per round rather than per
candidate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from oneshot.genotypes import DartsGenotype, NB201Genotype
from oneshot.metrics import (
    DartsMetricNet,
    NB201SingleCell,
    nb201_ntk_network,
    reference_order,
    sample_images,
)
from oneshot.metrics.ntk import condition_number, ntk_gram, reinit_
from oneshot.metrics.regions import activation_patterns, count_unique_rows, random_crops
from oneshot.mixed import MixedOp
from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES
from oneshot.spaces.darts import cell_edges
from oneshot.spaces.nb201 import EDGES

log = logging.getLogger(__name__)


@contextlib.contextmanager
def average_masked_ops(model: nn.Module):
    """While active, a MixedOp given a mask of k ops returns their mean, not their sum."""

    def mean(module, args, kwargs, output):
        mask = args[1] if len(args) > 1 else kwargs.get("weights")
        if isinstance(mask, tuple) and len(mask) > 1 and output is not None:
            return output / len(mask)

    hooks = [
        m.register_forward_hook(mean, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, MixedOp)
    ]
    # Issue 15: a model space's choices (oneshot.nn) read their masks from a shared state.
    states = [s for m in model.modules() if hasattr(s := getattr(m, "_state", None), "average_masks")]
    for state in states:
        state.average_masks = True
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()
        for state in states:
            state.average_masks = False


@dataclass(frozen=True)
class TenasSpace:
    """A space as TE-NAS prunes it. ``ntk_network()``/``regions_network()`` build the two metric
    networks with all ``candidates``; their ``forward(x, weights)`` takes one MixedOp entry per
    edge per cell type. ``genotype`` maps {cell type: op name or None per edge} to a genotype.
    ``node_edges`` lists each node's incoming edges where nodes keep ``inputs_per_node`` inputs
    (DARTS); None keeps all edges. ``ops_per_round`` and ``ntk_batch``: the reference's values."""

    candidates: dict[str, list[tuple[str, ...]]]
    ntk_network: Callable[[], nn.Module]
    regions_network: Callable[[], nn.Module]
    edge_names: list[str]
    genotype: Callable[[dict], object] | None = None
    node_edges: list[list[int]] | None = None
    inputs_per_node: int = 2
    ops_per_round: int = 1
    ntk_batch: int = 72
    # Issue 15: count regions on whole images (a user's model), not on one-channel crops.
    regions_on_images: bool = False


def nb201_space(C: int = 3, N: int = 1, num_classes: int = 10, primitives=NB201_PRIMITIVES,
                in_channels: int = 3, candidates: dict | None = None) -> TenasSpace:  # fmt: skip
    """NB201: the NTK on the skeleton at C=3, N=1; regions on one stem-less C=1 cell; one op
    per edge per round, batch 72 (``prune_launch.py``). ``candidates``: a supernet's own
    per-edge op lists instead of ``primitives`` on every edge."""
    cands = {
        "cell": [tuple(c) for c in (candidates or {}).get("cell") or [primitives] * len(EDGES)]
    }
    return TenasSpace(
        cands,
        partial(nb201_ntk_network, cands, C, N, num_classes, in_channels),
        partial(NB201SingleCell, cands, 1, num_classes),
        [f"{t}<-{s}" for t, s in EDGES],
        genotype=lambda ops: NB201Genotype.from_edge_ops(ops["cell"]),
        ops_per_round=1,
        ntk_batch=72,
    )


def darts_space(C: int = 1, num_classes: int = 10, steps: int = 4, multiplier: int = 4, stem_multiplier: int = 1,
                primitives=DARTS_PRIMITIVES, ops_per_round: int = 3, ntk_batch: int = 14, in_channels: int = 3,
                candidates: dict | None = None) -> TenasSpace:  # fmt: skip
    """DARTS: both metrics on the reference's ``DartsMetricNet`` (affine BN, bare pools, C=1;
    the regions copy has no stem and one input channel), each edge's ops in the reference's
    order (``reference_order``: it decides exact ties); CIFAR-10 settings: three ops per edge
    per round, batch 14 (ImageNet: 2 and 24)."""
    edges = cell_edges(steps)
    cands = {
        t: [reference_order(c) for c in (candidates or {}).get(t) or [primitives] * len(edges)]
        for t in ("normal", "reduce")
    }
    concat = tuple(range(2 + steps - multiplier, steps + 2))

    def genotype(ops):
        cells = [
            tuple((op, j) for op, (_, j) in zip(ops[t], edges) if op is not None)
            for t in ("normal", "reduce")
        ]
        return DartsGenotype(cells[0], concat, cells[1], concat)

    sizes = {
        "C": C,
        "stem_multiplier": stem_multiplier,
        "steps": steps,
        "multiplier": multiplier,
        "num_classes": num_classes,
    }
    return TenasSpace(
        cands,
        partial(DartsMetricNet, cands, in_channels=in_channels, **sizes),
        partial(DartsMetricNet, cands, in_channels=1, stem=False, **sizes),
        [f"{t}<-{s}" for t, s in edges],
        genotype=genotype,
        node_edges=[
            [e for e, (node, _) in enumerate(edges) if node == k + 2] for k in range(steps)
        ],
        ops_per_round=ops_per_round,
        ntk_batch=ntk_batch,
    )


TENAS_SPACES: dict[str, Callable[..., TenasSpace]] = {"nb201": nb201_space, "darts": darts_space}


def max_keep(space: TenasSpace) -> int:
    """The most ops an edge can keep: the fewest candidates besides ``none`` on any edge."""
    return min(
        len([op for op in c if op != "none"]) for cs in space.candidates.values() for c in cs
    )


def check_keep(keep, space: TenasSpace, name: str = "keep", lowest: int = 1, why: str = "") -> None:
    """One clear error for an impossible ``keep``, naming it and the valid range ``lowest..``
    the candidates per edge; ``why`` ends the line (the reason for ``lowest``)."""
    top = max_keep(space)
    if isinstance(keep, bool) or not isinstance(keep, int) or not lowest <= keep <= top:
        valid = f"{lowest}..{top}" if lowest <= top else "none"
        raise ValueError(
            f"{name}={keep!r} is out of range; valid: {valid} (ops per edge to keep; "
            f"every edge has {top} candidates besides 'none'){why}"
        )


def relative_change(before: float, after: float) -> float:
    """``(before - after) / before``, with the limits where a condition number is infinite."""
    if before == after:
        return 0.0
    if before == float("inf"):
        return 1.0
    return -float("inf") if after == float("inf") else (before - after) / before


def dense_ranks(values: list[float], descending: bool) -> tuple[list[int], list[int]]:
    """Rank of each value (equal values share one, the next distinct value gets the next) and
    the stable sorted order, as ``prune_func_rank`` ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=descending)
    ranks, r = [0] * len(values), 0
    for pos, i in enumerate(order):
        r += pos > 0 and values[i] != values[order[pos - 1]]
        ranks[i] = r
    return ranks, order


def combined_order(
    ntk_change: list[float], regions_change: list[float]
) -> tuple[list[int], list[int], list[int]]:
    """Candidates from least to most important: by rank sum, ties in dk order. Also the ranks."""
    ntk_rank, ntk_order = dense_ranks(ntk_change, descending=True)
    regions_rank, _ = dense_ranks(regions_change, descending=False)
    position = {i: p for p, i in enumerate(ntk_order)}
    order = sorted(
        range(len(ntk_change)), key=lambda i: (ntk_rank[i] + regions_rank[i], position[i])
    )
    return order, ntk_rank, regions_rank


def proxy_change(before: float, after: float) -> float:
    """``(before - after) / |before|`` for any proxy (issue 18): positive when removing the op
    lowered the score. Where either is infinite or NaN, +-1 by which is larger (0 if neither)."""
    if before == after:
        return 0.0
    if not (math.isfinite(before) and math.isfinite(after)):
        return 1.0 if before > after else -1.0 if after > before else 0.0
    if before == 0.0:
        return math.copysign(1.0, before - after)
    return (before - after) / abs(before)


def combined_ranks(changes: dict[str, list[float]], metrics) -> tuple[list[int], dict[str, list[int]]]:
    """``combined_order`` for any metrics (issue 18): each metric's changes ranked densely, a
    lower-is-better metric's (kappa) descending, the others ascending (an op whose removal costs
    the least goes first); candidates by rank sum, ties in the first metric's order. With
    ``["ntk", "regions"]`` exactly ``combined_order``."""
    from oneshot.metrics.ensemble import direction

    ranks, first_order = {}, None
    for m in metrics:
        ranks[m], order = dense_ranks(changes[m], descending=not direction(m))
        first_order = order if first_order is None else first_order
    position = {i: p for p, i in enumerate(first_order)}
    n = len(first_order)
    order = sorted(range(n), key=lambda i: (sum(ranks[m][i] for m in metrics), position[i]))
    return order, ranks


@dataclass(frozen=True)
class PruneRow:
    """One candidate of one round: the supernet without ``op`` on ``edge`` (stage "op") or
    without the whole edge (stage "edge"); ``ntk``/``regions`` are its means, ``*_change`` the
    mean relative changes ranked, ``rank`` their rank sum; the lowest sums were ``pruned``."""

    round: int
    stage: str
    cell_type: str
    edge: str
    op: str
    ntk: float
    regions: float
    ntk_change: float
    regions_change: float
    ntk_rank: int
    regions_rank: int
    rank: int
    pruned: bool


@dataclass
class PruneResult:
    """``survivors``: the ops kept on each edge, usable as ``candidates=`` of a smaller supernet;
    ``genotype`` when ``keep == 1``; ``edges``: the edges each cell type kept (DARTS)."""

    survivors: dict[str, list[tuple[str, ...]]]
    genotype: object | None
    history: list[PruneRow] = field(default_factory=list)
    edges: dict[str, list[int]] | None = None
    # Issue 18: per history row, the value, change and rank of each metric besides ntk/regions.
    extra: list[dict] = field(default_factory=list)


class _Meter:
    """Both metrics of masked supernets, on common initialisations within a round."""

    def __init__(self, space, batch, crops, num_inits, seed, precision, method, progress,
                 metrics=("ntk", "regions"), targets=None):  # fmt: skip
        self.metrics, self.targets = list(metrics), targets  # issue 18: any set of metrics
        with torch.random.fork_rng(
            devices=[]
        ):  # building draws default inits; reinit_ replaces them
            self.ntk_net, self.regions_net = space.ntk_network(), space.regions_network()
        self.batch, self.crops, self.num_inits, self.seed = batch, crops, num_inits, seed
        self.precision, self.method, self.progress = precision, method, progress
        self.start = time.perf_counter()

    def _kappa(self, masks):
        with average_masked_ops(self.ntk_net):
            return condition_number(
                ntk_gram(self.ntk_net, self.batch, {"weights": masks}, self.method)
            )

    def _regions(self, masks):
        with average_masked_ops(self.regions_net):
            return count_unique_rows(
                activation_patterns(self.regions_net, self.crops, 1000, {"weights": masks})
            )

    def _proxies(self, masks, seed):
        """Issue 18: the zero-cost proxies of the masked NTK network, PyTorch's default init
        seeded by ``seed`` (the same for every variant of a round), on the NTK batch."""
        from oneshot.metrics.proxies import LOSS_PROXIES, PROXIES, loss_proxies

        wanted = [m for m in self.metrics if m not in ("ntk", "regions")]
        kw = {"seed": seed, "forward_kwargs": {"weights": masks}}
        out = {}
        with average_masked_ops(self.ntk_net):
            lossy = [m for m in wanted if m in LOSS_PROXIES]
            if lossy:
                out.update(loss_proxies(self.ntk_net, self.batch, self.targets, lossy, **kw))
            for m in wanted:
                if m not in LOSS_PROXIES:
                    out[m] = PROXIES[m](self.ntk_net, self.batch, self.targets, **kw)
        return out

    def __call__(self, current, variants, round_, label):
        if self.metrics != ["ntk", "regions"]:
            return self._measure(current, variants, round_, label)
        k, r, dk, dr = ([0.0] * len(variants) for _ in range(4))
        line = f"{label}: {len(variants) + 1} networks x {self.num_inits} inits, {time.perf_counter() - self.start:.0f} s in"
        with _progress(self.progress, label, line, self.num_inits * (len(variants) + 1)) as advance:
            for i in range(self.num_inits):
                s = self.seed * 1_000_003 + round_ * 1_009 + i  # a fresh init per round and repeat
                reinit_(self.ntk_net, "fan_out", torch.Generator().manual_seed(s))
                reinit_(self.regions_net, "fan_in", torch.Generator().manual_seed(s))
                k0, r0 = self._kappa(current), self._regions(current)
                advance()
                for v, masks in enumerate(variants):
                    kv, rv = self._kappa(masks), self._regions(masks)
                    k[v], r[v] = k[v] + kv / self.num_inits, r[v] + rv / self.num_inits
                    dk[v] += round(relative_change(k0, kv), self.precision) / self.num_inits
                    dr[v] += round(relative_change(r0, rv), self.precision) / self.num_inits
                    advance()
        return {"ntk": k, "regions": r}, {"ntk": dk, "regions": dr}

    def _measure(self, current, variants, round_, label):
        """Any set of metrics (issue 18), on the same initialisations as TE-NAS' two."""
        values = {m: [0.0] * len(variants) for m in self.metrics}
        changes = {m: [0.0] * len(variants) for m in self.metrics}
        line = f"{label}: {len(variants) + 1} networks x {self.num_inits} inits, {time.perf_counter() - self.start:.0f} s in"
        with _progress(self.progress, label, line, self.num_inits * (len(variants) + 1)) as advance:
            for i in range(self.num_inits):
                s = self.seed * 1_000_003 + round_ * 1_009 + i  # a fresh init per round and repeat
                reinit_(self.ntk_net, "fan_out", torch.Generator().manual_seed(s))
                reinit_(self.regions_net, "fan_in", torch.Generator().manual_seed(s))

                def measure(masks, s=s):  # this repeat's seed, bound now
                    out = self._proxies(masks, s)
                    if "ntk" in self.metrics:
                        out["ntk"] = self._kappa(masks)
                    if "regions" in self.metrics:
                        out["regions"] = self._regions(masks)
                    return out

                before = measure(current)
                advance()
                for v, masks in enumerate(variants):
                    after = measure(masks)
                    for m in self.metrics:
                        change = (relative_change if m in ("ntk", "regions") else proxy_change)(before[m], after[m])
                        values[m][v] += after[m] / self.num_inits
                        changes[m][v] += round(change, self.precision) / self.num_inits
                    advance()
        return values, changes


@contextlib.contextmanager
def _progress(enabled: bool, label: str, line: str, total: int):
    """A transient bar on a terminal; piped (a log file, a cluster job's output), where a bar
    shows nothing until it ends, the plain ``line`` once per round, so a long prune (minutes per
    round on the DARTS space) is never silent."""
    if not enabled:
        yield lambda: None
        return
    if not sys.stderr.isatty():
        log.info(line)
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def _replace(alive, t, e, entry):
    return {
        c: [entry if (c, f) == (t, e) else a for f, a in enumerate(edges)]
        for c, edges in alive.items()
    }


def _first_per_group(order, cands, group, quota: dict, allowed=None) -> set[int]:
    """The first ``quota[group(c)]`` candidates of each group, in ``order``; with ``allowed``
    (issue 17) only those ``allowed(i, chosen so far)`` accepts."""
    taken, chosen = {}, set()
    for i in order:
        g = group(cands[i])
        if taken.get(g, 0) < quota[g] and (allowed is None or allowed(i, chosen)):
            taken[g] = taken.get(g, 0) + 1
            chosen.add(i)
    return chosen


def budget_check(cost, budget: float) -> Callable[[dict], float]:
    """Issue 17: ``cheapest(survivors)``, the least cost (``oneshot.cost.CostModel``, additive)
    of any architecture a pruned supernet can still form - ``survivors``: per cell type, per edge
    the op names left (None: an edge removed). Each decision of the space (an edge's op; a DARTS
    node's two inputs with their ops) takes its cheapest option among the surviving ones."""
    from oneshot.cost.derive import decision_groups

    groups = decision_groups(cost)

    def cheapest(survivors: dict) -> float:
        total = cost.fixed
        for g in groups:
            options = [c for c, pick in zip(g.costs, g.picks)
                       if all(survivors[t][e] is not None and cost.candidates[t][e][k] in survivors[t][e] for t, e, k in pick)]  # fmt: skip
            if not options:
                return math.inf
            total += float(min(options))
        return total

    return cheapest


def _within_budget(budget, names: dict, alive: dict):
    """``allowed(cands, stage, i, chosen)`` for ``_first_per_group``: removing candidate ``i``
    after ``chosen`` leaves a supernet whose cheapest architecture fits; None without a budget.
    ``alive`` is read when called (the prune updates it in place)."""
    if budget is None:
        return None
    from oneshot.cost.derive import BudgetError
    from oneshot.cost.model import fits

    cost, limit = budget
    cheapest = budget_check(cost, limit)

    def by_name(state):
        return {t: [None if a is None else {names[t][e][o] for o in a} for e, a in enumerate(edges)]
                for t, edges in state.items()}  # fmt: skip

    start = cheapest(by_name(alive))
    if not fits(start, limit):  # 'none' never survives a prune: the cheapest architecture without it
        raise BudgetError(f"budget.max={limit:g} {cost.unit} is below the cheapest architecture TE-NAS can derive "
                          f"(no 'none' op), {start:.6g} {cost.unit}")  # fmt: skip

    def allowed(cands, stage, i, chosen):
        state = {t: list(edges) for t, edges in alive.items()}
        for j in (*chosen, i):
            t, e, op = cands[j]
            state[t][e] = None if stage == "edge" else tuple(o for o in state[t][e] if o != op)
        return fits(cheapest(by_name(state)), limit)

    return allowed


def _count_rounds(space: TenasSpace, alive: dict, keep: int, per_round: int) -> int:
    """How many rounds ``prune`` will take: each op round removes up to ``per_round`` ops from
    every edge, then (DARTS, ``keep == 1``) one edge round per node with surplus inputs."""
    op_rounds = max((math.ceil((len(a) - keep) / per_round) for e in alive.values() for a in e if len(a) > keep), default=0)
    if keep > 1 or space.genotype is None or not space.node_edges:
        return op_rounds
    return op_rounds + len(alive) * sum(len(node) > space.inputs_per_node for node in space.node_edges)


def prune(space: str | TenasSpace = "nb201", images: torch.Tensor | None = None, keep: int = 1, *,
          num_inits: int = 3, seed: int = 0, ntk_batch: int | None = None, n_crops: int = 3000,
          crop_size: int = 3, ops_per_round: int | None = None, precision: int = 3, method: str = "loop",
          progress: bool = False, metrics=("ntk", "regions"), targets: torch.Tensor | None = None,
          budget: tuple | None = None, **space_kwargs) -> PruneResult:  # fmt: skip
    """Prune ``space`` (a name in ``TENAS_SPACES``, sized by ``space_kwargs``, or a
    ``TenasSpace``) down to ``keep`` ops per edge, measuring on ``images`` (real training images,
    normalised as for training): the NTK on ``ntk_batch`` of them (default: the space's), the
    regions on ``n_crops`` one-channel ``crop_size`` crops. Deterministic given ``seed``.
    ``metrics`` (issue 18): any of ``oneshot.metrics.HIGHER_IS_BETTER``, ranked by the sum of
    their ranks; the zero-cost proxies are taken on the NTK network and batch (``targets``: that
    batch's labels, drawn as the images are, for the loss-based ones). TE-NAS is the default.
    ``budget`` (issue 17): ``(cost model, budget.max)``; an op or edge whose removal would leave
    a supernet whose cheapest architecture is over budget is kept and the next-ranked one goes
    instead, so every pruned supernet - and the derived genotype - stays within budget."""
    if isinstance(space, str):
        space = TENAS_SPACES[space](**space_kwargs)
    if images is None:
        raise ValueError("prune needs real training images")
    names, per_round = space.candidates, ops_per_round or space.ops_per_round
    alive = {
        t: [tuple(i for i, op in enumerate(c) if op != "none") for c in cands]
        for t, cands in names.items()
    }
    check_keep(keep, space)
    allowed = _within_budget(budget, names, alive)
    batch, crops = (
        sample_images(images, ntk_batch or space.ntk_batch, seed),
        sample_images(images, n_crops, seed) if space.regions_on_images else random_crops(images, n_crops, crop_size, seed),
    )
    metrics = list(metrics)
    if targets is not None:  # the labels of the NTK batch: the same seeded draw as its images
        targets = sample_images(targets, ntk_batch or space.ntk_batch, seed)
    meter = _Meter(space, batch, crops, num_inits, seed, precision, method, progress, metrics, targets)
    history, round_, rounds = [], 0, _count_rounds(space, alive, keep, per_round)
    extra = []  # issue 18: the other metrics' columns, one dict per history row

    def rank(cands, variants, stage, group, quota):
        """Measure the variants, rank them, record the rows; the candidates to remove."""
        values, changes = meter(alive, variants, round_, f"TE-NAS round {round_} ({round_ + 1} of {rounds}, {stage}s)")
        order, ranks = combined_ranks(changes, metrics)
        removed = _first_per_group(order, cands, group, quota, allowed and partial(allowed, cands, stage))
        nan, none = [math.nan] * len(cands), [-1] * len(cands)  # a metric not measured
        k, dk = values.get("ntk", nan), changes.get("ntk", nan)
        r, dr = values.get("regions", nan), changes.get("regions", nan)
        nr, rr = ranks.get("ntk", none), ranks.get("regions", none)
        for i, (t, e, op) in enumerate(cands):
            total = sum(ranks[m][i] for m in metrics)
            row = PruneRow(round_, stage, t, space.edge_names[e], names[t][e][op], k[i], r[i], dk[i], dr[i], nr[i],
                           rr[i], total, i in removed)  # fmt: skip
            history.append(row)
            extra.append({f"{m}{suffix}": d[m][i] for m in metrics if m not in ("ntk", "regions")
                          for suffix, d in (("", values), ("_change", changes), ("_rank", ranks))})  # fmt: skip
            if row.pruned:
                log.info("TE-NAS round %d: remove %s from %s edge %s", round_, row.op, t, row.edge)
        return [cands[i] for i in sorted(removed)]

    while max(len(a) for edges in alive.values() for a in edges) > keep:
        cands = [
            (t, e, op)
            for t, edges in alive.items()
            for e, ops in enumerate(edges)
            if len(ops) > keep
            for op in ops
        ]
        variants = [
            _replace(alive, t, e, tuple(o for o in alive[t][e] if o != op)) for t, e, op in cands
        ]
        quota = {(t, e): min(per_round, len(alive[t][e]) - keep) for t, e, _ in cands}
        for t, e, op in rank(cands, variants, "op", lambda c: c[:2], quota):
            alive[t][e] = tuple(o for o in alive[t][e] if o != op)
        round_ += 1
    survivors = {
        t: [tuple(names[t][e][o] for o in ops) for e, ops in enumerate(edges)]
        for t, edges in alive.items()
    }
    if keep > 1 or space.genotype is None:
        return PruneResult(survivors, None, history, extra=extra if any(extra) else [])

    # DARTS: every node keeps its `inputs_per_node` most important incoming edges, node by node.
    for t in alive if space.node_edges else ():
        for node in space.node_edges:
            if len(node) > space.inputs_per_node:
                cands = [(t, e, alive[t][e][0]) for e in node]
                variants = [_replace(alive, t, e, None) for e in node]
                quota = {t: len(node) - space.inputs_per_node}
                for _, e, _ in rank(cands, variants, "edge", lambda c: c[0], quota):
                    alive[t][e] = None
                round_ += 1
    ops = {
        t: [names[t][e][a[0]] if a else None for e, a in enumerate(edges)]
        for t, edges in alive.items()
    }
    edges = (
        {t: [e for e, a in enumerate(es) if a] for t, es in alive.items()}
        if space.node_edges
        else None
    )
    return PruneResult(survivors, space.genotype(ops), history, edges, extra if any(extra) else [])
