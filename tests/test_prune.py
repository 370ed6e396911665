"""TE-NAS prune-by-importance: ranking on hand-made numbers, then whole prunes on tiny spaces."""

import math
from dataclasses import asdict

import pytest
import torch
from sklearn.datasets import load_digits

from oneshot.genotypes import DartsGenotype, NB201Genotype, validate_darts
from oneshot.metrics import nb201_ntk_network
from oneshot.prune import average_masked_ops, combined_order, dense_ranks, prune, relative_change
from oneshot.spaces import DartsNetwork, DartsSupernet, NB201Network

NB201_SMALL = {"C": 1, "primitives": ("none", "skip_connect", "nor_conv_3x3", "avg_pool_3x3")}
DARTS_SMALL = {  # node 3 of 2 has three inputs, so the edge stage has work
    "steps": 2,
    "multiplier": 2,
    "primitives": ("none", "skip_connect", "sep_conv_3x3", "avg_pool_3x3"),
}
FAST = {"num_inits": 1, "ntk_batch": 4, "n_crops": 200}


# Thousands of tiny ops: one thread is as fast, and far faster on a shared, busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    x = torch.tensor(load_digits().images[:100], dtype=torch.float32)
    return ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1)


def test_relative_change_and_its_limits():
    assert relative_change(10.0, 8.0) == pytest.approx(0.2)
    assert relative_change(math.inf, 5.0) == 1.0  # removing the op made a singular NTK regular
    assert relative_change(5.0, math.inf) == -math.inf  # ... or the other way round: keep it
    assert relative_change(math.inf, math.inf) == 0.0


def test_ranks_are_dense_and_ties_share_them():
    assert dense_ranks([0.5, 0.1, 0.5, -0.2], descending=True) == ([0, 1, 0, 2], [0, 2, 1, 3])
    # dk ranks [0, 1, 0, 2] + dR ranks [1, 0, 2, 1] = [1, 1, 2, 3]; the tie 0 vs 1 goes to dk order.
    order, nr, rr = combined_order([0.5, 0.1, 0.5, -0.2], [0.0, -0.1, 0.2, 0.0])
    assert (order, nr, rr) == ([0, 1, 2, 3], [0, 1, 0, 2], [1, 0, 2, 1])


def test_masked_ops_average_like_the_reference_softmax():
    # The reference masks pruned ops with -inf logits: an edge is the mean of its survivors.
    net, x = nb201_ntk_network(C=2), torch.randn(4, 3, 8, 8)
    masks = [(1, 2, 3, 4), (2, 3), (1,), (1, 4), (3,), (2, 3, 4)]
    probs = torch.zeros(6, 5)
    for e, m in enumerate(masks):
        probs[e, list(m)] = 1 / len(m)
    with average_masked_ops(net):
        masked = net(x, {"cell": masks})
    torch.testing.assert_close(masked, net(x, {"cell": list(probs)}))
    assert not torch.allclose(net(x, {"cell": masks}), masked)  # hooks gone: the plain sum again


@pytest.mark.parametrize("keep", [1, 2])
def test_nb201_prune_keeps_k_ops_per_edge(keep, digits):
    result = prune("nb201", digits, keep=keep, **FAST, **NB201_SMALL)
    assert all(len(ops) == keep and "none" not in ops for ops in result.survivors["cell"])
    NB201Network(C=2, N=1, candidates=result.survivors)(
        torch.randn(2, 3, 8, 8)
    )  # a smaller supernet
    # Three live ops per edge, one removed per edge per round.
    for r in range(3 - keep):
        assert sum(row.pruned for row in result.history if row.round == r) == 6
    if keep == 1:
        assert isinstance(result.genotype, NB201Genotype)
        assert result.genotype.edge_ops == tuple(ops[0] for ops in result.survivors["cell"])
    else:
        assert result.genotype is None


def test_darts_prune_gives_a_valid_genotype(digits):
    result = prune("darts", digits, **FAST, **DARTS_SMALL)
    g = result.genotype
    assert isinstance(g, DartsGenotype) and g.steps == 2
    validate_darts(g)
    for cell in (g.normal, g.reduce):
        for node in range(2):
            (op_a, a), (op_b, b) = cell[2 * node : 2 * node + 2]
            assert a != b and "none" not in (op_a, op_b)
    assert all(len(result.edges[t]) == 4 for t in ("normal", "reduce"))
    assert all(len(ops) == 1 for t in result.survivors for ops in result.survivors[t])
    # Three live ops, three per round: one op round (2 removed per edge), then one edge round per cell.
    ops, edges = ([r for r in result.history if r.stage == s] for s in ("op", "edge"))
    assert len(ops) == 2 * 5 * 3 and sum(r.pruned for r in ops) == 2 * 5 * 2
    assert len(edges) == 2 * 3 and sum(r.pruned for r in edges) == 2
    DartsSupernet(C=4, layers=3, steps=2, multiplier=2).weights_for(g)
    DartsNetwork(g, C=4, layers=3, auxiliary=False)(torch.randn(2, 3, 8, 8))


def test_darts_prune_visits_ops_in_the_references_order(digits):
    # The reference's DARTS_SPACE order, not DARTS' PRIMITIVES: it decides exact rank-sum ties.
    darts_order = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")
    result = prune("darts", digits, keep=2, **FAST, **{**DARTS_SMALL, "primitives": darts_order})
    first = [(r.cell_type, r.edge, r.op) for r in result.history if r.round == 0]
    assert [op for t, e, op in first if (t, e) == ("normal", "2<-0")] == [
        "skip_connect", "sep_conv_3x3", "avg_pool_3x3", "max_pool_3x3"
    ]  # fmt: skip
    assert [op for t, e, op in first if (t, e) == ("reduce", "3<-2")] == [
        "skip_connect", "sep_conv_3x3", "avg_pool_3x3", "max_pool_3x3"
    ]  # fmt: skip


def test_prune_is_deterministic_given_the_seed(digits):
    a, b = (prune("nb201", digits, **FAST, **NB201_SMALL, seed=3) for _ in range(2))
    assert a.genotype == b.genotype and [asdict(r) for r in a.history] == [
        asdict(r) for r in b.history
    ]
    c = prune("nb201", digits, **FAST, **NB201_SMALL, seed=4)
    assert [r.ntk for r in c.history] != [r.ntk for r in a.history]


def test_history_rows_describe_every_candidate(digits):
    result = prune("nb201", digits, **FAST, **NB201_SMALL)
    first = [row for row in result.history if row.round == 0]
    assert len(first) == 6 * 3 and {row.op for row in first} == {
        "skip_connect",
        "nor_conv_3x3",
        "avg_pool_3x3",
    }
    for row in first:
        assert row.rank == row.ntk_rank + row.regions_rank and row.regions >= 1
    # On each edge the pruned op has the lowest rank sum.
    for edge in {row.edge for row in first}:
        rows = [row for row in first if row.edge == edge]
        assert (
            min(rows, key=lambda row: row.rank).rank == next(row for row in rows if row.pruned).rank
        )
