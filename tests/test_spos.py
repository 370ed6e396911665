"""SPOS (lightning_modules/spos.py, oneshot/evolution.py) against direct computations: uniform
path sampling (chi-square), evolution's monotone best fitness and population sizes, random
search's count of distinct architectures, BN recalibration, and the real app on both spaces."""

import itertools
import json
import random

import pytest
import torch
from oneshot.lightning_modules.gdas import seeded_generator
from oneshot.lightning_modules.spos import SposSearch, recalibrate_bn
from torch import nn

import oneshot
from oneshot.evolution import evolution_search, random_search
from oneshot.spaces.darts import DartsSupernet, cell_edges
from oneshot.spaces.nb201 import NB201Network

# 0.999 quantiles of chi-square: a correct sampler fails one in a thousand runs (seeded: never).
CHI2_999 = {2: 13.82, 6: 22.46, 24: 51.18}


def chi2(counts, expected):
    return sum((c - expected) ** 2 / expected for c in counts)


def test_paths_are_uniform_over_the_ops_of_every_nb201_edge():
    net = NB201Network(C=4, N=1, num_classes=3, image_size=8)
    module, n = SposSearch(net, seed=0), 2000
    counts = [[0] * 5 for _ in range(6)]
    for step in range(n):  # the draws of training steps 0..n-1
        genotype = module.genotype_of(module.random_keys(seeded_generator(0, 0, step)))
        for e, op in enumerate(genotype.edge_ops):
            counts[e][net.candidates["cell"][e].index(op)] += 1
    stat = sum(chi2(row, n / 5) for row in counts)
    assert stat < CHI2_999[24], (stat, counts)


def test_paths_are_uniform_over_darts_ops_and_input_pairs():
    net = DartsSupernet(C=4, layers=3, num_classes=3, image_size=8, steps=3, multiplier=3)
    module, n = SposSearch(net, seed=1), 1500
    ops, pairs = {}, {}
    for step in range(n):
        g = module.genotype_of(module.random_keys(seeded_generator(1, 0, step)))
        for op, _ in g.normal:
            ops[op] = ops.get(op, 0) + 1
        node4 = tuple(sorted(j for _, j in g.normal[4:6]))  # node 4 picks 2 of its 4 inputs
        pairs[node4] = pairs.get(node4, 0) + 1
    assert "none" not in ops and len(ops) == 7  # every other DARTS op, none never
    assert chi2(ops.values(), 6 * n / 7) < CHI2_999[6], ops
    assert set(pairs) == set(itertools.combinations(range(4), 2))
    assert chi2(pairs.values(), n / 6) < 20.52, pairs  # 5 degrees of freedom
    assert len(cell_edges(3)) == 9


# A toy space for the search loops: 6 choices of 5 values; fitness = the sum (max 24).
def toy_sample(rng):
    return tuple(rng.randrange(5) for _ in range(6))


def toy_mutate(c, prob, rng):
    return tuple(rng.randrange(5) if rng.random() < prob else v for v in c)


def toy_crossover(a, b, rng):
    return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))


def test_evolution_best_fitness_never_decreases_and_sizes_are_respected():
    calls = []

    def fitness(c):
        calls.append(c)
        return sum(c) + 0.1 * random.Random(hash(c)).random()

    result = evolution_search(toy_sample, toy_mutate, toy_crossover, key=lambda c: c, fitness=fitness,
                              population=12, generations=8, top_k=4, n_mutation=5, n_crossover=5,
                              mutation_prob=0.3, seed=2)  # fmt: skip
    best = [row["best_fitness"] for row in result.history]
    assert len(best) == 8 and all(b >= a for a, b in zip(best, best[1:]))
    assert result.history[0]["evaluated"] == 12 and all(row["evaluated"] <= 12 for row in result.history)
    assert len(calls) == len(set(calls)) == len(result.evaluated)  # each candidate evaluated once
    assert result.best_fitness == max(result.evaluated.values()) == best[-1]
    # The search improves on its random start by selection (max 24.1; the start ~ 17).
    assert best[-1] > best[0]


def test_random_search_evaluates_the_stated_number_of_distinct_architectures():
    calls = []
    result = random_search(toy_sample, key=lambda c: c, fitness=lambda c: calls.append(c) or sum(c),
                           evaluations=100, per_generation=25, seed=3)  # fmt: skip
    assert len(calls) == len(set(calls)) == 100 == len(result.evaluated)
    assert [row["evaluated"] for row in result.history] == [25] * 4
    assert result.best_fitness == max(sum(c) for c in calls)


def test_bn_recalibration_changes_the_running_statistics_and_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    batches = [torch.randn(5, 3, 6, 6) + k for k in range(3)]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    recalibrate_bn(model, model, batches)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert not model.training and model[1].momentum == 0.1  # mode and momentum restored
    # Direct: the plain average over the batches of each batch's mean and unbiased variance.
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, atol=1e-4)
    assert int(model[1].num_batches_tracked) == 3


def test_fitness_search_restores_the_trained_statistics_and_is_deterministic():
    torch.manual_seed(0)
    net = NB201Network(C=4, N=1, num_classes=3, image_size=8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    kwargs = dict(population=6, generations=3, top_k=2, n_mutation=2, n_crossover=2, seed=4)
    first = SposSearch(net, **kwargs).derive_genotype(data[:1], data[1:])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert SposSearch(net, **kwargs).derive_genotype(data[:1], data[1:]) == first
    random_module = SposSearch(net, **kwargs, search="random")
    random_module.derive_genotype(data[:1], data[1:])
    assert len(random_module.result.evaluated) == 18


@pytest.mark.parametrize("bad", ["strategy.search=grid", "strategy.mutation_prob=1.5", "strategy.population=0"])
def test_bad_spos_values_are_one_line(bad):
    from oneshot.validate import ConfigError, check_values

    with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
        check_values(oneshot.compose("search", ["strategy=spos", bad]))


def test_more_children_than_the_population_is_refused():
    with pytest.raises(ValueError, match="n_mutation"):
        SposSearch(NB201Network(C=4, N=1, num_classes=3, image_size=8), population=10, n_mutation=6, n_crossover=6)


@pytest.mark.slow
@pytest.mark.parametrize(("space", "search"), [("nb201", "evolution"), ("darts", "random")])
def test_spos_through_the_real_app(space, search, tmp_path):
    size = ["space.supernet.C=4", "space.supernet.N=1"] if space == "nb201" else ["space.supernet.C=4", "space.supernet.layers=3"]
    cfg = oneshot.compose("search", [
        "strategy=spos", f"space={space}", *size, f"strategy.search={search}", "data=digits", "data.batch_size=16",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1", "retrain.enabled=false",
        "logger.pictures=false", "strategy.population=5", "strategy.generations=3", "strategy.top_k=2",
        "strategy.n_mutation=2", "strategy.n_crossover=2", "strategy.recalibration_batches=2", "strategy.eval_batches=1",
        f"run_dir={tmp_path}",
    ])  # fmt: skip
    report = oneshot.search(cfg)
    spos = json.loads((tmp_path / "spos.json").read_text())
    assert spos["best"] == report["genotype"] == (tmp_path / "genotype.txt").read_text().strip()
    assert len(spos["fitness"]) == (15 if search == "random" else spos["history"][-1]["total_evaluated"])
    assert spos["best_fitness"] == max(spos["fitness"].values())
    assert (tmp_path / "plots" / "spos_fitness.png").stat().st_size > 1000
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "spos/best_fitness" in header


# The evolution at test size (the paper's 1000 evaluations are minutes on a CPU).
SMALL_SEARCH = ["strategy.population=6", "strategy.generations=2", "strategy.top_k=2", "strategy.n_mutation=2",
                "strategy.n_crossover=2", "strategy.recalibration_batches=2", "strategy.eval_batches=2"]  # fmt: skip


@pytest.mark.slow
def test_spos_two_processes_end_with_the_architecture_of_one(tmp_path, monkeypatch):
    from test_ddp import WORLD, ddp_search, one_process_search

    args = ["strategy=spos", *SMALL_SEARCH]
    ddp_dir = ddp_search(tmp_path, args)
    report = json.loads((ddp_dir / "report.json").read_text())
    assert report["ddp"] == {"world_size": WORLD, "max_parameter_diff_across_ranks": 0.0}
    ref = one_process_search(tmp_path / "ref", args, monkeypatch, ghost_bn=True)
    a = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # Every parameter, the alphas included: the same run, whatever the process count (BN's running
    # statistics are rank 0's shard's under DDP, so they are not compared).
    params = [k for k in a if k.startswith("supernet.") and "running_" not in k and "num_batches" not in k]
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in params)
    assert diff < 1e-5, diff
    # The search after training: every rank scored the same candidates on the same unsharded
    # batches of its per-process size (8). The reference's ghost-BN forward would split those
    # too, so the search is checked on its own: the DDP run's trained supernet, reloaded here and
    # searched in one process on the same batches, picks the genotype the two ranks picked.
    from itertools import islice

    from test_ddp import TINY

    from oneshot.data import SearchDataModule

    module = SposSearch.load_from_checkpoint(ddp_dir / "checkpoints" / "last.ckpt")
    assert module.seed == 3 and module.search == "evolution"
    dm = SearchDataModule(name="digits", batch_size=8, augment=False, seed=3)
    dm.setup()
    recalibration = list(islice(dm._loader(dm.weight_set, train=False), module.recalibration_batches))
    evaluation = list(islice(dm.val_dataloader(), module.eval_batches))
    assert str(module.derive_genotype(recalibration, evaluation)) == report["genotype"]
    assert "seed=3" in TINY and ref["genotype"]
