"""The DARTS CNN cell space (Liu, Simonyan, Yang, ICLR 2019): supernet and evaluation network.

A cell takes the outputs of the two previous cells (inputs 0 and 1, each through a 1x1
preprocessing conv, or a factorized reduce when the previous cell halved the resolution), builds
``steps`` intermediate nodes each summing edges from all earlier nodes, and concatenates the last
``multiplier`` nodes. Reduction cells (edges from the inputs stride 2) sit at 1/3 and 2/3 of the
depth, and the channel count doubles there. The supernet has 14 mixed edges per cell; the
evaluation network keeps two edges per node from a genotype, with drop path and an auxiliary
head at 2/3 depth (Szegedy et al.), as in the paper's CIFAR-10 retraining.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oneshot.derive import derive_darts, edge_softmax
from oneshot.genotypes import DartsGenotype, GenotypeError, validate_darts
from oneshot.mixed import MixedOp, add_edges_from, leaving_edges
from oneshot.ops import DARTS_PRIMITIVES, FactorizedReduce, ReLUConvBN, Zero, make_op
from oneshot.spaces.base import SupernetBase


def reduction_layers(layers: int) -> tuple[int, ...]:
    return (layers // 3, 2 * layers // 3)


def normal_cells(layers: int) -> int:
    """How many of ``layers`` cells are normal: none below 3, where both reductions cover them all."""
    return sum(i not in reduction_layers(layers) for i in range(layers))


def cell_edges(steps: int) -> list[tuple[int, int]]:
    """(target node, input) per edge; inputs 0, 1 are the previous cells, nodes count from 2."""
    return [(node + 2, j) for node in range(steps) for j in range(node + 2)]


def _preprocess(C_pp, C_p, C, reduction_prev, affine):
    pre0 = FactorizedReduce(C_pp, C, affine) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0, affine=affine)
    return pre0, ReLUConvBN(C_p, C, 1, 1, 0, affine=affine)


class SearchCell(nn.Module):
    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction, reduction_prev, candidates, partial=1):
        super().__init__()
        self.steps, self.multiplier, self.reduction = steps, multiplier, reduction
        self.preprocess0, self.preprocess1 = _preprocess(C_pp, C_p, C, reduction_prev, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(C, C, 2 if reduction and j < 2 else 1, candidates[e], affine=False, pool_bn=True, partial=partial)
            for e, (_, j) in enumerate(cell_edges(steps))
        )
        self._zero = Zero(C, C, 2 if reduction else 1)
        self._leaving = leaving_edges(cell_edges(steps))

    def forward(self, s0, s1, weights, edge_weights=None):
        """``edge_weights``: PC-DARTS' normalised edge weights, one per edge, or ``None``.

        Source by source: the edges leaving a state run together (``add_edges_from``: its ReLU
        made once for the up to 16 ops that start with one); node sums keep the source order."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        totals: dict[int, torch.Tensor] = {}
        for source in range(self.steps + 1):
            add_edges_from(states[source], self._leaving[source], self.edges, weights, totals, edge_weights)
            if source >= 1:  # every edge into node source + 1 has now run
                out = totals.pop(source + 1, None)
                states.append(out if out is not None else self._zero(states[0]))
        return torch.cat(states[-self.multiplier :], dim=1)


class DartsSupernet(SupernetBase):
    cell_types = ("normal", "reduce")

    def __init__(
        self,
        C: int = 16,
        layers: int = 8,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        primitives: Sequence[str] = DARTS_PRIMITIVES,
        candidates: dict | None = None,
        partial_channels: int = 1,
        edge_normalization: bool | None = None,
        channels_last: bool = True,
    ):
        """``partial_channels=K``: PC-DARTS' partial channel connections (1/K of the channels
        through the mixed ops); ``edge_normalization``: its per-node softmax over incoming edges
        (``None``: on exactly when K > 1, as in PC-DARTS)."""
        super().__init__()
        if C < 2 or C % 2 or steps < 1 or not 1 <= multiplier <= steps or num_classes < 1:
            raise ValueError(
                f"impossible DARTS sizes: C={C} (even, >= 2), layers={layers} (>= 3), steps={steps}, "
                f"multiplier={multiplier} (1..steps), classes={num_classes}"
            )
        if normal_cells(layers) == 0:  # its normal alphas would get no gradient: autograd fails
            raise ValueError(
                f"space.supernet.layers={layers}: a DARTS supernet needs layers >= 3 (the reduction cells "
                f"at layers//3 and 2*layers//3 leave no normal cell to search below 3)"
            )
        n_edges = len(cell_edges(steps))
        self.candidates = {
            t: self._check_candidates((candidates or {}).get(t) or [tuple(primitives)] * n_edges, n_edges, t)
            for t in self.cell_types
        }
        self.steps, self.multiplier = steps, multiplier
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_multiplier * C, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_multiplier * C),
        )
        C_pp, C_p, C_curr, reduction_prev = stem_multiplier * C, stem_multiplier * C, C, False
        self.cells = nn.ModuleList()
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            C_curr = C_curr * 2 if reduction else C_curr
            cands = self.candidates["reduce" if reduction else "normal"]
            self.cells.append(
                SearchCell(steps, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, cands, partial_channels)
            )
            reduction_prev = reduction
            C_pp, C_p = C_p, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self._edge_names = [f"{t}<-{s}" for t, s in cell_edges(steps)]
        self._init_alphas()
        self.edge_normalization = partial_channels > 1 if edge_normalization is None else bool(edge_normalization)
        # PC-DARTS' betas: one logit per edge, initialised like the alphas; architecture parameters.
        self.betas = nn.ParameterDict(
            {t: nn.Parameter(1e-3 * torch.randn(n_edges)) for t in self.cell_types} if self.edge_normalization else {}
        )
        # NHWC: oneDNN's depthwise convs, whose backward dominates this space's step, are 2-3x
        # faster in it on CPU (the whole step 2x, bench/search_step.py); GPUs prefer it too.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.alphas.values()) + list(self.betas.values())

    def edge_weights(self) -> dict[str, torch.Tensor]:
        """PC-DARTS' normalised edge weights per cell type (empty without edge normalisation)."""
        return {t: edge_softmax(b, self.steps) for t, b in self.betas.items()}

    def forward(self, x, weights=None):
        """With edge normalisation, the default (softmax) weights also scale every edge's output
        by its beta weight; explicit ``weights`` (samples, masks) compute the plain cells."""
        edge_weights = self.edge_weights() if weights is None else {}
        weights = self.arch_weights() if weights is None else weights
        s0 = s1 = self.stem(x.contiguous(memory_format=self.memory_format))
        for cell in self.cells:
            t = "reduce" if cell.reduction else "normal"
            s0, s1 = s1, cell(s0, s1, weights[t], edge_weights.get(t))
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype(self) -> DartsGenotype:
        return derive_darts(
            self.alphas["normal"], self.alphas["reduce"], self.candidates["normal"], self.candidates["reduce"],
            self.steps, self.multiplier, self.betas.get("normal"), self.betas.get("reduce"),
        )  # fmt: skip

    def weights_for(self, genotype: DartsGenotype) -> dict:
        """Per-edge entries (op index, a mask of two, or ``None`` for unused edges) that make the
        supernet compute the genotype's cells."""
        if not isinstance(genotype, DartsGenotype):
            raise GenotypeError(f"genotype {genotype} is not a DARTS genotype")
        if genotype.steps != self.steps:
            raise GenotypeError(f"genotype has {genotype.steps} nodes per cell; this supernet has {self.steps}")
        concat = tuple(range(2 + self.steps - self.multiplier, self.steps + 2))
        if genotype.normal_concat != concat or genotype.reduce_concat != concat:
            raise GenotypeError(f"genotype concatenates nodes other than {list(concat)}, as this supernet does")
        index = {edge: e for e, edge in enumerate(cell_edges(self.steps))}
        out = {}
        for t, pairs in (("normal", genotype.normal), ("reduce", genotype.reduce)):
            entries: list = [None] * len(index)
            for k, (op, j) in enumerate(pairs):
                e = index[(k // 2 + 2, j)]
                if op not in self.candidates[t][e]:
                    raise GenotypeError(
                        f"genotype op {op!r} on {t} edge {self._edge_names[e]} is not in this supernet; "
                        f"valid ops there: {', '.join(self.candidates[t][e])}"
                    )
                i = self.candidates[t][e].index(op)
                prev = entries[e]  # the same input twice: a mask of both ops
                entries[e] = i if prev is None else (prev if isinstance(prev, tuple) else (prev,)) + (i,)
            out[t] = entries
        return out


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of a branch with probability ``drop_prob``, rescaling the rest."""
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    def __init__(self, edges, concat, C_pp, C_p, C, reduction, reduction_prev):
        super().__init__()
        self.reduction, self.concat = reduction, tuple(concat)
        self.preprocess0, self.preprocess1 = _preprocess(C_pp, C_p, C, reduction_prev, affine=True)
        self.indices = [j for _, j in edges]
        self.ops = nn.ModuleList(make_op(op, C, C, 2 if reduction and j < 2 else 1, True) for op, j in edges)
        self.multiplier = len(self.concat)

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(len(self.ops) // 2):
            total = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], nn.Identity):
                    h = drop_path(h, drop_prob)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier at 2/3 depth. On 8x8 features (32x32 CIFAR) it is the paper's
    5x5/3 average pool; other sizes pool adaptively to the same 2x2 grid."""

    def __init__(self, C: int, num_classes: int, feature_size: int):
        super().__init__()
        pool = (
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False)
            if feature_size == 8
            else nn.AdaptiveAvgPool2d(2)
        )
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            pool,
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class DartsNetwork(nn.Module):
    """The evaluation network of a DARTS genotype. ``drop_path_prob`` is set by the trainer."""

    def __init__(
        self,
        genotype: DartsGenotype,
        C: int = 36,
        layers: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        auxiliary: bool = True,
        stem_multiplier: int = 3,
        channels_last: bool = True,
    ):
        super().__init__()
        from oneshot.validate import check_genotype

        check_genotype(genotype, "darts", "DartsNetwork")
        validate_darts(genotype)
        if C < 2 or C % 2 or layers < 1:
            raise ValueError(f"impossible DARTS network sizes: C={C} (even, >= 2), layers={layers} (>= 1)")
        self.genotype, self.drop_path_prob = genotype, 0.0
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_multiplier * C, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_multiplier * C),
        )
        C_pp, C_p, C_curr, reduction_prev = stem_multiplier * C, stem_multiplier * C, C, False
        self.cells = nn.ModuleList()
        self.auxiliary_head, self._aux_at, size = None, 2 * layers // 3, image_size
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr, size = C_curr * 2, (size + 1) // 2
            edges, concat = (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
            cell = EvalCell(edges, concat, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if auxiliary and i == self._aux_at:
                self.auxiliary_head = AuxiliaryHead(C_p, num_classes, size)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)  # NHWC, as the supernet (see there)

    def forward(self, x):
        """Logits, or ``(logits, auxiliary logits)`` in training mode with the auxiliary head."""
        s0 = s1 = self.stem(x.contiguous(memory_format=self.memory_format))
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self._aux_at and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, logits_aux) if logits_aux is not None else logits
