"""Zero-cost proxies against closed forms and brute force on tiny networks; their contract
(seeded, the model untouched); the rank-sum ensemble; scoring a space in one pass."""

import csv as _csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oneshot
from oneshot.metrics import (
    PROXIES,
    fisher,
    flops,
    grad_norm,
    grasp,
    jacob_cov,
    loss_proxies,
    naswot,
    params,
    rank_sum,
    score_space,
    snip,
    synflow,
    zen,
)
from oneshot.metrics.ensemble import best_by_rank_sum
from oneshot.metrics.proxies import naswot_kernel, reinit_copy
from oneshot.mixed import MixedOp
from oneshot.prune import _Meter, combined_order, combined_ranks, dense_ranks, nb201_space, prune
from oneshot.spaces import NB201Network
from oneshot.spaces.nb201 import nb201_network
from oneshot.validate import ConfigError, check_values

pytestmark = pytest.mark.usefixtures("one_thread")
RESNET = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"


def linear_model(d=5, c=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d, c).double()


def batch(n=8, d=5, c=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g)


# --- closed forms ---------------------------------------------------------------------------


def test_synflow_of_a_linear_chain_is_depth_times_the_path_sum():
    # R = 1^T |W2| |W1| 1 for all-ones input; sum |W1 * dR/dW1| = sum |W2 * dR/dW2| = R, so
    # synflow = 2R. The BatchNorm between is removed and the ReLU sees only positive values.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3, bias=False))
    a1, a2 = net[0].weight.detach().abs().double(), net[3].weight.detach().abs().double()
    R = float(torch.ones(3, dtype=torch.float64) @ a2 @ a1 @ torch.ones(4, dtype=torch.float64))
    assert synflow(net, torch.randn(7, 4), init=None) == pytest.approx(2 * R, rel=1e-12)


def test_naswot_kernel_counts_agreeing_units_over_every_relu():
    # Identity weights: the ReLU's input is x itself, so the codes are the signs of x.
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    net = nn.Sequential(lin, nn.ReLU(), nn.ReLU())  # the second ReLU sees the same code where x>0
    x = torch.tensor([[1.0, -1, 2, -3], [1, 1, -1, -1], [-1, -1, -1, 2]])
    c1 = (x > 0).double()
    c2 = (torch.relu(x) > 0).double()
    expected = sum(c @ c.T + (1 - c) @ (1 - c).T for c in (c1, c2))
    torch.testing.assert_close(naswot_kernel(net, x), expected)
    assert naswot(net, x, init=None) == pytest.approx(float(np.linalg.slogdet(expected.numpy())[1]))


def test_naswot_counts_one_relu_per_op_as_the_benchmark_network_has():
    # Our cells share a node's ReLU among the ops leaving it; the reference network gives each
    # conv op its own, so K's diagonal (units per sample) counts every op's ReLU. The reference
    # hooks every module whose type name contains "ReLU", ReLUConvBN included (same input as
    # its ReLU): each ReLU-Conv-BN counts twice, the final BN-ReLU once.
    net = nb201_network("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|",
                        C=2, N=1)  # fmt: skip
    x = torch.randn(5, 3, 8, 8)
    stages = [(2, 8), (4, 4), (8, 2)]  # channels, side
    units = sum(6 * c * s * s for c, s in stages)  # six conv ops per cell, one cell per stage
    units += (2 * 64 + 4 * 16) + (4 * 16 + 8 * 4)  # the two residual blocks' ReLUs
    units = 2 * units + 8 * 4  # + the BN-ReLU before pooling
    assert torch.diagonal(naswot_kernel(net, x)).tolist() == [units] * 5


def ce_gradient(model, x, y):
    """dL/dW of the mean cross-entropy of a linear model, written out: (p - onehot)^T x / n."""
    p = torch.softmax(x @ model.weight.T + model.bias, 1)
    return (p - F.one_hot(y, p.shape[1]).double()).T @ x / len(x)


def test_snip_and_grad_norm_of_a_linear_model():
    model, (x, y) = linear_model(), batch()
    g = ce_gradient(model, x, y).detach()
    w = model.weight.detach()
    assert snip(model, x, y, init=None) == pytest.approx(float((w * g).abs().sum()), rel=1e-10)
    assert grad_norm(model, x, y, init=None) == pytest.approx(float(g.norm()), rel=1e-10)


def test_fisher_of_a_linear_model():
    # a = x W^T + b, dL/da = (p - onehot) / n; per output unit 0.5 * mean_n (a * dL/da)^2,
    # repeated over the unit's d weights (the reference's broadcast), summed.
    model, (x, y) = linear_model(), batch()
    a = (x @ model.weight.T + model.bias).detach()
    ga = (torch.softmax(a, 1) - F.one_hot(y, 3).double()) / len(x)
    expected = float((0.5 * (a * ga).pow(2).mean(0)).sum()) * 5
    assert fisher(model, x, y, init=None) == pytest.approx(expected, rel=1e-10)


def test_grasp_of_a_linear_model_is_minus_w_hessian_gradient():
    model, (x, y) = linear_model(), batch()
    w0, b = model.weight.detach().clone(), model.bias.detach()

    def loss(w):
        return F.cross_entropy(x @ w.reshape(3, 5).T + b, y)

    flat = w0.flatten()
    H = torch.func.hessian(loss)(flat)
    g = torch.func.grad(loss)(flat)
    assert grasp(model, x, y, init=None) == pytest.approx(float(-(flat * (H @ g)).sum()), rel=1e-9)


def test_loss_proxies_share_one_pass_and_give_the_single_numbers():
    net, (x, y) = nb201_network(RESNET, C=2, N=1), (torch.randn(6, 3, 8, 8), torch.randint(10, (6,)))
    together = loss_proxies(net, x, y, seed=3)
    alone = {"snip": snip, "grasp": grasp, "fisher": fisher, "grad_norm": grad_norm}
    for name, fn in alone.items():
        assert together[name] == pytest.approx(fn(net, x, y, seed=3), rel=1e-6)


def test_jacob_cov_against_numpy_reference_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: net(v).sum(), row) for row in x])
    corrs = np.corrcoef(jac.numpy())  # zero-cost-nas jacob_cov.py::eval_score
    v = np.linalg.eigvalsh(corrs)
    expected = -np.sum(np.log(v + 1e-5) + 1.0 / (v + 1e-5))
    assert jacob_cov(net, x, init=None) == pytest.approx(expected, rel=1e-9)


def test_jacob_cov_of_a_linear_model_is_rank_one():
    # Every sample has the same input gradient W^T 1: the correlation matrix is all ones,
    # eigenvalues n and n-1 zeros.
    model, (x, _) = linear_model(), batch(n=6)
    k = 1e-5
    expected = -(math.log(6 + k) + 1 / (6 + k) + 5 * (math.log(k) + 1 / k))
    assert jacob_cov(model, x, init=None) == pytest.approx(expected, rel=1e-6)


def test_zen_of_a_linear_model():
    # No pooling and no BN: f(x) - f(x + g x') = -g W x', so zen = log mean_n ||g W x'_n||_1.
    model = linear_model()
    x = torch.zeros(9, 5, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    torch.randn(x.shape, generator=gen, dtype=x.dtype)  # the first batch, x
    x2 = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    expected = math.log(float((1e-2 * x2 @ model.weight.detach().T).abs().sum(1).mean()))
    assert zen(model, x, init=None, seed=4) == pytest.approx(expected, rel=1e-9)


def test_params_and_flops_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    assert params(net) == 3 * 4 * 9 + 4 + 4 * 2 + 2
    assert flops(net, torch.randn(5, 3, 6, 6)) == 4 * 36 * 3 * 9 + 4 * 2
    # A masked supernet counts only the ops its forward runs; arch parameters never count.
    sup = NB201Network(C=2, N=1, image_size=8)
    x = torch.randn(2, 3, 8, 8)
    conv_only = {"weights": {"cell": [(3,)] * 6}}  # nor_conv_3x3 on every edge
    disc = nb201_network("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|", C=2, N=1)  # fmt: skip
    assert flops(sup, x, forward_kwargs=conv_only) == flops(disc, x)
    # Direct count: every weight of the supernet but the alphas and the masked-out ops.
    masked_out = sum(
        p.numel()
        for m in sup.modules() if isinstance(m, MixedOp)
        for i, op in enumerate(m.ops) if i != 3
        for p in op.parameters()
    )  # fmt: skip
    alphas = sum(p.numel() for p in sup.arch_parameters())
    expected = sum(p.numel() for p in sup.parameters()) - alphas - masked_out
    assert params(sup, x, forward_kwargs=conv_only) == expected
    assert params(sup) == sum(p.numel() for p in sup.parameters()) - alphas


# --- the contract: seeded, model untouched ----------------------------------------------------


@pytest.mark.parametrize("name", list(PROXIES))
def test_proxies_are_seeded_and_leave_the_model_alone(name):
    net = NB201Network(C=2, N=1, image_size=8)
    kwargs = {"weights": {"cell": [(1, 2, 3, 4)] * 6}}
    x, y = torch.randn(6, 3, 8, 8), torch.randint(10, (6,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fn = PROXIES[name]
    a = fn(net, x, y, seed=1, forward_kwargs=kwargs)
    assert a == fn(net, x, y, seed=1, forward_kwargs=kwargs) and math.isfinite(a)
    if name not in ("params", "flops"):  # these two are not random
        assert a != fn(net, x, y, seed=2, forward_kwargs=kwargs)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_default_init_is_pytorchs_own_seeded():
    net = nn.Linear(5, 3)
    a, b = reinit_copy(net, "default", 7), reinit_copy(net, "default", 7)
    ref = nn.Linear(5, 3)
    torch.manual_seed(7)
    ref.reset_parameters()  # what building the layer under seed 7 draws
    assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, ref.weight)
    with pytest.raises(ValueError, match="unknown init 'xavier'; valid"):
        reinit_copy(net, "xavier", 0)


def test_loss_proxies_need_targets():
    with pytest.raises(ValueError, match="snip is a loss-based proxy"):
        snip(linear_model(), batch()[0])


# --- ensembles and spaces --------------------------------------------------------------------


def test_rank_sum_by_hand():
    scores = {"naswot": [3.0, 1.0, 2.0, 2.0], "ntk": [10.0, 5.0, float("nan"), 5.0]}
    # naswot (higher better) dense ranks: 2, 0, 1, 1; ntk (lower better, NaN worst): 0, 1, -, 1
    # with NaN below everything: goodness keys -10, -5, -inf, -5 -> ranks 1, 2, 0, 2.
    assert rank_sum(scores) == [3, 2, 1, 3]
    # Tie on the sum: the first metric's better value wins.
    assert best_by_rank_sum(scores) == 0
    with pytest.raises(ValueError, match="unknown metric 'bogus'; valid"):
        rank_sum({"bogus": [1.0]})


def test_score_space_equals_each_proxy_alone_and_does_not_depend_on_workers():
    archs = [RESNET, "|skip_connect~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|none~0|nor_conv_3x3~1|skip_connect~2|"]
    space = "nb201"
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    metrics = ["naswot", "snip", "fisher", "synflow", "params"]
    res = score_space(space, archs, x, metrics, y, seed=2, progress=False, size={"C": 2, "N": 1})
    for i, a in enumerate(archs):
        net = nb201_network(a, C=2, N=1)
        for m in metrics:
            assert res.scores[m][i] == pytest.approx(PROXIES[m](net, x, y, seed=2), rel=1e-6)
    assert len(res.seconds) == 2


@pytest.mark.slow
def test_score_space_in_worker_processes_gives_the_same_numbers():
    archs = [RESNET] * 3
    x, y = torch.randn(8, 3, 8, 8), torch.randint(10, (8,))
    kw = {"seed": 1, "progress": False, "size": {"C": 2, "N": 1}, "chunk": 1}
    here = score_space("nb201", archs, x, ["synflow", "grad_norm"], y, **kw)
    there = score_space("nb201", archs, x, ["synflow", "grad_norm"], y, workers=2, **kw)
    assert here.scores == there.scores


# --- the prune by any set of metrics (warmstart=proxies, strategy=tenas metrics=...) ---------



def test_combined_ranks_of_ntk_and_regions_is_tenas_combined_order():
    cases = [
        ([0.5, 0.1, 0.5, -0.2], [0.0, -0.1, 0.2, 0.0]),
        ([0.0, 0.0, 0.0], [0.3, 0.1, 0.3]),
        ([1.0, -float("inf"), 0.25, 0.25, 0.1], [0.1, 0.1, 0.0, 0.2, -0.3]),
    ]
    for dk, dr in cases:
        order, nr, rr = combined_order(dk, dr)
        order2, ranks = combined_ranks({"ntk": dk, "regions": dr}, ["ntk", "regions"])
        assert (order, nr, rr) == (order2, ranks["ntk"], ranks["regions"])


def test_combined_ranks_of_any_metrics_by_hand():
    changes = {"synflow": [0.3, 0.1, 0.2], "naswot": [0.0, 0.5, 0.1]}
    # Both higher-is-better: the op whose removal costs least goes first (ascending ranks).
    order, ranks = combined_ranks(changes, ["synflow", "naswot"])
    assert ranks == {"synflow": [2, 0, 1], "naswot": [0, 2, 1]}
    # Sums 2, 2, 2: all tied, so synflow's ascending order decides: 1, 2, 0.
    assert order == [1, 2, 0]


def digits_images(n=120):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float32)
    return ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1), torch.tensor(d.target[:n])


def test_generic_meter_equals_tenas_meter_on_ntk_and_regions():
    x, _ = digits_images()
    space = nb201_space()
    batch, crops = x[:8], x[:100, :1, :3, :3]
    current = {"cell": [(1, 2, 3, 4)] * 6}
    variants = [{"cell": [(2, 3, 4)] + [(1, 2, 3, 4)] * 5}, {"cell": [(1, 2, 3, 4)] * 5 + [(1, 3)]}]
    meter = _Meter(space, batch, crops, 1, 0, 3, "loop", False)
    fast = meter(current, variants, 0, "r")
    generic = meter._measure(current, variants, 0, "r")
    assert fast == generic


def test_prune_by_proxies_ranks_by_the_sum_of_recorded_ranks():
    x, y = digits_images()
    metrics = ["naswot", "synflow", "snip", "regions"]
    res = prune("nb201", x, 3, num_inits=1, ntk_batch=8, n_crops=100, metrics=metrics, targets=y)
    assert len(res.extra) == len(res.history) and res.extra[0]["synflow_rank"] >= 0
    assert all(len(ops) == 3 for ops in res.survivors["cell"])
    rows = [(r, x) for r, x in zip(res.history, res.extra) if r.round == 0]
    changes = {m: [x[f"{m}_change"] for _, x in rows] for m in ("naswot", "synflow", "snip")}
    changes |= {"regions": [r.regions_change for r, _ in rows]}
    assert all(r.ntk_rank == -1 and math.isnan(r.ntk) for r, _ in rows)  # not measured
    for m in metrics:  # every recorded rank is the dense rank of the recorded changes
        want = dense_ranks(changes[m], descending=m == "ntk")[0]
        got = [r.ntk_rank for r, _ in rows] if m == "ntk" else [r.regions_rank for r, _ in rows] if m == "regions" else [x[f"{m}_rank"] for _, x in rows]  # fmt: skip
        assert got == want, m
    for edge in {r.edge for r, _ in rows}:  # on each edge the smallest rank sum was removed
        here = [(r.rank, r.pruned) for r, _ in rows if r.edge == edge]
        assert [p for _, p in here].count(True) == 1
        assert min(here)[0] == next(rank for rank, p in here if p)


def test_prune_with_the_default_metrics_is_tenas():
    x, _ = digits_images()
    kw = {"num_inits": 1, "ntk_batch": 8, "n_crops": 100, "seed": 2}
    assert prune("nb201", x, 3, **kw).history == prune("nb201", x, 3, metrics=["ntk", "regions"], **kw).history


# --- through the real app --------------------------------------------------------------------



APP = ["+trainer.fast_dev_run=true", "data=digits", "data.batch_size=8", "size=cpu", "retrain.enabled=false"]
TINY_PRUNE = ["num_inits=1", "n_crops=100", "ntk_batch=8", "images=200", "progress=false"]


@pytest.mark.slow
def test_warmstart_by_a_proxy_ensemble_through_the_app(tmp_path):
    cfg = oneshot.compose("search", [
        *APP, "warmstart=proxies", "warmstart.keep=2", "warmstart.metrics=[naswot,synflow,snip,regions]",
        *(f"warmstart.{o}" for o in TINY_PRUNE), f"run_dir={tmp_path}",
    ])  # fmt: skip
    report = oneshot.search(cfg)
    warm = report["warmstart"]
    assert warm["metrics"] == ["naswot", "synflow", "snip", "regions"]
    assert all(len(ops) == 2 for ops in warm["survivors"]["cell"])
    with (tmp_path / "warmstart.csv").open() as f:
        rows = list(_csv.DictReader(f))
    assert {"naswot", "synflow_change", "snip_rank"} <= set(rows[0])
    for row in rows:  # the rank column is the sum of the measured metrics' ranks
        assert int(row["rank"]) == sum(int(row[f"{m}_rank"]) for m in ("naswot", "synflow", "snip")) + int(row["regions_rank"])  # fmt: skip
    assert json.loads((tmp_path / "warmstart.json").read_text())["options"]["metrics"][0] == "naswot"


@pytest.mark.slow
def test_standalone_training_free_search_with_any_metrics(tmp_path):
    cfg = oneshot.compose("search", [
        *APP, "strategy=tenas", "strategy.metrics=[synflow,jacob_cov]",
        *(f"strategy.{o}" for o in TINY_PRUNE), f"run_dir={tmp_path}",
    ])  # fmt: skip
    report = oneshot.search(cfg)
    saved = json.loads((tmp_path / "tenas.json").read_text())
    assert saved["metrics"] == ["synflow", "jacob_cov"] and report["genotype"] == saved["genotype"]


@pytest.mark.parametrize("bad", ["[bogus]", "[]", "[naswot,naswot]"])
def test_bad_metric_lists_are_one_clear_error(bad):
    cfg = oneshot.compose("search", ["warmstart=proxies", f"warmstart.metrics={bad}"])
    with pytest.raises(ConfigError, match=r"warmstart.metrics=.* is out of range; valid: a non-empty list of distinct names from naswot"):  # fmt: skip
        check_values(cfg)
