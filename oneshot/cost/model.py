"""``CostModel``: what an architecture of a space costs, as a fixed part plus one cost per choice.

The additive model of ProxylessNAS (Cai et al., ICLR 2019) and FBNet (Wu et al., CVPR 2019):
cost(arch) = fixed + sum over decisions of the chosen candidate's cost in its place. Parameters
and FLOPs are exactly additive (every candidate's count depends only on its input shape, which
the choice does not change); latency is additive up to what the runtime shares between layers,
which ``oneshot.cost.additive_error`` measures.

Layout: ``per_choice[cell_type]`` is ``[n_edges, n_candidates]`` float64, the cost of candidate k
on edge e summed over every cell that shares that row of alphas (NB201: every cell; DARTS: every
normal, or every reduction cell; a model space: every choice carrying the label). Decisions are
read as the space reads them: NB201 one op per edge; DARTS two ``(op, input)`` pairs per node on
distinct inputs, never ``none``; a model space one candidate per label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

#: The unit each metric is expressed in (``budget.max`` is given in it).
UNITS = {"latency": "ms", "flops": "MFLOPs", "params": "M params"}
#: Relative slack of "within budget": sums of the same float64 costs in another order differ
#: in the last bits; without it an architecture costing exactly the budget could flip.
RTOL = 1e-9


def fits(cost: float, budget: float) -> bool:
    return cost <= budget + RTOL * max(1.0, abs(budget))


def _name_of(value) -> str:
    """A model-space architecture value as its candidate name (``oneshot.nn``'s naming)."""
    if isinstance(value, list | tuple):
        return "+".join(str(int(v)) for v in sorted(value))
    return str(value)


@dataclass
class CostModel:
    metric: str
    unit: str
    fixed: float
    per_choice: dict[str, torch.Tensor]
    candidates: dict[str, list[tuple[str, ...]]]
    meta: dict = field(default_factory=dict)

    @property
    def space(self) -> str:
        return self.meta["space"]

    # -- decisions -------------------------------------------------------------------------
    def darts_nodes(self) -> list[tuple[int, int]]:
        """``(first edge, number of inputs)`` of every intermediate node of a DARTS cell."""
        out, start = [], 0
        for node in range(self.meta["steps"]):
            out.append((start, node + 2))
            start += node + 2
        return out

    def choices_of(self, genotype) -> list[tuple[str, int, int]]:
        """The ``(cell type, edge, candidate)`` entries an architecture picks."""
        space = self.space
        if space == "nb201":
            ops = genotype.edge_ops
            return [("cell", e, self.candidates["cell"][e].index(op)) for e, op in enumerate(ops)]
        if space == "darts":
            out, nodes = [], self.darts_nodes()
            for t, pairs in (("normal", genotype.normal), ("reduce", genotype.reduce)):
                for k, (op, j) in enumerate(pairs):
                    first, _ = nodes[k // 2]
                    out.append((t, first + j, self.candidates[t][first + j].index(op)))
            return out
        return [(label, 0, self.candidates[label][0].index(_name_of(genotype[label])))
                for label in self.candidates]  # fmt: skip

    def of_genotype(self, genotype) -> float:
        """The cost of a discrete architecture: fixed part + its choices' costs."""
        if self.space == "model" and not isinstance(genotype, Mapping):
            raise ValueError(
                f"a model-space architecture is a {{label: value}} dict, got {genotype!r}"
            )
        total = self.fixed
        for t, e, k in self.choices_of(genotype):
            total += float(self.per_choice[t][e, k])
        return total

    def cheapest(self) -> float:
        """The smallest cost any architecture of the space can have (NB201: any connected cell,
        as ``derive_within_budget`` derives)."""
        from oneshot.cost.derive import cheapest_cost

        return cheapest_cost(self)

    # -- the differentiable expectation ----------------------------------------------------
    def expected(
        self, probs: Mapping[str, torch.Tensor], edge_weights: Mapping | None = None
    ) -> torch.Tensor:
        """Expected cost under per-edge probabilities (``supernet.arch_weights()``' layout),
        differentiable, on the probabilities' device and dtype.

        NB201 and model spaces: every decision independent, exactly ``fixed + sum p * cost``.
        DARTS: a node keeps two of its ``n`` inputs and never ``none``, so each edge's op
        probabilities are renormalised over its non-``none`` ops and the edge counts with weight
        ``2/n`` (with PC-DARTS' edge normalisation, ``2 * `` its edge weight): the expected cost
        of a cell whose two inputs per node are drawn with those weights."""
        first = next(iter(probs.values()))
        total = torch.zeros((), dtype=first.dtype, device=first.device)
        for t, p in probs.items():
            c = self.per_choice[t].to(device=p.device, dtype=p.dtype)
            if self.space != "darts":
                total = total + (p * c).sum()
                continue
            live = torch.tensor(
                [[name != "none" for name in row] for row in self.candidates[t]], device=p.device
            )
            q = p * live
            q = q / q.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            if edge_weights is not None and t in edge_weights:
                w = 2 * edge_weights[t].to(device=p.device, dtype=p.dtype)
            else:
                w = torch.cat([torch.full((n,), 2.0 / n, dtype=p.dtype, device=p.device)
                               for _, n in self.darts_nodes()])  # fmt: skip
            total = total + (w * (q * c).sum(-1)).sum()
        return total + self.fixed

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "metric": self.metric, "unit": self.unit, "fixed": self.fixed,
            "per_choice": {t: v.tolist() for t, v in self.per_choice.items()},
            "candidates": {t: [list(c) for c in v] for t, v in self.candidates.items()},
            "meta": self.meta,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> CostModel:
        return cls(
            metric=data["metric"], unit=data["unit"], fixed=float(data["fixed"]),
            per_choice={t: torch.tensor(v, dtype=torch.float64) for t, v in data["per_choice"].items()},
            candidates={t: [tuple(c) for c in v] for t, v in data["candidates"].items()},
            meta=dict(data["meta"]),
        )  # fmt: skip
