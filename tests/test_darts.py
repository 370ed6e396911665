"""DARTS strategy: the finite-difference hypergradient against exact autograd, and which
parameters each step may move."""

import copy
import logging
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.darts import DartsSearch, unrolled_arch_gradient
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from oneshot.spaces import DartsSupernet, NB201Network


def exact_unrolled_gradient(model, arch, weights, train_batch, val_batch, xi, weight_decay, momentum=0.0, buffers=None):
    """grad_alpha L_val(w - xi (grad_w L_train(w, alpha) + wd w + m buf), alpha), differentiating
    through the inner step with double backward: the quantity DARTS approximates by finite
    differences. ``buf``, SGD's momentum buffer, does not depend on alpha."""
    names = {id(p): n for n, p in model.named_parameters()}
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch
    g = torch.autograd.grad(F.cross_entropy(model(x_t), y_t), weights, create_graph=True)
    buffers = buffers or [torch.zeros_like(w) for w in weights]
    unrolled = {names[id(w)]: w - xi * (gw + weight_decay * w + momentum * b) for w, gw, b in zip(weights, g, buffers)}
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


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def real_supernet(space):
    """ReLU, train-mode BN (batch statistics) and, in the DARTS space, max pooling: what a search runs."""
    if space == "nb201":
        model = NB201Network(C=3, N=1, num_classes=4, in_channels=2)
    else:
        model = DartsSupernet(C=4, layers=3, steps=2, multiplier=2, num_classes=4, in_channels=2)
    model = model.double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 1.0)
    batch = lambda: (torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)))  # noqa: E731
    return model, batch(), batch()


def with_momentum(model, train_batch, lr=0.05, wd=3e-4):
    """The weight optimiser after one real step, so its momentum buffers are a search's."""
    w_opt = torch.optim.SGD(model.weight_parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    F.cross_entropy(model(train_batch[0]), train_batch[1]).backward()
    w_opt.step()
    w_opt.zero_grad()
    return w_opt, [w_opt.state[w]["momentum_buffer"] for w in model.weight_parameters()]


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_hypergradient_with_relu_max_pool_train_bn_and_momentum_matches_exact(space):
    """The real thing (ReLU, max pool, BN on batch statistics, momentum) at a radius of 1e-7.
    There the central difference of this piecewise-smooth gradient has no kink inside +-eps*v
    (the ~10^3 units of this net would need a pre-activation within ~1e-7 of 0), its O(r^2)
    truncation is ~1e-14 and its float64 rounding ~1e-16 / 1e-7 = 1e-9 relative (measured:
    1e-9), so 1e-6 is a tolerance with room, and any mistake in the maths is O(1)."""
    model, train_batch, val_batch = real_supernet(space)
    model.train()
    arch, weights = model.arch_parameters(), model.weight_parameters()
    _, buffers = with_momentum(model, train_batch)
    xi, wd, m = 0.05, 3e-4, 0.9
    approx, _ = unrolled_arch_gradient(model, arch, weights, train_batch, val_batch, xi, momentum=m, weight_decay=wd,
                                       momentum_buffers=buffers, radius=1e-7)  # fmt: skip
    exact = flat(exact_unrolled_gradient(model, arch, weights, train_batch, val_batch, xi, wd, m, buffers))
    rel = (flat(approx) - exact).norm() / exact.norm()
    assert rel < 1e-6, rel
    # What the test can see: dropping momentum, or the second-order term, moves it by far more.
    no_momentum = flat(exact_unrolled_gradient(model, arch, weights, train_batch, val_batch, xi, wd))
    first = flat(torch.autograd.grad(F.cross_entropy(model(val_batch[0]), val_batch[1]), arch))
    assert (no_momentum - exact).norm() / exact.norm() > 0.1 and (first - exact).norm() / exact.norm() > 0.1


def paper_hypergradient(model, arch, weights, train_batch, val_batch, xi, wd, momentum, buffers, radius=0.01):
    """Eqs. 7-8 of the paper written out functionally (no in-place weights): w' = w - xi (g + wd w
    + m buf); grad_alpha L_val(w') - xi (grad_alpha L_train(w+) - grad_alpha L_train(w-)) / 2 eps,
    w+- = w +- eps v, v = grad_w' L_val(w'), eps = radius / ||v||."""
    names = {id(p): n for n, p in model.named_parameters()}
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch

    def loss(ws, x, y):
        params = {**{names[id(a)]: a for a in arch}, **{names[id(w)]: t for w, t in zip(weights, ws)}}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    g = torch.autograd.grad(loss(weights, x_t, y_t), weights)
    unrolled = [(w - xi * (gw + wd * w + momentum * b)).detach().requires_grad_() for w, gw, b in zip(weights, g, buffers)]
    grads = torch.autograd.grad(loss(unrolled, x_v, y_v), list(arch) + unrolled)
    d_alpha, v = grads[: len(arch)], grads[len(arch) :]
    eps = radius / flat(v).norm()
    plus = torch.autograd.grad(loss([w.detach() + eps * t for w, t in zip(weights, v)], x_t, y_t), arch)
    minus = torch.autograd.grad(loss([w.detach() - eps * t for w, t in zip(weights, v)], x_t, y_t), arch)
    return flat(d_alpha) - xi * (flat(plus) - flat(minus)) / (2 * eps)


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_arch_step_uses_the_documented_radius_and_the_optimisers_state(space):
    """``DartsSearch.arch_step`` as a search calls it (xi, momentum, weight decay and momentum
    buffers read from the weight optimiser; radius 0.01 / ||v||), ReLU, max pool, train-mode BN,
    equals the paper's formula at that radius computed independently (float64: same maths,
    different code, so 1e-8 is rounding with room).

    Not against double backward: at the paper's radius the central difference on nets this small
    is off by 70-780% (measured with ``radius=`` from 1e-2 down to 1e-3, C=3..16, in train mode;
    eval mode 0.5-14%): ReLU / max-pool switches inside +-0.01*v and batch statistics. That is the
    paper's estimate (the reference computes the same), and the test above shows ours is exact as
    the radius shrinks."""
    model, train_batch, val_batch = real_supernet(space)
    model.train()
    w_opt, buffers = with_momentum(model, train_batch)
    arch, weights = model.arch_parameters(), model.weight_parameters()
    expected = paper_hypergradient(model, arch, weights, train_batch, val_batch, 0.05, 3e-4, 0.9, buffers)
    module = DartsSearch(model, order=2)
    module.check_finite = lambda *a: None
    module.arch_step(train_batch, val_batch, w_opt, torch.optim.SGD(arch, lr=0.0))  # lr 0: keep the alphas
    got = flat(a.grad for a in arch)
    assert (got - expected).norm() / expected.norm() < 1e-8
    # What the test can see: the same formula at another radius, or without momentum, differs.
    other = paper_hypergradient(model, arch, weights, train_batch, val_batch, 0.05, 3e-4, 0.9, buffers, radius=1e-3)
    no_momentum = paper_hypergradient(model, arch, weights, train_batch, val_batch, 0.05, 3e-4, 0.0, buffers)
    assert min((other - expected).norm(), (no_momentum - expected).norm()) / expected.norm() > 1e-2


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


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)  # fmt: skip


def bilevel(batches):
    """A loader of search batches ``{"train", "val"}``, in order, as the search datamodule yields."""
    return DataLoader([{"train": b, "val": b} for b in batches], batch_size=None)


FP16_AMP = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]  # GPU AMP's scaler, on CPU


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_weight_step_clips_through_lightning_like_clip_grad_norm(precision):
    """``grad_clip`` through Lightning's ``clip_gradients`` moves the weights as the previous path
    did (backward, ``clip_grad_norm_``, SGD step): equal in fp32. Under fp16 mixed precision with
    a GradScaler the clip sees the unscaled gradients (it runs in ``on_before_optimizer_step``):
    the same step as an fp16-autocast reference up to rounding. Clipping right after
    ``manual_backward`` instead clips gradients still multiplied by the loss scale (65536): a step
    13x too small here (measured)."""
    torch.manual_seed(0)
    net = NB201Network(C=3, N=1, num_classes=3, in_channels=1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    reference = copy.deepcopy(net).train()
    weights = reference.weight_parameters()
    start = flat(weights).detach().clone()
    with torch.autocast("cpu", dtype=torch.float16, enabled=precision == "16-mixed"):  # the same forward
        loss = F.cross_entropy(reference(x), y)
    loss.backward()  # unscaled: the gradient a correct clip sees
    assert torch.nn.utils.clip_grad_norm_(weights, 0.05) > 20 * 0.05  # the clip is active
    torch.optim.SGD(weights, 0.025, 0.9, weight_decay=3e-4).step()  # DartsSearch's default optimiser
    expected = flat(weights).detach() - start

    module = DartsSearch(net, grad_clip=0.05, warmup_epochs=1)  # warm-up: the weight step alone
    trainer(limit_val_batches=0, plugins=FP16_AMP if precision == "16-mixed" else None).fit(module, bilevel([(x, y)]))
    got = flat(module.supernet.weight_parameters()).detach() - start
    tolerance = 1e-6 if precision == "32-true" else 1e-2  # measured: 0 and 1.3e-3; the scaled clip: 1.0
    assert (got - expected).norm() / expected.norm() < tolerance


def test_accuracy_and_loss_are_epoch_values_over_an_uneven_last_batch(caplog):
    """50 samples in batches of 16, 16, 16, 2: ``val/acc`` and ``val/loss`` as Lightning logs them
    (``trainer.validate``) and the training numbers of the per-epoch line are the epoch's over
    all samples, as computed directly; the mean of per-batch accuracies (the previous
    ``accuracy()`` averaged per step) is not."""
    torch.manual_seed(3)
    net = NB201Network(C=3, N=1, num_classes=3, in_channels=1)
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 3, (50,))
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    module = DartsSearch(net, w_optimizer=lambda params: torch.optim.SGD(params, lr=0.0), warmup_epochs=1)

    (logged,) = trainer().validate(module, DataLoader(TensorDataset(x, y), batch_size=16), verbose=False)
    with torch.no_grad():
        logits = net.eval()(x)
    hits = logits.argmax(-1) == y
    assert logged["val/acc"] == pytest.approx(hits.float().mean().item(), abs=1e-6)
    assert logged["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-5)
    per_batch = torch.stack([hits[i : i + 16].float().mean() for i in range(0, 50, 16)]).mean()
    assert abs(per_batch.item() - logged["val/acc"]) > 0.01  # what the test tells apart

    # Training with lr 0 and frozen alphas: every batch's logits are those of the net as it is
    # (train-mode BN: the batch's own statistics), so the epoch's numbers can be computed here.
    with torch.no_grad():
        train_logits = [net.train()(xb) for xb, _ in batches]
    hits = torch.cat([lg.argmax(-1) == yb for lg, (_, yb) in zip(train_logits, batches)])
    loss = sum(F.cross_entropy(lg, yb, reduction="sum") for lg, (_, yb) in zip(train_logits, batches)) / 50
    caplog.set_level(logging.INFO, logger="oneshot")
    trainer(limit_val_batches=0).fit(module, bilevel(batches))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0:")]
    got = re.match(r"epoch 0: train loss (\S+) acc (\S+), genotype ", line)
    assert got, line
    assert float(got[1]) == pytest.approx(loss.item(), abs=1e-4)
    assert float(got[2]) == pytest.approx(hits.float().mean().item(), abs=1e-4)
