"""The collapse guards (oneshot/regularizers.py) against their formulas, and DARTS unchanged when
they are off (the default)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.darts import DartsSearch

import oneshot
from oneshot.regularizers import (
    Regularizer,
    add_auxiliary_skip,
    beta_decay_loss,
    make_regularizer,
    progress,
)
from oneshot.spaces.darts import DartsSupernet
from oneshot.spaces.nb201 import NB201Network


def test_beta_decay_loss_and_gradient_equal_the_formula():
    a, b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    loss = beta_decay_loss([a, b])
    rows = torch.cat([a, b]).detach()
    direct = sum(float(torch.log(torch.exp(r).sum())) for r in rows) / 10
    assert abs(float(loss.detach()) - direct) < 1e-12
    ga, gb = torch.autograd.grad(loss, [a, b])
    # d/d alpha_ek of mean_e logsumexp(alpha_e) = softmax(alpha_e)_k / n_edges: the "beta-decay".
    assert torch.allclose(ga, torch.softmax(a.detach(), -1) / 10)
    assert torch.allclose(gb, torch.softmax(b.detach(), -1) / 10)


def test_schedules_beta_grows_and_auxiliary_skip_decays_linearly():
    beta, aux = Regularizer("beta"), Regularizer("auxiliary_skip", 2.0)
    assert [beta.coefficient(e, 5) for e in range(5)] == pytest.approx([0, 12.5, 25, 37.5, 50])
    assert [aux.coefficient(e, 5) for e in range(5)] == pytest.approx([2, 1.5, 1, 0.5, 0])
    assert progress(0, 1) == 0.0 and make_regularizer(None) is None
    alphas = [torch.randn(3, 4)]
    assert torch.allclose(beta.penalty(alphas, 2, 5), 25 * beta_decay_loss(alphas))
    assert aux.penalty(alphas, 2, 5) is None and beta.mix(None, {"x": 1}, 0, 5) == {"x": 1}


def test_auxiliary_skip_adds_beta_to_the_skip_weight_only():
    cands = {"cell": [("none", "skip_connect", "nor_conv_3x3"), ("none", "nor_conv_1x1", "skip_connect"), ("none", "avg_pool_3x3", "nor_conv_3x3")]}
    w = torch.softmax(torch.randn(3, 3), -1)
    out = add_auxiliary_skip({"cell": w}, cands, 0.3)["cell"]
    expected = w.clone()
    expected[0, 1] += 0.3
    expected[1, 2] += 0.3  # the third edge has no skip candidate: unchanged
    assert torch.allclose(torch.stack(out), expected)


def test_auxiliary_skip_edge_output_is_the_mixture_plus_beta_times_skip():
    torch.manual_seed(0)
    net = NB201Network(C=4, N=1, num_classes=3, image_size=8).eval()
    x = torch.randn(2, 4, 8, 8)
    edge = net.cells[0].edges[0]
    w = torch.softmax(net.alphas["cell"][0].detach(), -1)
    mixed = add_auxiliary_skip({"cell": w[None]}, {"cell": [edge.candidates]}, 0.4)["cell"][0]
    assert torch.allclose(edge(x, mixed), edge(x, w) + 0.4 * x, atol=1e-6)  # skip is the identity here


def tiny_darts_module(**kwargs):
    torch.manual_seed(0)
    net = DartsSupernet(C=4, layers=3, num_classes=3, image_size=8, steps=2, multiplier=2)
    return DartsSearch(net, **kwargs)


def arch_grads(module, batch):
    a_opt = torch.optim.Adam(module.supernet.arch_parameters(), 3e-4)
    module.arch_step(batch, batch, None, a_opt)
    return [a.grad.clone() for a in module.supernet.arch_parameters()]


def test_darts_with_the_regularizer_off_is_darts_bit_for_bit():
    off = tiny_darts_module(regularizer=None)
    reference = copy.deepcopy(off.supernet)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    grads = arch_grads(off, (x, y))
    expected = torch.autograd.grad(F.cross_entropy(reference(x), y), reference.arch_parameters())
    assert all(torch.equal(g, e) for g, e in zip(grads, expected))
    assert off.mixing_weights() is None and off.arch_penalty() is None


def test_darts_arch_step_with_auxiliary_skip_differentiates_the_skipped_supernet():
    aux = tiny_darts_module(regularizer="auxiliary_skip")  # no trainer: the first epoch, beta = 1
    reference = copy.deepcopy(aux.supernet)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    grads = arch_grads(aux, (x, y))
    weights = add_auxiliary_skip(reference.arch_weights(), reference.candidates, 1.0)
    expected = torch.autograd.grad(F.cross_entropy(reference(x, weights), y), reference.arch_parameters())
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))
    plain = torch.autograd.grad(F.cross_entropy(reference(x), y), reference.arch_parameters())
    assert not torch.allclose(grads[0], plain[0])


@pytest.mark.parametrize("bad", ["strategy.regularizer=l1", "strategy.regularizer_weight=-2"])
def test_bad_regularizer_values_are_one_line(bad):
    from oneshot.validate import ConfigError, check_values

    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        check_values(oneshot.compose("search", ["strategy=darts", bad]))


@pytest.mark.slow
@pytest.mark.parametrize("regularizer", ["beta", "auxiliary_skip"])
def test_regularizers_run_through_the_real_app(regularizer, tmp_path):
    """DARTS with each guard through ``oneshot.search`` (3 epochs, so beta's weight is nonzero),
    against the unregularised run of the same seed: the alphas end elsewhere."""
    base = ["strategy=darts", "data=digits", "data.batch_size=8", "space.supernet.C=4", "space.supernet.N=1",
            "trainer.max_epochs=3", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
            "retrain.enabled=false", "logger.pictures=false"]  # fmt: skip
    alphas = {}
    for name in (regularizer, "null"):
        run = tmp_path / name
        oneshot.search(oneshot.compose("search", [*base, f"strategy.regularizer={name}", f"run_dir={run}"]))
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        alphas[name] = state["supernet.alphas.cell"]
        assert (run / "genotype.txt").exists()
    assert not torch.allclose(alphas[regularizer], alphas["null"])
