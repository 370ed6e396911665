"""Issue 17 (A): parameters and FLOPs of every candidate in its place add up to the fixed
network's own counts (``sum(p.numel())``, ``FlopCounterMode``) for many random architectures of
NB201, the DARTS space and model spaces; the latency table's cache and foreign tables."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oneshot.arch import Arch
from oneshot.cost import MEASUREMENTS, build_cost_model, network_of
from oneshot.genotypes import random_genotype
from oneshot.latency import measure_latency
from oneshot.spaces import DartsSupernet, ModelSpace, NB201Network

sys.path.insert(0, str(Path(__file__).parent))
from user_models_example import TinyNet  # noqa: E402

MOBILENET = {"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", "width_mult": 0.25, "first_channels": 16,
             "stages": [[16, 2, 2], [24, 2, 2]], "last_channels": 32}  # fmt: skip


def random_arch(supernet, rng):
    return Arch({label: c.value_of(rng.choice(c.names)) for label, c in supernet.choices.items()})


# (supernet, random architecture, input shape, deployed sizes)
SPACES = {
    "nb201": (lambda: NB201Network(C=4, N=1), random_genotype, (3, 16, 16), {"C": 8, "N": 2}),
    "darts": (lambda: DartsSupernet(C=4, layers=3, steps=2, multiplier=2), random_genotype, (3, 16, 16), {"C": 6, "layers": 4}),
    "model": (lambda: ModelSpace(TinyNet(width=4), in_channels=3, image_size=12), random_arch, (3, 12, 12), {}),
    "mobilenet": (lambda: ModelSpace(MOBILENET, num_classes=10, in_channels=3, image_size=16), random_arch,
                  (3, 16, 16), {}),
    # PC-DARTS builds mobilenet's channel-keeping candidates at C/2: costs are of the C-wide network
    "mobilenet-pc": (lambda: ModelSpace(MOBILENET, num_classes=10, in_channels=3, image_size=16, partial_channels=2),
                     random_arch, (3, 16, 16), {}),
}  # fmt: skip


def flops(net, shape):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.randn(1, *shape))
    return counter.get_total_flops()


@pytest.mark.parametrize("space", list(SPACES))
def test_params_and_flops_of_the_fixed_network_equal_the_additive_cost(space):
    make, random_genotype, shape, sizes = SPACES[space]
    supernet = make()
    params = build_cost_model(supernet, "params", input_shape=shape, network=sizes)
    flop = build_cost_model(supernet, "flops", input_shape=shape, network=sizes)
    assert params.unit == "M params" and flop.unit == "MFLOPs"
    rng = random.Random(0)
    seen = set()
    for _ in range(12):
        genotype = random_genotype(supernet, rng)
        seen.add(str(genotype))
        net = network_of(supernet, genotype, params)
        assert round(params.of_genotype(genotype) * 1e6) == sum(p.numel() for p in net.parameters())
        assert flop.of_genotype(genotype) * 1e6 == pytest.approx(
            flops(net, shape), rel=1e-12, abs=1e-6
        )
    assert len(seen) > 6  # really different architectures
    assert params.cheapest() <= min(params.of_genotype(g) for g in map(_parse(space), seen))


def _parse(space):
    from oneshot.arch import parse_arch
    from oneshot.genotypes import parse

    return parse_arch if space in ("model", "mobilenet", "mobilenet-pc") else parse


def test_darts_costs_are_of_the_evaluation_network_at_the_deployed_sizes():
    """The searched supernet is C=4; the budget is about the retrained network (C=6, 4 cells)."""
    supernet = DartsSupernet(C=4, layers=3, steps=2, multiplier=2)
    cost = build_cost_model(
        supernet, "params", input_shape=(3, 16, 16), network={"C": 6, "layers": 4}
    )
    genotype = random_genotype(supernet, random.Random(1))
    from oneshot.spaces.darts import DartsNetwork

    net = DartsNetwork(
        genotype, C=6, layers=4, num_classes=10, in_channels=3, image_size=16, auxiliary=True
    )
    without_aux = sum(
        p.numel() for n, p in net.named_parameters() if not n.startswith("auxiliary_head")
    )
    assert round(cost.of_genotype(genotype) * 1e6) == without_aux


def test_expected_cost_at_one_hot_probabilities_is_the_architecture_cost():
    supernet = NB201Network(C=4, N=1)
    cost = build_cost_model(supernet, "flops", input_shape=(3, 16, 16))
    genotype = random_genotype(supernet, random.Random(3))
    idx = supernet.weights_for(genotype)["cell"]
    probs = {"cell": torch.nn.functional.one_hot(torch.tensor(idx), 5).double().requires_grad_()}
    expected = cost.expected(probs)
    assert float(expected.detach()) == pytest.approx(cost.of_genotype(genotype), rel=1e-12)
    expected.backward()
    assert torch.equal(probs["cell"].grad, cost.per_choice["cell"])  # d E / d p = the cost table


def test_darts_expected_cost_averages_two_of_n_inputs_without_none():
    """Uniform op probabilities: each node's expected cost is the mean over its input pairs of
    the mean non-none op cost, i.e. brute force over (pair, op, op) equals the closed form."""
    import itertools

    supernet = DartsSupernet(C=4, layers=3, steps=2, multiplier=2)
    cost = build_cost_model(supernet, "params", input_shape=(3, 16, 16))
    probs = {t: torch.full((5, 8), 1 / 8, dtype=torch.float64) for t in ("normal", "reduce")}
    brute = cost.fixed
    for t in ("normal", "reduce"):
        c = cost.per_choice[t]
        for first, n in cost.darts_nodes():
            pairs = list(itertools.combinations(range(n), 2))
            brute += sum(
                c[first + i, 1:].mean() + c[first + j, 1:].mean() for i, j in pairs
            ).item() / len(pairs)
    assert float(cost.expected(probs)) == pytest.approx(brute, rel=1e-12)


def test_latency_table_is_cached_and_a_second_build_measures_nothing(tmp_path):
    supernet = NB201Network(
        C=4, N=1, candidates={"cell": [("none", "skip_connect", "nor_conv_3x3")] * 6}
    )
    kwargs = dict(
        input_shape=(3, 8, 8), cache_dir=tmp_path, warmup=1, repeats=3, progress=False, threads=1
    )
    before = MEASUREMENTS["count"]
    first = build_cost_model(supernet, "latency", **kwargs)
    measured = MEASUREMENTS["count"] - before
    assert (
        first.meta["cache"] == "miss" and measured == 10
    )  # 3 distinct candidates x 3 stages (6 edges each, alike) + the fixed part
    files = list(tmp_path.glob("latency-nb201-*.json"))
    assert (
        len(files) == 1
        and json.loads(files[0].read_text())["meta"]["device_name"] == first.meta["device_name"]
    )
    second = build_cost_model(supernet, "latency", **kwargs)
    assert second.meta["cache"] == "hit" and MEASUREMENTS["count"] - before == measured
    assert (
        torch.equal(second.per_choice["cell"], first.per_choice["cell"])
        and second.fixed == first.fixed
    )
    other = build_cost_model(
        supernet, "latency", **{**kwargs, "batch_size": 2}
    )  # another key: measured
    assert other.meta["cache"] == "miss" and MEASUREMENTS["count"] - before == 2 * measured
    assert len(list(tmp_path.glob("latency-nb201-*.json"))) == 2


def test_a_table_of_another_space_or_shape_is_refused(tmp_path):
    kwargs = dict(cache_dir=tmp_path, warmup=1, repeats=2, progress=False, threads=1)
    nb201 = NB201Network(C=4, N=1, candidates={"cell": [("none", "skip_connect")] * 6})
    build_cost_model(nb201, "latency", input_shape=(3, 8, 8), **kwargs)
    (table,) = tmp_path.glob("latency-nb201-*.json")
    loaded = build_cost_model(nb201, "latency", input_shape=(3, 8, 8), table=table, **kwargs)
    assert (
        loaded.meta["cache"] == "table" and loaded.fixed == json.loads(table.read_text())["fixed"]
    )
    darts = DartsSupernet(C=4, layers=3, steps=1, multiplier=1)
    with pytest.raises(
        ValueError, match=r"^cost.table=.* was measured for another space \(space=nb201\)"
    ):
        build_cost_model(darts, "latency", input_shape=(3, 8, 8), table=table, **kwargs)
    with pytest.raises(ValueError, match=r"another space structure and sizes"):
        build_cost_model(nb201, "latency", input_shape=(3, 16, 16), table=table, **kwargs)
    with pytest.raises(ValueError, match=r"another batch size"):
        build_cost_model(
            nb201, "latency", input_shape=(3, 8, 8), table=table, **{**kwargs, "batch_size": 4}
        )
    with pytest.raises(ValueError, match=r"not a oneshot latency table"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        build_cost_model(nb201, "latency", input_shape=(3, 8, 8), table=bad, **kwargs)


def test_measure_latency_restores_threads_and_reports_quantiles():
    n = torch.get_num_threads()
    calls = []
    out = measure_latency(lambda x: calls.append(torch.get_num_threads()) or x + 1, (torch.ones(3),),
                          warmup=2, repeats=5, threads=2)  # fmt: skip
    assert calls == [2] * 7 and torch.get_num_threads() == n
    assert out["repeats"] == 5 and out["threads"] == 2 and out["device"] == "cpu"
    assert out["p10_ms"] <= out["median_ms"] <= out["p90_ms"]
    with pytest.raises(RuntimeError):
        measure_latency(lambda: (_ for _ in ()).throw(RuntimeError("boom")), (), threads=2)
    assert torch.get_num_threads() == n


def test_a_table_measured_by_python_m_oneshot_cost_is_what_a_search_loads(tmp_path, capsys):
    """Measure on the target device (``python -m oneshot.cost``), search elsewhere with ``cost.table=``."""
    from oneshot.lightning_modules.pipeline import build_supernet

    import oneshot
    from oneshot.cost.__main__ import main
    from oneshot.cost.budget import cost_model_from_cfg
    from oneshot.data import dataset_info

    overrides = [
        "space=nb201",
        "size=cpu",
        "data=digits",
        "cost.repeats=2",
        "cost.warmup=0",
        "cost.progress=false",
    ]
    summary = main([*overrides, f"cost.cache_dir={tmp_path}"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    measured = json.loads(Path(summary["table"]).read_text())
    cfg = oneshot.compose(
        "search",
        [*overrides, f"cost.table={summary['table']}", f"cost.cache_dir={tmp_path / 'other'}"],
    )
    info = dataset_info("digits")
    before = MEASUREMENTS["count"]
    loaded = cost_model_from_cfg(cfg, build_supernet(cfg, info), info, metric="latency")
    assert MEASUREMENTS["count"] == before and loaded.meta["cache"] == "table"
    assert (
        loaded.fixed == measured["fixed"]
        and loaded.per_choice["cell"].tolist() == measured["per_choice"]["cell"]
    )
    assert not (tmp_path / "other").exists()


def test_calibration_scales_the_table_to_the_whole_networks_it_timed(tmp_path):
    """``calibrate=K``: the table times the median measured/predicted ratio of K whole networks,
    so it predicts those networks with median ratio 1 (the recorded measurements are the check)."""
    from statistics import median

    from oneshot.genotypes import parse

    supernet = NB201Network(C=4, N=1, candidates={"cell": [("skip_connect", "nor_conv_3x3")] * 6})
    kwargs = dict(
        input_shape=(3, 8, 8), cache_dir=tmp_path, warmup=1, repeats=3, progress=False, threads=1
    )
    plain = build_cost_model(supernet, "latency", **kwargs)
    cal = build_cost_model(supernet, "latency", calibrate=3, **kwargs)
    assert plain.meta["cache"] == "miss" and cal.meta["cache"] == "miss"  # another cache key
    c = cal.meta["calibration"]
    assert len(c["archs"]) == len(c["measured_ms"]) == 3
    ratios = [m / cal.of_genotype(parse(a)) for a, m in zip(c["archs"], c["measured_ms"])]
    assert median(ratios) == pytest.approx(1.0, rel=1e-9)
    # the fixed part and every choice scaled alike (the uncalibrated timings are re-measured, so
    # compare structure, not values): one scale, recorded
    assert c["scale"] > 0 and {"median_error_before", "median_error_after"} <= c.keys()
    assert build_cost_model(supernet, "latency", calibrate=3, **kwargs).meta["cache"] == "hit"
