"""GDAS (lightning_modules/gdas.py) against direct computations: the straight-through sample's
forward is the sampled op alone, its alpha gradient the closed-form softmax gradient, the
Gumbel-max draws follow softmax(alpha), and the temperature schedule is the authors' line."""

import math

import pytest
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.gdas import (
    GdasSearch,
    gumbel_hard_sample,
    seeded_generator,
    temperature,
)

import oneshot
from oneshot.mixed import MixedOp
from oneshot.spaces.darts import DartsSupernet
from oneshot.spaces.nb201 import NB201Network


def test_mixed_op_index_weight_form_runs_only_the_sampled_op_times_the_weight():
    torch.manual_seed(0)
    op = MixedOp(4, 4, 1, ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"])
    x = torch.randn(2, 4, 6, 6)
    for k in range(5):
        weight = torch.tensor(1.0, requires_grad=True)
        out = op(x, (k, weight))
        assert torch.allclose(out, op.ops[k](x))
        # d out / d weight = op_k(x): the gradient a straight-through weight passes on.
        r = torch.randn_like(out)
        (g,) = torch.autograd.grad((out * r).sum(), weight)
        assert torch.allclose(g, (op.ops[k](x) * r).sum(), atol=1e-5)
    # Only op k's parameters take part (the others' gradients stay None).
    op.zero_grad(set_to_none=True)
    op(x, (2, torch.tensor(1.0))).sum().backward()
    assert [p.grad is not None for p in op.ops[3].parameters()] == [False] * len(list(op.ops[3].parameters()))
    assert all(p.grad is not None for p in op.ops[2].parameters())


def test_gumbel_hard_sample_is_one_hot_with_the_relaxed_softmax_gradient():
    alphas = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    tau = 0.7
    index, hardwts, probs = gumbel_hard_sample(alphas, tau, seeded_generator(1, 2))
    assert torch.equal(hardwts.detach(), F.one_hot(index, 5).double())
    # Straight through: d hardwts_k / d alpha_j = d probs_k / d alpha_j = p_k (delta_kj - p_j) / tau
    # (the log_softmax inside cancels: sum_i p_i = 1). Check with an upstream gradient per row.
    upstream = torch.randn(6, dtype=torch.float64)
    picked = hardwts.gather(1, index[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad((picked * upstream).sum(), alphas)
    p = probs.detach()
    one_hot = F.one_hot(index, 5).double()
    p_k = p.gather(1, index[:, None])
    expected = upstream[:, None] * p_k * (one_hot - p) / tau
    assert torch.allclose(grad, expected, atol=1e-12)


def test_gumbel_max_draws_follow_the_softmax_of_the_alphas():
    """Gumbel-max is an exact sampler of softmax(alpha) at any temperature: chi-square on 20000 draws."""
    alphas = torch.tensor([[1.0, 0.0, -1.0, 0.5, 2.0]])
    n, counts = 20000, torch.zeros(5)
    gen = seeded_generator(7)
    for _ in range(n // 500):
        batch = alphas.expand(500, 5)
        index, _, _ = gumbel_hard_sample(batch, 3.0, gen)
        counts += torch.bincount(index, minlength=5).float()
    expected = torch.softmax(alphas[0], -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47, chi2  # the 0.999 quantile of chi-square with 4 degrees of freedom


def test_temperature_anneals_linearly_from_tau_max_to_tau_min():
    taus = [temperature(e, 5, 10.0, 0.1) for e in range(5)]
    assert taus[0] == 10.0 and math.isclose(taus[-1], 0.1)
    steps = [a - b for a, b in zip(taus, taus[1:])]
    assert all(math.isclose(s, (10.0 - 0.1) / 4) for s in steps)
    assert temperature(0, 1, 10.0, 0.1) == 10.0  # a one-epoch search stays at tau_max


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_supernet_with_a_gdas_sample_is_the_sampled_network_and_alphas_get_the_st_gradient(space):
    torch.manual_seed(0)
    net = (
        NB201Network(C=4, N=1, num_classes=3, image_size=8)
        if space == "nb201"
        else DartsSupernet(C=4, layers=3, num_classes=3, image_size=8, steps=2, multiplier=2)
    ).double()
    net.eval()  # BN by running statistics: the two forwards below see the same normalisation
    module = GdasSearch(net, seed=3)
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 2])
    weights = module.sample_weights()
    hard = {t: [i for i, _ in rows] for t, rows in weights.items()}
    assert torch.allclose(net(x, weights), net(x, hard))  # the sampled ops alone
    # The alphas' gradient is the chain rule through each edge's straight-through weight:
    # recompute with the edge weights as leaves, then apply d probs_k / d alpha by hand.
    loss = F.cross_entropy(net(x, weights), y)
    grads = torch.autograd.grad(loss, net.arch_parameters())
    leaves = {t: [torch.tensor(1.0, dtype=torch.float64, requires_grad=True) for _ in rows] for t, rows in weights.items()}
    loss_leaf = F.cross_entropy(net(x, {t: list(zip(hard[t], leaves[t])) for t in hard}), y)
    flat = [w for t in hard for w in leaves[t]]
    d_edge = dict(zip(map(id, flat), torch.autograd.grad(loss_leaf, flat)))
    tau = module.tau()
    for k, (t, alphas) in enumerate(net.alphas.items()):
        _, _, probs = gumbel_hard_sample(alphas.detach(), tau, seeded_generator(3, 0, 0, k))
        one_hot = F.one_hot(torch.tensor(hard[t]), alphas.shape[1]).double()
        p_k = probs.gather(1, torch.tensor(hard[t])[:, None])
        upstream = torch.stack([d_edge[id(w)] for w in leaves[t]])
        expected = upstream[:, None] * p_k * (one_hot - probs) / tau
        assert torch.allclose(grads[k], expected, atol=1e-10)


def test_draws_are_seeded_by_run_seed_and_step():
    net = NB201Network(C=4, N=1, num_classes=3, image_size=8)
    a, b = GdasSearch(net, seed=1), GdasSearch(net, seed=1)
    first = [i for i, _ in a.sample_weights()["cell"]]
    assert first == [i for i, _ in b.sample_weights()["cell"]]
    draws = {tuple(i for i, _ in GdasSearch(net, seed=s).sample_weights()["cell"]) for s in range(8)}
    assert len(draws) > 1


@pytest.mark.parametrize("bad", [["strategy.tau_min=0"], ["strategy.tau_max=-1"], ["strategy.regularizer=nope"]])
def test_bad_gdas_values_are_one_line(bad, tmp_path):
    from oneshot.validate import ConfigError, check_values

    cfg = oneshot.compose("search", ["strategy=gdas", *bad])
    with pytest.raises(ConfigError, match=bad[0].split("=")[0].replace(".", r"\.")):
        check_values(cfg)


def test_tau_min_above_tau_max_and_auxiliary_skip_are_refused():
    net = NB201Network(C=4, N=1, num_classes=3, image_size=8)
    with pytest.raises(ValueError, match="tau_min"):
        GdasSearch(net, tau_max=0.1, tau_min=1.0)
    with pytest.raises(ValueError, match="auxiliary_skip"):
        GdasSearch(net, regularizer="auxiliary_skip")
