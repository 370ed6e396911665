"""The NAS-Bench-201 cell space (Dong & Yang, ICLR 2020) as a supernet and as discrete networks.

Macro skeleton, as in the benchmark: 3x3 stem conv (C channels) + BN; three stages of N cells at
C, 2C, 4C channels joined by residual reduction blocks; BN-ReLU; global average pooling; linear.
The cell is a DAG of 4 nodes: node j sums ``op_{j<-i}(node i)`` over i < j, and the cell's
output is node 3. Edge order is (1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2), the order of the
benchmark's architecture strings, so a derived string means the benchmark's network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from oneshot.derive import derive_nb201
from oneshot.genotypes import GenotypeError, NB201Genotype
from oneshot.mixed import MixedOp, add_edges_from, leaving_edges
from oneshot.ops import NB201_PRIMITIVES, ReLUConvBN
from oneshot.spaces.base import SupernetBase

N_NODES = 4
EDGES = [(j, i) for j in range(1, N_NODES) for i in range(j)]  # (target, source)
LEAVING = leaving_edges(EDGES)


class ResNetBasicBlock(nn.Module):
    """The benchmark's reduction block: two ReLU-Conv-BN (first strides) + avgpool/1x1 shortcut."""

    def __init__(self, C_in: int, C_out: int, stride: int = 2):
        super().__init__()
        self.conv_a = ReLUConvBN(C_in, C_out, 3, stride, 1)
        self.conv_b = ReLUConvBN(C_out, C_out, 3, 1, 1)
        self.downsample = nn.Sequential(
            nn.AvgPool2d(kernel_size=2, stride=2, padding=0), nn.Conv2d(C_in, C_out, 1, bias=False)
        )

    def forward(self, x):
        return self.downsample(x) + self.conv_b(self.conv_a(x))


class NB201Cell(nn.Module):
    def __init__(self, C: int, candidates: Sequence[Sequence[str]], affine: bool):
        super().__init__()
        self.edges = nn.ModuleList(MixedOp(C, C, 1, cands, affine=affine) for cands in candidates)

    def forward(self, x, weights):
        # Source by source: the edges leaving node i share its ReLU (oneshot.mixed.add_edges_from);
        # node j sums its inputs in source order, as the benchmark does.
        nodes, totals = [x], {}
        for i in range(N_NODES - 1):
            add_edges_from(nodes[i], LEAVING[i], self.edges, weights, totals)
            out = totals.pop(i + 1, None)
            nodes.append(out if out is not None else torch.zeros_like(x))
        return nodes[-1]


class NB201Network(SupernetBase):
    """Supernet (``search=True``: all candidates, alphas) or discrete net (one op per edge)."""

    cell_types = ("cell",)

    def __init__(
        self,
        C: int = 16,
        N: int = 5,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        primitives: Sequence[str] = NB201_PRIMITIVES,
        candidates: dict | None = None,
        affine: bool = False,
        search: bool = True,
        stem: bool = True,
        channels_last: bool = True,
    ):
        super().__init__()
        if C < 1 or N < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"impossible NB201 sizes: C={C}, N={N}, classes={num_classes}, channels={in_channels}")
        if image_size < 4 or image_size % 4:  # odd sides at a reduction: the shortcut's pool and the conv disagree
            raise ValueError(f"image side {image_size} does not fit NB201 (two stride-2 reductions): resize to a multiple of 4 with data.image_size=...")
        cands = (candidates or {}).get("cell") or [tuple(primitives)] * len(EDGES)
        self.candidates = {"cell": self._check_candidates(cands, len(EDGES), "cell")}
        self.C, self.N, self.search = C, N, search
        # TE-NAS counts linear regions on a stem-less copy whose first cell sees the raw input.
        self.stem = (
            nn.Sequential(nn.Conv2d(in_channels, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
            if stem
            else nn.Identity()
        )
        C_prev = C if stem else in_channels
        layers = []
        for stage, C_stage in enumerate((C, 2 * C, 4 * C)):
            if stage > 0:
                layers.append(ResNetBasicBlock(C_prev, C_stage, 2))
            for _ in range(N):
                layers.append(NB201Cell(C_stage, self.candidates["cell"], affine))
            C_prev = C_stage
        self.cells = nn.ModuleList(layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(C_prev), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self._edge_names = [f"{t}<-{s}" for t, s in EDGES]
        if search:
            self._init_alphas()
        else:
            self.alphas = nn.ParameterDict()
        # NHWC: oneDNN's convs (depthwise and 16-64 channels above all) and BN run faster in it,
        # on CPU 1.5x for the whole NB201 search step (bench/search_step.py); GPUs prefer it too.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x, weights=None):
        if weights is None:
            weights = self.arch_weights() if self.search else {"cell": [0] * len(EDGES)}
        w = weights["cell"]
        x = self.stem(x.contiguous(memory_format=self.memory_format))
        for layer in self.cells:
            x = layer(x, w) if isinstance(layer, NB201Cell) else layer(x)
        x = self.global_pooling(self.lastact(x)).flatten(1)
        return self.classifier(x)

    def genotype(self) -> NB201Genotype:
        if not self.search:
            return NB201Genotype.from_edge_ops([c[0] for c in self.candidates["cell"]])
        return derive_nb201(self.alphas["cell"], self.candidates["cell"])

    def weights_for(self, genotype: NB201Genotype) -> dict:
        """Per-edge op indices that make this supernet compute exactly ``genotype``."""
        if not isinstance(genotype, NB201Genotype):
            raise GenotypeError(f"genotype {genotype} is not an NB201 genotype")
        idx = []
        for e, op in enumerate(genotype.edge_ops):
            if op not in self.candidates["cell"][e]:
                raise GenotypeError(
                    f"genotype op {op!r} on edge {self._edge_names[e]} is not in this supernet; "
                    f"valid ops there: {', '.join(self.candidates['cell'][e])}"
                )
            idx.append(self.candidates["cell"][e].index(op))
        return {"cell": idx}


def nb201_network(genotype: NB201Genotype, C: int = 16, N: int = 5, **kwargs) -> NB201Network:
    """The benchmark's discrete network for an architecture string (affine BN, as trained there)."""
    if isinstance(genotype, str):
        from oneshot.genotypes import parse_nb201

        genotype = parse_nb201(genotype)
    from oneshot.validate import check_genotype

    check_genotype(genotype, "nb201", "nb201_network")
    cands = {"cell": [(op,) for op in genotype.edge_ops]}
    return NB201Network(C=C, N=N, candidates=cands, affine=True, search=False, **kwargs)
