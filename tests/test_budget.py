"""Issue 17 (A): derivation within a budget equals brute-force enumeration of every architecture
(the most probable one that fits) on small NB201, DARTS and model spaces, for several budgets."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

from oneshot.arch import Arch
from oneshot.cost import BudgetError, build_cost_model, derive_within_budget, fits, total_log_prob
from oneshot.genotypes import DartsGenotype, NB201Genotype
from oneshot.spaces import DartsSupernet, ModelSpace, NB201Network

sys.path.insert(0, str(Path(__file__).parent))
from user_models_example import TinyNet  # noqa: E402


def all_nb201(supernet):
    """Every cell with a path of non-'none' ops from its input to its output (the others make the
    network a constant), checked here by reachability over the genotype's own edges."""
    for ops in itertools.product(*supernet.candidates["cell"]):
        g = NB201Genotype.from_edge_ops(ops)
        reached = {0}
        for j, node in enumerate(g.nodes, start=1):
            if any(op != "none" and i in reached for op, i in node):
                reached.add(j)
        if len(g.nodes) in reached:
            yield g


def all_darts(supernet):
    def cells(cands):
        per_node, start = [], 0
        for node in range(supernet.steps):
            options = []
            for i, j in itertools.combinations(range(node + 2), 2):
                ops_i = [o for o in cands[start + i] if o != "none"]
                ops_j = [o for o in cands[start + j] if o != "none"]
                options += [((oi, i), (oj, j)) for oi, oj in itertools.product(ops_i, ops_j)]
            per_node.append(options)
            start += node + 2
        for choice in itertools.product(*per_node):
            yield tuple(p for pair in choice for p in pair)

    concat = tuple(range(2 + supernet.steps - supernet.multiplier, supernet.steps + 2))
    for normal in cells(supernet.candidates["normal"]):
        for reduce in cells(supernet.candidates["reduce"]):
            yield DartsGenotype(normal, concat, reduce, concat)


def all_archs(supernet):
    labels = list(supernet.choices)
    for names in itertools.product(*(supernet.choices[label].names for label in labels)):
        yield Arch({label: supernet.choices[label].value_of(n) for label, n in zip(labels, names)})


def canonical(g):
    """A DARTS genotype with each node's two pairs in one order (the order carries no meaning)."""
    if not isinstance(g, DartsGenotype):
        return g
    nodes = lambda es: tuple(tuple(sorted(es[k : k + 2])) for k in range(0, len(es), 2))  # noqa: E731
    return nodes(g.normal), nodes(g.reduce)


SPACES = {
    "nb201": (lambda: NB201Network(C=4, N=1, candidates={"cell": [("none", "skip_connect", "nor_conv_3x3")] * 6}),
              all_nb201, (3, 8, 8)),
    "darts": (lambda: DartsSupernet(C=4, layers=3, steps=2, multiplier=2,
                                    primitives=("none", "skip_connect", "sep_conv_3x3", "max_pool_3x3")),
              all_darts, (3, 8, 8)),
    "pcdarts": (lambda: DartsSupernet(C=4, layers=3, steps=2, multiplier=2, partial_channels=2,
                                      primitives=("none", "avg_pool_3x3", "dil_conv_3x3")),
                all_darts, (3, 8, 8)),
    "model": (lambda: ModelSpace(TinyNet(width=4), in_channels=3, image_size=8), all_archs, (3, 8, 8)),
}  # fmt: skip


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_budgeted_derivation_equals_brute_force(space, metric):
    make, enumerate_all, shape = SPACES[space]
    torch.manual_seed(hash((space, metric)) % 1000)
    supernet = make()
    with torch.no_grad():
        for a in supernet.arch_parameters():
            a.normal_(0, 1.5)  # far from uniform: probabilities that matter
    cost = build_cost_model(supernet, metric, input_shape=shape)
    from oneshot.cost.derive import _log_probs

    lp = _log_probs(supernet, cost)  # once: the brute force scores thousands of architectures
    scored = []
    for g in enumerate_all(supernet):
        picks = cost.choices_of(g)
        scored.append((cost.fixed + sum(float(cost.per_choice[t][e, k]) for t, e, k in picks),
                       sum(lp[t][e, k] for t, e, k in picks), g))  # fmt: skip
    costs = sorted(c for c, _, _ in scored)
    assert costs[0] == pytest.approx(cost.cheapest(), rel=1e-12)
    for q in (0.0, 0.05, 0.3, 0.6, 1.0):
        budget = costs[int(q * (len(costs) - 1))]
        best_score = max(s for c, s, _ in scored if fits(c, budget))
        derived = derive_within_budget(supernet, cost, budget)
        assert fits(cost.of_genotype(derived), budget)
        assert total_log_prob(supernet, cost, derived) == pytest.approx(best_score, abs=1e-9)
        winners = [g for c, s, g in scored if fits(c, budget) and s > best_score - 1e-9]
        if len(winners) == 1:
            assert canonical(derived) == canonical(winners[0])
    argmax = supernet.genotype()
    if space != "pcdarts" and any(g == argmax for _, _, g in scored):
        # the unconstrained optimum is the usual derivation (DARTS' derive without betas), when
        # that is an architecture the derivation may return (NB201: a connected cell)
        assert derive_within_budget(supernet, cost, costs[-1]) == argmax


def test_budget_below_the_cheapest_architecture_is_one_line():
    supernet = NB201Network(C=4, N=1, candidates={"cell": [("skip_connect", "nor_conv_3x3")] * 6})
    cost = build_cost_model(supernet, "params", input_shape=(3, 8, 8))
    with pytest.raises(BudgetError) as e:
        derive_within_budget(supernet, cost, cost.cheapest() * 0.99)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        f"budget.max={cost.cheapest() * 0.99:g} M params is below the cheapest architecture, "
    )
    assert f"{cost.cheapest():.6g} M params" in message
    assert derive_within_budget(supernet, cost, cost.cheapest()) == NB201Genotype.from_edge_ops(
        ["skip_connect"] * 6
    )


def test_nb201_derivation_never_returns_a_cell_without_a_path():
    """Alphas that favour 'none' everywhere (what a tight FLOPs hinge does): the argmax is the
    all-'none' cell, a constant network. Within any budget the derivation returns the most
    probable connected cell instead, which here is one op on the direct edge 0->3 (the best
    single non-'none' logit on a path of length one), and the budget penalty re-derives."""
    from oneshot.lightning_modules.darts import DartsSearch

    from oneshot.cost.budget import BudgetPenalty

    supernet = NB201Network(C=4, N=1, candidates={"cell": [("none", "skip_connect", "nor_conv_3x3")] * 6})
    with torch.no_grad():
        a = supernet.alphas["cell"]
        a.zero_()
        a[:, 0] = 5.0  # none
        a[:, 2] = torch.tensor([0.1, 0.2, 0.3, 2.0, 0.5, 0.6])  # conv: edge 3 is 3<-0
    cost = build_cost_model(supernet, "flops", input_shape=(3, 8, 8))
    assert str(supernet.genotype()) == "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    loose = cost.of_genotype(NB201Genotype.from_edge_ops(["nor_conv_3x3"] * 6))
    derived = derive_within_budget(supernet, cost, loose)
    assert str(derived) == "|none~0|+|none~0|none~1|+|nor_conv_3x3~0|none~1|none~2|"
    # the cheapest architecture is a connected one (one skip: the fixed part's cost)
    assert cost.cheapest() == pytest.approx(cost.fixed, rel=1e-12)
    assert str(derive_within_budget(supernet, cost, cost.cheapest())) == (
        "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|")
    module = DartsSearch(supernet)
    penalty = BudgetPenalty(cost, loose)
    final, report = penalty.enforce(module, supernet.genotype())
    assert final == derived and report["rederived"]
    assert report["reason"] == "no path from input to output"
    assert report["argmax_cost"] == pytest.approx(cost.fixed, rel=1e-12)


def test_logits_dict_and_supernet_give_the_same_derivation():
    supernet = SPACES["darts"][0]()
    with torch.no_grad():
        for a in supernet.arch_parameters():
            a.normal_(0, 1)
    cost = build_cost_model(supernet, "flops", input_shape=(3, 8, 8))
    budget = (cost.cheapest() + cost.of_genotype(supernet.genotype())) / 2
    logits = {t: a.detach() for t, a in supernet.alphas.items()}
    assert derive_within_budget(logits, cost, budget) == derive_within_budget(
        supernet, cost, budget
    )


# ---- the budget in a real search (oneshot-search's pipeline, tiny sizes) -----------------------

import oneshot  # noqa: E402
from oneshot.cost import UNITS  # noqa: E402

SEARCH = ["data=digits", "data.batch_size=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
          "+trainer.limit_val_batches=1", "retrain.enabled=false", "logger.pictures=false", "seed=3"]  # fmt: skip
CASES = {
    "nb201-order1": ["space=nb201", "space.supernet.C=4", "space.supernet.N=1", "space.network.C=8",
                     "+space.supernet.primitives=[skip_connect,nor_conv_1x1,nor_conv_3x3]"],
    "pcdarts-order2": ["space=darts", "space.supernet.C=4", "space.supernet.layers=3", "space.supernet.partial_channels=2",
                       "space.network.C=4", "space.network.layers=3", "strategy.order=2"],
}  # fmt: skip


def _search(tmp_path, name, overrides):
    cfg = oneshot.compose(
        "search", [*SEARCH, *overrides, f"run_dir={tmp_path / name}", f"cost.cache_dir={tmp_path}"]
    )
    report = oneshot.search(cfg)
    state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
    alphas = {k: v for k, v in state["state_dict"].items() if ".alphas." in k or ".betas." in k}
    return cfg, report, alphas, state


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_search_with_a_budget_ends_within_it_and_a_loose_one_changes_nothing(case, tmp_path):
    from oneshot.lightning_modules.pipeline import build_supernet

    from oneshot.cost.budget import cost_model_from_cfg
    from oneshot.data import SearchDataModule
    from oneshot.genotypes import parse

    cfg, free, free_alphas, _ = _search(tmp_path, "free", CASES[case])
    info = SearchDataModule(**{**cfg.data, "seed": cfg.seed}).info
    cost = cost_model_from_cfg(cfg, build_supernet(cfg, info), info, metric="params")
    argmax_cost = cost.of_genotype(parse(free["genotype"]))
    assert argmax_cost > cost.cheapest()

    # A budget above every architecture: the same genotype and bit-identical alphas.
    _, loose, loose_alphas, _ = _search(
        tmp_path, "loose", [*CASES[case], "budget=params", "budget.max=1000"]
    )
    assert loose["genotype"] == free["genotype"]
    assert loose_alphas.keys() == free_alphas.keys()
    assert all(torch.equal(loose_alphas[k], free_alphas[k]) for k in free_alphas)
    assert loose["budget"]["rederived"] is False and loose["budget"]["multiplier"] == 0.0

    # A tight budget, below the unconstrained result: the written architecture fits it.
    tight_max = cost.cheapest() + 0.25 * (argmax_cost - cost.cheapest())
    _, tight, tight_alphas, state = _search(
        tmp_path, "tight", [*CASES[case], "budget=params", f"budget.max={tight_max}"]
    )
    written = parse((tmp_path / "tight" / "genotype.txt").read_text().strip())
    assert str(written) == tight["genotype"]
    assert cost.of_genotype(written) <= tight_max + 1e-12
    assert tight["budget"]["cost"] == pytest.approx(cost.of_genotype(written), rel=1e-12)
    assert tight["budget"]["unit"] == UNITS["params"]
    # the penalty acted: the multiplier rose and is in the checkpoint, and the alphas moved otherwise
    assert state["budget"]["multiplier"] > 0
    assert any(not torch.equal(tight_alphas[k], free_alphas[k]) for k in free_alphas)


@pytest.mark.slow
def test_a_budget_no_architecture_meets_stops_the_search_before_training(tmp_path):
    cfg = oneshot.compose("search", [*SEARCH, *CASES["nb201-order1"], "budget=flops", "budget.max=1e-6",
                                     f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    from oneshot.cost import BudgetError

    with pytest.raises(
        BudgetError,
        match=r"^budget.max=1e-06 MFLOPs is below the cheapest architecture, [0-9.]+ MFLOPs$",
    ):
        oneshot.search(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- the penalty forms and the multiplier -------------------------------------------------------


def _penalty(loss, multiplier=0.7, max_fraction=0.5):
    from oneshot.cost.budget import BudgetPenalty

    supernet = NB201Network(
        C=4, N=1, candidates={"cell": [("skip_connect", "nor_conv_1x1", "nor_conv_3x3")] * 6}
    )
    cost = build_cost_model(supernet, "flops", input_shape=(3, 8, 8))
    top = cost.fixed + float(cost.per_choice["cell"].max(-1).values.sum())
    budget = cost.cheapest() + max_fraction * (top - cost.cheapest())
    return (
        supernet,
        cost,
        BudgetPenalty(cost, budget, loss=loss, dual_lr=0.5, multiplier=multiplier),
    )


@pytest.mark.parametrize("loss", ["hinge", "proxyless", "fbnet"])
def test_penalty_gradient_is_the_gradient_of_the_papers_loss(loss):
    """factor * dCE + d(extra) equals autograd of the closed form: CE + l*(r-1) (hinge),
    CE + l*r (proxyless), CE * r**l (fbnet), r = E/B, over budget."""
    supernet, cost, penalty = _penalty(loss)
    alphas = supernet.alphas["cell"]
    with torch.no_grad():
        alphas.copy_(
            torch.tensor([0.0, 1.0, 3.0]).expand(6, 3)
        )  # expensive ops favoured: over budget
    task = lambda: (alphas**2).sum() / 10  # noqa: E731 - a stand-in for the validation loss
    expected = cost.expected({"cell": torch.softmax(alphas, -1)})
    assert float(expected.detach()) > penalty.max
    factor, extra = penalty.terms(expected, task())
    (g_task,) = torch.autograd.grad(task(), alphas)
    got = (factor if factor is not None else 1) * g_task + torch.autograd.grad(extra, alphas)[0]
    r, lam = cost.expected({"cell": torch.softmax(alphas, -1)}) / penalty.max, penalty.multiplier
    closed = {
        "hinge": task() + lam * (r - 1),
        "proxyless": task() + lam * r,
        "fbnet": task() * r**lam,
    }[loss]
    (want,) = torch.autograd.grad(closed, alphas)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss", ["hinge", "fbnet"])
def test_penalty_is_inactive_under_budget_and_without_multiplier(loss):
    supernet, cost, penalty = _penalty(loss, max_fraction=1.0)  # every architecture fits
    expected = penalty.expected(
        type("M", (), {"supernet": supernet, "arch_probs": supernet.arch_weights})()
    )
    assert penalty.terms(expected, torch.tensor(1.0)) == (None, None)
    _, _, idle = _penalty(loss, multiplier=0.0)
    assert idle.terms(torch.tensor(1e9, dtype=torch.float64), torch.tensor(1.0)) == (None, None)


def test_multiplier_dual_ascent_and_state():
    _, _, penalty = _penalty("hinge", multiplier=0.2)
    b = penalty.max
    assert penalty.step(torch.tensor(1.5 * b)) == pytest.approx(
        0.2 + 0.5 * 0.5
    )  # over budget: up by lr*(r-1)
    assert penalty.step(torch.tensor(0.2 * b)) == pytest.approx(
        max(0.0, 0.45 - 0.5 * 0.8)
    )  # under: down
    assert penalty.step(torch.tensor(0.0)) == 0.0  # projected at 0
    state = penalty.state_dict()
    _, _, other = _penalty("hinge", multiplier=3.0)
    other.load_state_dict(state)
    assert other.multiplier == penalty.multiplier


# ---- bad input: one line each (oneshot/validate.py, issue 17 A) ---------------------------------


@pytest.mark.parametrize(("override", "names"), [
    ("budget.metric=energy", ["budget.metric=energy", "latency, flops, params"]),
    ("budget.max=0", ["budget.max=0", "> 0"]),
    ("budget.max=-3", ["budget.max=-3", "> 0"]),
    ("budget.loss=l2", ["budget.loss=l2", "hinge, proxyless, fbnet"]),
    ("cost.batch_size=0", ["cost.batch_size=0", ">= 1"]),
    ("cost.repeats=0", ["cost.repeats=0", ">= 1"]),
])  # fmt: skip
def test_bad_budget_and_cost_values_are_one_line(override, names):
    from oneshot.validate import ConfigError, check_config

    with pytest.raises(ConfigError) as e:
        check_config(oneshot.compose("search", ["budget=latency", "budget.max=1", override]))
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cost_on_cuda_where_there_is_none_is_one_line():
    from oneshot.validate import ConfigError, check_config

    with pytest.raises(
        ConfigError, match=r"^cost.device=cuda is out of range; valid: cpu, or cuda on a machine"
    ):
        check_config(oneshot.compose("search", ["cost.device=cuda"]))


def test_a_table_of_another_space_is_refused_before_the_run(tmp_path):
    from oneshot.validate import ConfigError, check_config

    supernet = DartsSupernet(C=4, layers=3, steps=1, multiplier=1)
    build_cost_model(
        supernet,
        "latency",
        input_shape=(3, 8, 8),
        cache_dir=tmp_path,
        warmup=0,
        repeats=1,
        progress=False,
    )
    (table,) = tmp_path.glob("latency-darts-*.json")
    with pytest.raises(
        ConfigError,
        match=r"^cost.table=.* was measured for space darts; valid: a table measured for space nb201$",
    ):
        check_config(
            oneshot.compose(
                "search", ["space=nb201", "budget=latency", "budget.max=1", f"cost.table={table}"]
            )
        )
    with pytest.raises(ConfigError, match=r"^cost.table=.*: no such file"):
        check_config(oneshot.compose("search", [f"cost.table={tmp_path / 'nope.json'}"]))
    check_config(
        oneshot.compose("search", ["space=darts", f"cost.table={table}"])
    )  # its own space passes here


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (
            ["budget=flops", "budget.max=0"],
            "error: budget.max=0 is out of range; valid: a number > 0",
        ),
        (
            ["budget=params", "budget.max=0.001"],
            "error: budget.max=0.001 M params is below the cheapest architecture, ",
        ),
    ],
)
def test_the_app_refuses_a_bad_budget_in_one_line_and_leaves_nothing(overrides, line, tmp_path):
    import os
    import subprocess

    app = Path(sys.executable).parent / "oneshot-search"
    env = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "ONESHOT_TRACEBACK")
    }
    args = [
        "data=digits",
        "retrain.enabled=false",
        "logger.pictures=false",
        *overrides,
        f"run_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [str(app), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    errors = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, (
        proc.stderr[-2000:]
    )
    assert errors[0].startswith(line)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_latency_budget_reports_the_additive_models_error_and_warns_above_10_percent(tmp_path, caplog):
    """report.json's cost.budget holds |table - measured| / measured for the result (the issue's
    additive-model check), the final print says it, and the run warns exactly when it is above
    10%. Whether it is depends on this machine's timings, so both directions are also forced on
    the same real table with chosen measurements."""
    import json
    import logging

    from oneshot.cost import CostModel
    from oneshot.cost.budget import BudgetPenalty
    from oneshot.genotypes import parse
    from oneshot.result_cost import against_budget, cost_lines

    latency = ["budget=latency", "budget.max=1000", "cost.warmup=1", "cost.repeats=5", "cost.calibrate=2",
               "cost.progress=false"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="oneshot"):
        _, report, _, _ = _search(tmp_path, "latency", [*CASES["nb201-order1"], *latency])
    verdict = report["cost"]["budget"]
    assert verdict["metric"] == "latency" and verdict["measured"] == report["cost"]["latency"]["median_ms"]
    assert verdict["additive_error"] == pytest.approx(
        abs(verdict["table"] - verdict["measured"]) / verdict["measured"], rel=1e-12
    )
    assert set(verdict["calibration"]) == {"scale", "median_error_before", "median_error_after"}
    warned = [r.getMessage() for r in caplog.records if "additive model is" in r.getMessage()]
    assert len(warned) == (1 if verdict["additive_error"] > 0.10 else 0)

    (table,) = tmp_path.glob("latency-nb201-*.json")
    cost = CostModel.from_json(json.loads(table.read_text()))
    genotype = parse(report["genotype"])
    predicted = cost.of_genotype(genotype)
    penalty = BudgetPenalty(cost, 1000.0)
    for measured, warns in ((2 * predicted, True), (1.05 * predicted, False)):
        caplog.clear()
        result = {"parameters": 1, "flops": 1, "batch_size": 1,
                  "latency": {"median_ms": measured, "device": "cpu", "threads": 1}}  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="oneshot"):
            out = against_budget(result, penalty, genotype)
        error = abs(predicted - measured) / measured
        assert out["budget"]["additive_error"] == pytest.approx(error, rel=1e-12)
        messages = [r.getMessage() for r in caplog.records if "additive model is" in r.getMessage()]
        assert len(messages) == warns
        if warns:
            assert f"{100 * error:.0f}% off (over 10%)" in messages[0]
        assert f"by the cost table ({100 * error:.0f}% off)" in cost_lines(out)[1]
