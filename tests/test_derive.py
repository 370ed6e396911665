"""Derivation on hand-made alphas."""

import pytest
import torch

from oneshot.derive import derive_darts, derive_nb201
from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES


def test_nb201_argmax_per_edge_including_none():
    alphas = torch.zeros(6, 5)
    picks = [3, 0, 2, 1, 4, 3]
    for e, k in enumerate(picks):
        alphas[e, k] = 1.0
    g = derive_nb201(alphas, [NB201_PRIMITIVES] * 6)
    assert g.edge_ops == tuple(NB201_PRIMITIVES[k] for k in picks)
    assert str(g) == "|nor_conv_3x3~0|+|none~0|nor_conv_1x1~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_3x3~2|"


def test_darts_keeps_two_strongest_non_none_edges_per_node():
    n = len(DARTS_PRIMITIVES)
    alphas = torch.zeros(14, n)
    alphas[:, 0] = 10.0  # `none` dominates everywhere and must be ignored
    # node 2 (edges 0, 1): both inputs; node 3 (edges 2..4): inputs 2 and 0;
    # node 4 (edges 5..8): inputs 3 and 1; node 5 (edges 9..13): inputs 4 and 2.
    strong = {0: 4, 1: 5, 2: 7, 4: 3, 6: 6, 8: 1, 11: 2, 13: 3}
    for e, k in strong.items():
        alphas[e, k] = 5.0 + e / 100
    g = derive_darts(alphas, alphas, [DARTS_PRIMITIVES] * 14, [DARTS_PRIMITIVES] * 14)
    names = DARTS_PRIMITIVES
    assert g.normal == (
        (names[5], 1), (names[4], 0),
        (names[3], 2), (names[7], 0),
        (names[1], 3), (names[6], 1),
        (names[3], 4), (names[2], 2),
    )  # fmt: skip
    assert g.normal_concat == (2, 3, 4, 5) and g.reduce == g.normal


def test_darts_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="rows of alphas"):
        derive_darts(torch.zeros(15, 8), torch.zeros(15, 8), [DARTS_PRIMITIVES] * 15, [DARTS_PRIMITIVES] * 15)


def test_derivation_works_on_pruned_candidates():
    # After a warm start each edge keeps its own two ops; the argmax indexes that edge's list.
    cands = [("nor_conv_3x3", "skip_connect"), ("none", "avg_pool_3x3")] * 3
    alphas = torch.tensor([[0.0, 1.0], [1.0, 0.0]] * 3)
    g = derive_nb201(alphas, cands)
    assert g.edge_ops == ("skip_connect", "none") * 3


def test_darts_derivation_weighs_edges_by_pc_darts_betas():
    steps, ops = 2, ("none", "sep_conv_3x3", "skip_connect")
    cands = [ops] * 5  # node 2 <- {0, 1}; node 3 <- {0, 1, 2}
    alphas = torch.zeros(5, 3)
    alphas[2, 1] = alphas[3, 1] = 2.0  # node 3: inputs 0 and 1 have the strongest ops
    plain = derive_darts(alphas, alphas, cands, cands, steps, 2)
    assert {j for _, j in plain.normal[2:]} == {0, 1}
    betas = torch.zeros(5)
    betas[2] = -5.0  # ... but edge 3<-0 is nearly switched off by its beta
    normed = derive_darts(alphas, alphas, cands, cands, steps, 2, betas, betas)
    assert {j for _, j in normed.normal[2:]} == {1, 2}
    assert normed.normal[:2] == plain.normal[:2]
