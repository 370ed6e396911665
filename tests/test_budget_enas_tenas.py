"""Issue 17: budgets in ENAS (the reward of an over-budget sample) and in TE-NAS (no prune leaves a
supernet whose cheapest architecture is over budget), checked against closed forms and brute force,
and through the real pipeline: a tight budget gives a result within it, a loose one changes nothing."""

import csv
import itertools
import json

import pytest
import torch
from oneshot.lightning_modules.enas import EnasSearch
from sklearn.datasets import load_digits

import oneshot
from oneshot.cost import BudgetError, build_cost_model
from oneshot.cost.budget import BudgetPenalty
from oneshot.genotypes import NB201Genotype, parse
from oneshot.prune import budget_check, prune
from oneshot.spaces import NB201Network
from oneshot.spaces.nb201 import EDGES

pytestmark = pytest.mark.usefixtures("one_thread")

PRIMITIVES = ("none", "skip_connect", "nor_conv_3x3", "avg_pool_3x3")
FAST = {"num_inits": 1, "ntk_batch": 4, "n_crops": 200}
EDGE_NAMES = [f"{t}<-{s}" for t, s in EDGES]


def params_model(primitives=PRIMITIVES):
    """The parameter-count cost model of a small NB201 supernet (exact, additive)."""
    supernet = NB201Network(
        C=4, N=1, num_classes=10, in_channels=3, image_size=8, primitives=primitives
    )
    return supernet, build_cost_model(
        supernet, "params", input_shape=(3, 8, 8), num_classes=10, progress=False
    )


def brute_cheapest(cost, survivors):
    """The least cost over every architecture the survivors can form, by enumeration."""
    return min(
        cost.of_genotype(NB201Genotype.from_edge_ops(ops)) for ops in itertools.product(*survivors)
    )


def cheapest_without_none(cost, primitives=PRIMITIVES):
    return brute_cheapest(cost, [[op for op in primitives if op != "none"]] * len(EDGES))


@pytest.fixture(scope="module")
def digits():
    x = torch.tensor(load_digits().images[:100], dtype=torch.float32)
    return ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1)


# ---- TE-NAS --------------------------------------------------------------------------------------


def test_cheapest_of_a_pruned_supernet_equals_brute_force():
    _, cost = params_model()
    cheapest = budget_check(cost, 1.0)
    live = [op for op in PRIMITIVES if op != "none"]
    for kept in itertools.islice(
        itertools.product(*[[s for r in (1, 2, 3) for s in itertools.combinations(live, r)]] * 6),
        0,
        4000,
        97,
    ):
        assert cheapest({"cell": [set(k) for k in kept]}) == pytest.approx(
            brute_cheapest(cost, kept), rel=1e-12
        )


def replay(history, survivors_at_start):
    """The survivors after each round, from the prune's history rows (pruned flags)."""
    alive = [set(s) for s in survivors_at_start]
    rounds = {}
    for row in history:
        rounds.setdefault(row.round, []).append(row)
    for r in sorted(rounds):
        for row in rounds[r]:
            if row.pruned:
                alive[EDGE_NAMES.index(row.edge)].discard(row.op)
        yield [sorted(a) for a in alive]


def test_tenas_prune_never_leaves_a_supernet_over_budget(digits):
    _, cost = params_model()
    free = prune("nb201", digits, C=1, primitives=PRIMITIVES, **FAST)
    budget = cheapest_without_none(
        cost
    )  # the tightest budget TE-NAS can meet: one architecture fits
    assert cost.of_genotype(free.genotype) > budget, (
        "the budget must bind for this test to mean anything"
    )
    tight = prune("nb201", digits, C=1, primitives=PRIMITIVES, budget=(cost, budget), **FAST)
    assert cost.of_genotype(tight.genotype) <= budget * (1 + 1e-12)
    start = [[op for op in PRIMITIVES if op != "none"]] * len(EDGES)
    for survivors in replay(tight.history, start):
        assert brute_cheapest(cost, survivors) <= budget * (1 + 1e-12)
    mid = (budget + cost.of_genotype(free.genotype)) / 2
    between = prune("nb201", digits, C=1, primitives=PRIMITIVES, budget=(cost, mid), **FAST)
    assert cost.of_genotype(between.genotype) <= mid
    for survivors in replay(between.history, start):
        assert brute_cheapest(cost, survivors) <= mid
    # a loose budget: the same prune, round for round
    loose = prune("nb201", digits, C=1, primitives=PRIMITIVES, budget=(cost, 1e9), **FAST)
    assert loose.genotype == free.genotype and loose.history == free.history
    with pytest.raises(
        BudgetError, match=r"budget.max=.* below the cheapest architecture TE-NAS can derive"
    ):
        prune("nb201", digits, C=1, primitives=PRIMITIVES, budget=(cost, budget * 0.999), **FAST)


def test_tenas_warm_start_keeps_a_supernet_whose_cheapest_architecture_fits(digits):
    # skip costs no parameter: on these ops the unbudgeted prune keeps an edge without it
    prims = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3")
    _, cost = params_model(prims)
    free = prune("nb201", digits, keep=2, C=1, primitives=prims, **FAST)
    budget = cheapest_without_none(cost, prims)
    assert brute_cheapest(cost, free.survivors["cell"]) > budget, "the budget must bind"
    kept = prune("nb201", digits, keep=2, C=1, primitives=prims, budget=(cost, budget), **FAST)
    assert all(len(ops) == 2 for ops in kept.survivors["cell"])
    assert brute_cheapest(cost, kept.survivors["cell"]) <= budget * (1 + 1e-12)
    start = [[op for op in prims if op != "none"]] * len(EDGES)
    assert all(brute_cheapest(cost, s) <= budget * (1 + 1e-12) for s in replay(kept.history, start))


def test_warm_start_under_a_budget_through_the_pipeline(tmp_path):
    overrides = ["warmstart=tenas", "warmstart.keep=2", *(f"warmstart.{o}" for o in ("num_inits=1", "n_crops=100",
                 "ntk_batch=8", "images=200", "progress=false")), "+trainer.fast_dev_run=true", "data=digits",
                 "data.batch_size=8", "retrain.enabled=false", "budget=params", f"run_dir={tmp_path}"]  # fmt: skip
    cfg = oneshot.compose("search", [*overrides, "budget.max=100"])
    from oneshot.lightning_modules.pipeline import build_supernet

    from oneshot.cost.budget import cost_model_from_cfg
    from oneshot.data import dataset_info

    info = dataset_info("digits")
    cost = cost_model_from_cfg(cfg, build_supernet(cfg, info), info)
    budget = cheapest_without_none(cost) * 1.05
    report = oneshot.search(oneshot.compose("search", [*overrides, f"budget.max={budget}"]))
    survivors = report["warmstart"]["survivors"]["cell"]
    assert all(len(ops) == 2 for ops in survivors) and brute_cheapest(cost, survivors) <= budget
    assert report["budget"]["cost"] <= budget and report["cost"]["budget"]["within"]


# ---- ENAS ----------------------------------------------------------------------------------------


def test_enas_reward_of_over_budget_samples(digits):
    supernet, cost = params_model()
    archs = [
        NB201Genotype.from_edge_ops(ops) for ops in (["skip_connect"] * 6, ["nor_conv_3x3"] * 6)
    ]
    cheap, dear = (cost.of_genotype(g) for g in archs)
    budget = (cheap + dear) / 2
    reward = torch.tensor(0.6)
    hard = EnasSearch(supernet)
    hard.budget = BudgetPenalty(cost, budget)
    assert hard.budgeted_reward(reward, archs[0]) == reward  # within budget: the accuracy itself
    assert hard.budgeted_reward(reward, archs[1]) == 0.0
    tunas = EnasSearch(supernet, budget_reward="tunas", tunas_beta=-0.5)
    tunas.budget = hard.budget
    for g, c in zip(archs, (cheap, dear)):
        assert float(tunas.budgeted_reward(reward, g)) == pytest.approx(
            0.6 - 0.5 * abs(c / budget - 1)
        )
    assert EnasSearch(supernet).budgeted_reward(reward, archs[1]) == reward  # no budget: unchanged
    with pytest.raises(ValueError, match="beta < 0"):
        EnasSearch(supernet, budget_reward="tunas", tunas_beta=0.1)
    # derivation scores only the samples within budget
    hard.derive_samples = 50
    batches = [(digits[:32], torch.randint(0, 10, (32,)))]
    derived = hard.derive_genotype(batches)
    assert cost.of_genotype(derived) <= budget and hard.derived["best_sampled"] == str(derived)
    assert hard.derived["over_budget"] > 0  # some samples were over budget, and none of them won
    fitting = [g for g in hard.derived["scores"] if cost.of_genotype(parse(g)) <= budget]
    assert hard.derived["scores"][str(derived)] == max(hard.derived["scores"][g] for g in fitting)


def test_enas_budgeted_derivation_ranks_by_the_policy_not_the_untrained_alphas():
    """When no sample fits, the pipeline derives within budget from ``arch_probs()``: for ENAS the
    policy's greedy path (each row its decision's softmax), whose unbudgeted argmax is the most
    likely architecture; a binding budget then gives the best-by-policy architecture that fits."""
    from oneshot.cost.derive import derive_within_budget

    supernet, cost = params_model()
    module = EnasSearch(supernet)
    torch.nn.init.normal_(module.controller.op_head.weight, std=2.0)  # a decided, non-uniform policy
    probs = module.arch_probs()["cell"].double()
    greedy = module.controller.most_likely()
    for e, d in enumerate(greedy.decisions):
        assert torch.allclose(probs[e], torch.softmax(d.logits.detach().double(), -1))
    logits = {"cell": probs.log()}
    assert derive_within_budget(logits, cost, float("inf")) == greedy.genotype
    budget = (cost.cheapest() + cost.of_genotype(greedy.genotype)) / 2
    derived = derive_within_budget(logits, cost, budget)
    brute = max(
        (g for g in map(NB201Genotype.from_edge_ops, itertools.product(*supernet.candidates["cell"]))
         if cost.of_genotype(g) <= budget),
        key=lambda g: sum(float(probs[e].log()[supernet.candidates["cell"][e].index(op)])
                          for e, op in enumerate(g.edge_ops)),
    )  # fmt: skip
    assert derived == brute


# ---- the real pipeline ---------------------------------------------------------------------------

SEARCH = ["data=digits", "data.batch_size=16", "trainer.max_epochs=2", "+trainer.limit_train_batches=3",
          "+trainer.limit_val_batches=1", "retrain.enabled=false", "logger.pictures=false", "cost.progress=false"]  # fmt: skip
STRATEGY = {
    "enas": ["strategy=enas", "strategy.derive_samples=20"],
    "tenas": ["strategy=tenas", "strategy.num_inits=1", "strategy.n_crops=100", "strategy.ntk_batch=8",
              "strategy.images=200", "strategy.progress=false"],
}  # fmt: skip


def search(strategy, run_dir, *budget):
    return oneshot.search(
        oneshot.compose("search", [*SEARCH, *STRATEGY[strategy], f"run_dir={run_dir}", *budget])
    )


def column(run_dir, name):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [row[name] for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["enas", "tenas"])
def test_tight_budget_is_met_and_a_loose_one_changes_nothing(strategy, tmp_path):
    free = search(strategy, tmp_path / "free")
    cost = json.loads((tmp_path / "free" / "report.json").read_text())["cost"]
    loose = search(strategy, tmp_path / "loose", "budget=params", "budget.max=100")
    assert (
        loose["genotype"] == free["genotype"]
        and loose["genotypes_per_epoch"] == free["genotypes_per_epoch"]
    )
    if strategy == "enas":  # the same rewards, step for step
        assert column(tmp_path / "loose", "enas/reward") == column(tmp_path / "free", "enas/reward")
    else:
        loose_prune, free_prune = (
            json.loads((tmp_path / d / "tenas.json").read_text()) for d in ("loose", "free")
        )
        assert loose_prune.pop("seconds") > 0 and free_prune.pop("seconds") > 0
        assert loose_prune == free_prune  # the same prune, round for round
    assert not loose["budget"]["rederived"]
    tight = 0.9 * cost["parameters"] / 1e6  # below what the unbudgeted search found
    report = search(strategy, tmp_path / "tight", "budget=params", f"budget.max={tight}")
    assert report["genotype"] != free["genotype"]
    assert report["cost"]["budget"]["within"] and report["cost"]["parameters"] / 1e6 <= tight
    assert report["budget"]["cost"] <= tight
    if strategy == "tenas":  # the prune itself met it: nothing was re-derived afterwards
        assert not report["budget"]["rederived"]
