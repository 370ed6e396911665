"""DARTS strategy: the finite-difference hypergradient against exact autograd, and which
parameters each step may move."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_modules.darts import DartsSearch, unrolled_arch_gradient
from oneshot.spaces import DartsSupernet, NB201Network


def exact_unrolled_gradient(model, arch, weights, train_batch, val_batch, xi, weight_decay):
    """grad_alpha L_val(w - xi (grad_w L_train(w, alpha) + wd w), alpha), differentiating through
    the inner step with double backward: the quantity DARTS approximates by finite differences."""
    names = {id(p): n for n, p in model.named_parameters()}
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch
    g = torch.autograd.grad(F.cross_entropy(model(x_t), y_t), weights, create_graph=True)
    unrolled = {names[id(w)]: w - xi * (gw + weight_decay * w) for w, gw in zip(weights, g)}
    params = {**{names[id(a)]: a for a in arch}, **unrolled}
    loss = F.cross_entropy(functional_call(model, params, (x_v,)), y_v)
    return torch.autograd.grad(loss, arch)


def smooth(model):
    """Swap every ReLU for a softplus. The finite difference assumes a twice-differentiable loss;
    with ReLU kinks (and max pooling) inside the +-eps*v perturbation it measures the kinks instead
    (we saw 10-50% error on ReLU nets this small), which would test ReLU, not our maths."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ReLU):
                setattr(parent, name, torch.nn.Softplus(beta=4.0))
    return model


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_finite_difference_hypergradient_matches_exact(space):
    torch.manual_seed(0)
    if space == "nb201":
        model = NB201Network(C=3, N=1, num_classes=4, in_channels=2)
    else:
        smooth_ops = ("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")
        model = DartsSupernet(C=4, layers=3, steps=2, multiplier=2, num_classes=4, in_channels=2, primitives=smooth_ops)
    model = smooth(model).double().eval()  # eval: BN uses fixed statistics, one function throughout
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 1.0)  # away from the uniform point, where the hypergradient is small
    arch, weights = model.arch_parameters(), model.weight_parameters()
    batch = lambda: (torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))  # noqa: E731
    train_batch, val_batch = batch(), batch()
    before = [w.detach().clone() for w in weights]
    xi, wd = 0.05, 3e-4
    approx, _ = unrolled_arch_gradient(model, arch, weights, train_batch, val_batch, xi, weight_decay=wd)
    for w, b in zip(weights, before):
        assert torch.equal(w, b)  # weights restored bit-exactly
    exact = exact_unrolled_gradient(model, arch, weights, train_batch, val_batch, xi, wd)
    approx, exact = torch.cat([a.flatten() for a in approx]), torch.cat([e.flatten() for e in exact])
    rel = (approx - exact).norm() / exact.norm()
    assert rel < 1e-2, rel
    # and the second-order term matters: first order alone is measurably different
    first = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(model(val_batch[0]), val_batch[1]), arch)])
    assert (first - exact).norm() / exact.norm() > 10 * rel


@pytest.mark.parametrize("order", [1, 2])
def test_arch_step_moves_only_alphas_and_weight_step_only_weights(order):
    torch.manual_seed(0)
    model = NB201Network(C=3, N=1, num_classes=3, in_channels=1)
    module = DartsSearch(model, order=order)
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=0.1, momentum=0.9)
    a_opt = torch.optim.Adam(model.arch_parameters(), lr=0.1)
    module.manual_backward = lambda loss: loss.backward()
    module.check_finite = lambda *a: None
    batch = lambda: (torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))  # noqa: E731
    train_batch, val_batch = batch(), batch()
    snapshot = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
    arch0, w0 = snapshot(model.arch_parameters()), snapshot(model.weight_parameters())
    module.arch_step(train_batch, val_batch, w_opt, a_opt)
    assert all(not torch.equal(a, b) for a, b in zip(arch0, model.arch_parameters()))
    assert all(torch.equal(w, b) for w, b in zip(w0, model.weight_parameters()))
    # weight step, as training_step does it
    arch1 = snapshot(model.arch_parameters())
    w_opt.zero_grad()
    F.cross_entropy(model(train_batch[0]), train_batch[1]).backward()
    w_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(arch1, model.arch_parameters()))
    moved = [not torch.equal(w, b) for w, b in zip(w0, model.weight_parameters())]
    assert sum(moved) > len(moved) // 2


def test_order_must_be_one_or_two():
    with pytest.raises(ValueError, match="order must be 1 or 2, got 3"):
        DartsSearch(NB201Network(C=3, N=1), order=3)
