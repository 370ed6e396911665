"""ENAS strategy: a weight step trains only the sampled path, a controller step only the
controller, derivation is a deterministic pure read, and the real configs run end to end."""

import copy
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.enas import _WEIGHT_STREAM, EnasSearch
from torch.utils.data import DataLoader

import oneshot
from oneshot.genotypes import DartsGenotype, NB201Genotype, parse
from oneshot.spaces import DartsSupernet, NB201Network
from oneshot.spaces.nb201 import NB201Cell

SPACES = ["nb201", "darts"]


# Nets this small gain nothing from a second thread; on a busy 2-core machine the OpenMP
# hand-off made each forward ~50x slower (200 ms instead of 4 ms).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(space):
    if space == "nb201":
        return NB201Network(C=3, N=1, in_channels=1, num_classes=3)
    return DartsSupernet(C=4, layers=3, steps=2, multiplier=2, in_channels=1, num_classes=3)


def module_for(space, **kw):
    module = EnasSearch(tiny(space), **kw)
    module.manual_backward = lambda loss: loss.backward()  # no trainer: plain autograd
    return module


def batch(n=8):
    return torch.randn(n, 1, 8, 8), torch.randint(0, 3, (n,))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def edges(supernet):
    """(cell type, edge index, mixed op) for every edge of every searched cell."""
    for cell in supernet.cells:
        if isinstance(cell, NB201Cell):
            yield from (("cell", e, m) for e, m in enumerate(cell.edges))
        elif hasattr(cell, "edges"):
            t = "reduce" if cell.reduction else "normal"
            yield from ((t, e, m) for e, m in enumerate(cell.edges))


def chosen(entry):
    """Op indices a per-edge entry runs: an index, a pair (same input twice), or None."""
    return set() if entry is None else {entry} if isinstance(entry, int) else set(entry)


@pytest.mark.parametrize("space", SPACES)
def test_weight_step_trains_only_the_sampled_ops(space):
    module = module_for(space)
    net = module.supernet
    (w_opt, _), _ = module.configure_optimizers()  # the real defaults: momentum, Nesterov, decay
    convs = {
        t: [[i for i, op in enumerate(ops) if "conv" in op] for ops in c]
        for t, c in net.candidates.items()
    }
    handmade = {t: [c[e % 2] for e, c in enumerate(cs)] for t, cs in convs.items()}
    swapped = {t: [c[1 - e % 2] for e, c in enumerate(cs)] for t, cs in convs.items()}
    draws = [module.controller.sample(module.generator(0, k)).weights for k in range(3)]
    ops_moved = 0
    # After `handmade` every conv has a momentum buffer: `swapped` checks that torch's SGD skips a
    # parameter whose grad is None outright (no momentum, no weight decay), not just its gradient.
    for weights in [handmade, swapped, *draws]:
        before = [p.detach().clone() for p in net.parameters()]
        module.weight_step(batch(), weights, w_opt)
        moved = {id(p) for p, b in zip(net.parameters(), before) if not torch.equal(p, b)}
        for t, e, mixed in edges(net):
            for i, op in enumerate(mixed.ops):
                params = list(op.parameters())
                if i in chosen(weights[t][e]):
                    # It moves if it got a gradient; a DARTS sample may leave it off every path to
                    # the loss (when the next cell ignores this cell's output): then no gradient.
                    assert all((id(p) in moved) == (p.grad is not None) for p in params), (t, e, i)
                    ops_moved += any(id(p) in moved for p in params)
                else:
                    assert not any(id(p) in moved for p in params), (t, e, i)
                    assert all(p.grad is None for p in params)
        assert not any(
            id(p) in moved for p in [*net.arch_parameters(), *module.controller.parameters()]
        )
    assert ops_moved > 5


@pytest.mark.parametrize("space", SPACES)
def test_controller_step_moves_only_the_controller(space):
    module = module_for(space)
    _, c_opt = module.configure_optimizers()[0]
    net0, ctrl0 = snapshot(module.supernet), snapshot(module.controller)
    for k in range(2):
        sample, reward = module.controller_step(batch(), c_opt, module.generator(1, 0, k))
        assert 0 <= float(reward) <= 1 and sample.log_prob.requires_grad
    # The supernet is untouched, BN running statistics included: scoring is a pure read.
    assert all(torch.equal(v, net0[k]) for k, v in module.supernet.state_dict().items())
    assert all(p.grad is None for p in module.supernet.parameters())
    assert all(not torch.equal(v, ctrl0[k]) for k, v in module.controller.state_dict().items())
    assert int(module.reinforce.num_updates) == 2
    # Checkpoints carry the controller and the REINFORCE baseline.
    keys = module.state_dict().keys()
    assert {"controller.g_emb", "reinforce.baseline", "reinforce.num_updates"} <= keys


@pytest.mark.parametrize("space", SPACES)
def test_derive_genotype_is_valid_deterministic_and_a_pure_read(space):
    module = module_for(space, derive_samples=12)
    before = snapshot(module)
    batches = [batch(), batch()]
    first, second = module.derive_genotype(batches), module.derive_genotype(batches)
    assert first == second and isinstance(
        first, {"nb201": NB201Genotype, "darts": DartsGenotype}[space]
    )
    assert parse(str(first)) == first
    module.supernet.weights_for(first)  # a genotype of this supernet: raises otherwise
    derived = module.derived
    assert derived["best_sampled"] == str(first)
    assert derived["scores"][str(first)] == max(derived["scores"].values())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # A module built the same way (another DDP rank) derives the same genotype.
    torch.manual_seed(0)
    other = module_for(space, derive_samples=12)
    other.load_state_dict(module.state_dict())
    assert other.derive_genotype(batches) == first
    # No held-out data (no trainer): the policy's most likely architecture.
    assert module.derive_genotype() == module.controller.most_likely().genotype
    assert module.derived["best_sampled"] is None


def test_generators_are_seeded_by_run_seed_and_stream():
    draw = lambda m, *s: torch.randint(0, 2**30, (4,), generator=m.generator(*s)).tolist()  # noqa: E731
    a, b = module_for("nb201", seed=3), module_for("nb201", seed=4)
    assert draw(a, 0, 7) == draw(a, 0, 7) != draw(a, 0, 8)
    assert draw(a, 0, 7) != draw(a, 1, 7) and draw(a, 0, 7) != draw(b, 0, 7)


def test_bad_controller_schedule_is_rejected():
    with pytest.raises(ValueError, match="controller_every"):
        EnasSearch(tiny("nb201"), controller_every=0)


FAST = [
    "strategy=enas",
    "data.batch_size=16",
    "strategy.derive_samples=10",
    "retrain.enabled=false",
]


@pytest.mark.parametrize("space", SPACES)
def test_fast_dev_run_through_the_real_config(space, tmp_path):
    cfg = oneshot.compose(
        "search", [f"space={space}", "+trainer.fast_dev_run=true", f"run_dir={tmp_path}", *FAST]
    )
    report = oneshot.search(cfg)
    genotype = parse((tmp_path / "genotype.txt").read_text())
    assert genotype.space == space and str(genotype) == report["genotype"]
    assert report["strategy"] == "EnasSearch"


def test_short_search_logs_the_controller(tmp_path):
    cfg = oneshot.compose("search", [
        f"run_dir={tmp_path}", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "data.limit=256",
        "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", *FAST,
    ])  # fmt: skip
    report = oneshot.search(cfg)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/acc", "val/acc", "enas/reward", "enas/baseline", "enas/entropy",
                "enas/epoch_reward", "arch/entropy", "prob/cell/3<-2/op", "search/w_lr"):  # fmt: skip
        assert key in header
    assert len(report["genotypes_per_epoch"]) == 2
    ckpt = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert int(ckpt["state_dict"]["reinforce.num_updates"]) == 6  # 3 batches x 2 epochs
    assert json.loads((tmp_path / "report.json").read_text())["strategy"] == "EnasSearch"


@pytest.mark.parametrize("space", SPACES)
def test_weight_step_clips_through_lightning_like_clip_grad_norm(space):
    """One ENAS weight step in a real Trainer (fp32), clipped by Lightning's ``clip_gradients``,
    moves the shared weights exactly as the previous path: backward along the sampled
    architecture, ``clip_grad_norm_`` over all shared weights (those off the path have no
    gradient), ENAS' Nesterov SGD step."""
    torch.manual_seed(0)
    module = EnasSearch(tiny(space), grad_clip=0.05, warmup_epochs=1, seed=3)  # warm-up: no controller step
    x, y = batch(8)
    sample = module.controller.sample(module.generator(_WEIGHT_STREAM, 0))  # what step 0 draws
    reference = copy.deepcopy(module.supernet).train()
    weights = reference.weight_parameters()
    start = torch.cat([w.detach().reshape(-1) for w in weights])
    F.cross_entropy(reference(x, sample.weights), y).backward()
    assert torch.nn.utils.clip_grad_norm_(weights, 0.05) > 5 * 0.05  # the clip is active
    torch.optim.SGD(weights, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-4).step()

    pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        module, DataLoader([{"train": (x, y), "val": (x, y)}], batch_size=None))  # fmt: skip
    got = torch.cat([w.detach().reshape(-1) for w in module.supernet.weight_parameters()])
    expected = torch.cat([w.detach().reshape(-1) for w in weights])
    assert (got - start).abs().max() > 0
    assert torch.allclose(got, expected, rtol=0, atol=1e-7)
