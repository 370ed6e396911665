"""DrNAS (lightning_modules/drnas.py) against direct computations: samples on the simplex with the
Dirichlet's mean, the KL term in closed form, derivation from the concentration's mean."""


import pytest
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.drnas import DrnasSearch, concentration, dirichlet_kl

import oneshot
from oneshot.derive import derive_darts
from oneshot.spaces.darts import DartsSupernet
from oneshot.spaces.nb201 import NB201Network


def tiny_nb201():
    torch.manual_seed(0)
    return NB201Network(C=4, N=1, num_classes=3, image_size=8)


def test_concentration_is_elu_plus_one():
    a = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    expected = torch.where(a > 0, a + 1, torch.exp(a))  # elu(a) + 1 = exp(a) below 0
    assert torch.allclose(concentration(a), expected)


def test_samples_lie_on_the_simplex_with_the_dirichlet_mean():
    net = tiny_nb201()
    with torch.no_grad():
        net.alphas["cell"].copy_(torch.randn(6, 5))
    module = DrnasSearch(net, seed=1)
    conc = concentration(net.alphas["cell"].detach())
    mean = conc / conc.sum(-1, keepdim=True)
    draws = []
    for step in range(400):  # a fresh seed per draw, as the steps of a search
        module.seed = step
        draws.append(module.sample_weights()["cell"].detach())
    draws = torch.stack(draws)
    assert (draws >= 0).all() and torch.allclose(draws.sum(-1), torch.ones(400, 6), atol=1e-5)
    # Var of a Dirichlet component: m (1 - m) / (a0 + 1); the sample mean is within 5 sd of it.
    sd = (mean * (1 - mean) / (conc.sum(-1, keepdim=True) + 1) / 400).sqrt()
    assert ((draws.mean(0) - mean).abs() < 5 * sd).all()
    assert torch.equal(module.arch_probs()["cell"], mean)


def test_samples_are_reparameterised_the_gradient_reaches_the_alphas():
    net = tiny_nb201()
    module = DrnasSearch(net)
    w = module.sample_weights()["cell"]
    (g,) = torch.autograd.grad((w * torch.randn_like(w)).sum(), net.alphas["cell"])
    assert g.abs().sum() > 0


def test_kl_term_equals_the_closed_form_and_torch():
    alphas = torch.randn(4, 5, dtype=torch.float64)
    a = concentration(alphas)
    for prior in (1.0, 0.5, 3.0):
        b = torch.full_like(a, prior)
        a0, b0 = a.sum(-1), b.sum(-1)
        closed = (torch.lgamma(a0) - torch.lgamma(a).sum(-1) - torch.lgamma(b0) + torch.lgamma(b).sum(-1)
                  + ((a - b) * (torch.digamma(a) - torch.digamma(a0)[:, None])).sum(-1)).sum()  # fmt: skip
        ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(a), torch.distributions.Dirichlet(b)).sum()
        assert torch.allclose(dirichlet_kl(alphas, prior), closed, atol=1e-10)
        assert torch.allclose(closed, ref, atol=1e-10)
    # Zero exactly at the prior: elu(alpha) + 1 = 1 at alpha = 0.
    assert float(dirichlet_kl(torch.zeros(3, 5), 1.0)).__abs__() < 1e-6


def test_arch_penalty_is_the_weighted_kl_and_zero_weight_turns_it_off():
    net = tiny_nb201()
    module = DrnasSearch(net, kl_weight=0.25, prior=2.0)
    assert torch.allclose(module.arch_penalty(), 0.25 * dirichlet_kl(net.alphas["cell"], 2.0))
    assert DrnasSearch(net, kl_weight=0.0).arch_penalty() is None


def test_darts_derivation_is_from_the_concentration_mean_and_leaves_the_alphas():
    torch.manual_seed(1)
    net = DartsSupernet(C=4, layers=3, num_classes=3, image_size=8, steps=3, multiplier=3)
    with torch.no_grad():
        for a in net.alphas.values():
            a.copy_(2 * torch.randn_like(a))
    before = {t: a.detach().clone() for t, a in net.alphas.items()}
    module = DrnasSearch(net)
    means = {t: concentration(a) / concentration(a).sum(-1, keepdim=True) for t, a in before.items()}
    expected = derive_darts(means["normal"].log(), means["reduce"].log(), net.candidates["normal"],
                            net.candidates["reduce"], 3, 3)  # fmt: skip
    assert module.derive_genotype() == expected
    assert all(torch.equal(a, before[t]) for t, a in net.alphas.items())


def test_validation_mixes_by_the_mean():
    net = tiny_nb201().eval()
    module = DrnasSearch(net)
    x = torch.randn(2, 3, 8, 8)
    probs = module.arch_probs()
    assert torch.allclose(net(x, probs), net(x, {"cell": list(probs["cell"])}))
    assert not torch.allclose(net(x, probs), net(x, {"cell": F.one_hot(torch.zeros(6, dtype=torch.long), 5).float()}))


@pytest.mark.parametrize("bad", ["strategy.kl_weight=-1", "strategy.prior=0"])
def test_bad_drnas_values_are_one_line(bad):
    from oneshot.validate import ConfigError, check_values

    cfg = oneshot.compose("search", ["strategy=drnas", bad])
    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        check_values(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["drnas", "gdas"])
def test_load_from_checkpoint_rebuilds_the_search_and_its_genotype(strategy, tmp_path):
    """``DrnasSearch.load_from_checkpoint`` / ``GdasSearch...`` as for DartsSearch: the module,
    its options and the derived genotype come back from the checkpoint alone."""
    from hydra.utils import get_class

    cfg = oneshot.compose("search", [
        f"strategy={strategy}", "data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1",
        "retrain.enabled=false", "logger.pictures=false", "seed=4", f"run_dir={tmp_path}",
    ])  # fmt: skip
    report = oneshot.search(cfg)
    cls = get_class(cfg.strategy._target_)
    module = cls.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert type(module) is cls and module.seed == 4
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert str(module.derive_genotype()) == report["genotype"]
