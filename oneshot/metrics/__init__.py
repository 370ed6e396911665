"""Training-free metrics: pure functions ``f(model, inputs) -> float``, and TE-NAS' score.

``ntk_condition_number`` and ``linear_regions`` are TE-NAS' two indicators (Chen, Gong, Wang,
ICLR 2021): trainability (a small NTK condition number) and expressivity (many linear regions).
``tenas_score_nb201`` measures both for one NAS-Bench-201 cell by the reference protocol
(VITA-Group/TENAS, ``prune_tenas.py``), on the two networks built here; the DARTS space's
metric networks are in ``tenas_darts.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from oneshot.genotypes import NB201Genotype, parse_nb201
from oneshot.metrics.ensemble import best_by_rank_sum, rank_sum  # noqa: E402
from oneshot.metrics.ntk import condition_number, ntk_condition_number, ntk_gram, reinit_

# Zero-cost proxies, their rank-sum ensembles and scoring a whole space (issue 18).
from oneshot.metrics.proxies import (  # noqa: E402
    HIGHER_IS_BETTER,
    PROXIES,
    fisher,
    flops,
    grad_norm,
    grasp,
    jacob_cov,
    loss_proxies,
    naswot,
    params,
    snip,
    synflow,
    zen,
)
from oneshot.metrics.regions import (
    activation_patterns,
    count_unique_rows,
    linear_regions,
    random_crops,
)
from oneshot.metrics.space_scores import SpaceScores, score_space  # noqa: E402
from oneshot.metrics.tenas_darts import DartsMetricNet, reference_order
from oneshot.ops import NB201_PRIMITIVES
from oneshot.spaces.nb201 import EDGES, NB201Cell, NB201Network


def nb201_ntk_network(
    candidates: dict | None = None,
    C: int = 3,
    N: int = 1,
    num_classes: int = 10,
    in_channels: int = 3,
) -> NB201Network:
    """TE-NAS' NTK network on NB201: the benchmark skeleton at ``C=3, N=1`` with stem and affine
    BN (``model_config`` in ``prune_tenas.py::main``); all candidates unless given."""
    return NB201Network(
        C=C, N=N, num_classes=num_classes, in_channels=in_channels, candidates=candidates,
        affine=True, search=False,
    )  # fmt: skip


class NB201SingleCell(nn.Module):
    """TE-NAS' thin network for counting linear regions on NB201 (``model_config_thin``:
    ``C=1, N=1, depth=1, use_stem=False``): the raw one-channel input goes through a single
    cell, then BN-ReLU, pooling and the classifier. ``forward(x, weights)`` as the supernet."""

    def __init__(self, candidates: dict | None = None, C: int = 1, num_classes: int = 10):
        super().__init__()
        cands = (candidates or {}).get("cell") or [NB201_PRIMITIVES] * len(EDGES)
        self.candidates = {"cell": [tuple(c) for c in cands]}
        self.cell = NB201Cell(C, self.candidates["cell"], affine=True)
        self.lastact = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(C, num_classes)

    def forward(self, x, weights=None):
        w = (weights or {"cell": [0] * len(EDGES)})["cell"]
        return self.classifier(self.lastact(self.cell(x, w)).mean((2, 3)))


def sample_images(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn without replacement (seeded): the batch the NTK is computed on."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=g)[:n].to(images.device)]


def tenas_score_nb201(
    arch: str | NB201Genotype,
    images: torch.Tensor,
    ntk_batch: int = 72,
    n_crops: int = 3000,
    crop_size: int = 3,
    num_inits: int = 3,
    seed: int = 0,
    num_classes: int = 10,
    method: str = "loop",
) -> dict[str, float]:
    """TE-NAS' two indicators of one NB201 cell: ``{"ntk": kappa, "regions": count}``.

    ``images``: real training images ``N x C x H x W``, normalised as for training. kappa is
    taken on ``nb201_ntk_network`` over one batch of ``ntk_batch`` of them (72: the reference's
    NB201 batch size, ``prune_launch.py``); the regions on ``NB201SingleCell`` over ``n_crops``
    single-channel ``crop_size`` crops (3,000 of 3x3: ``Linear_Region_Collector(input_size=
    (1000, 1, 3, 3), sample_batch=3)``). Both averaged over ``num_inits`` seeded Kaiming
    initialisations (the reference repeats 3 times). Lower kappa and more regions are better.
    """
    genotype = parse_nb201(arch) if isinstance(arch, str) else arch
    candidates = {"cell": [(op,) for op in genotype.edge_ops]}
    batch = sample_images(images, ntk_batch, seed)
    crops = random_crops(images, n_crops, crop_size, seed)
    ntk = ntk_condition_number(
        nb201_ntk_network(candidates, num_classes=num_classes, in_channels=images.shape[1]),
        batch,
        num_inits,
        seed,
        method=method,
    )
    regions = linear_regions(
        NB201SingleCell(candidates, num_classes=num_classes), crops, num_inits, seed
    )
    return {"ntk": ntk, "regions": regions}


__all__ = [
    "HIGHER_IS_BETTER",
    "PROXIES",
    "SpaceScores",
    "best_by_rank_sum",
    "fisher",
    "flops",
    "grad_norm",
    "grasp",
    "jacob_cov",
    "loss_proxies",
    "naswot",
    "params",
    "rank_sum",
    "score_space",
    "snip",
    "synflow",
    "zen",
    "DartsMetricNet",
    "NB201SingleCell",
    "activation_patterns",
    "condition_number",
    "count_unique_rows",
    "linear_regions",
    "nb201_ntk_network",
    "ntk_condition_number",
    "ntk_gram",
    "random_crops",
    "reference_order",
    "reinit_",
    "sample_images",
    "tenas_score_nb201",
]
