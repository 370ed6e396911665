"""Training-free metrics against closed forms, against each other, and on degenerate inputs."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from oneshot.metrics import (
    DartsMetricNet,
    NB201SingleCell,
    condition_number,
    count_unique_rows,
    linear_regions,
    nb201_ntk_network,
    ntk_condition_number,
    ntk_gram,
    random_crops,
    tenas_score_nb201,
)
from oneshot.metrics.ntk import ntk_parameters
from oneshot.spaces import NB201Network

# Thousands of tiny ops: one thread is as fast, and far faster on a shared, busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """Real 8x8 digits, normalised, three identical channels."""
    x = torch.tensor(load_digits().images[:120], dtype=torch.float32)
    return ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1)


@pytest.mark.parametrize("method", ["loop", "vmap"])
def test_ntk_of_a_linear_model_is_the_closed_form(method):
    # f_i = sum_c w_c . x_i, so the gradient w.r.t. W is x_i in every row: NTK = m X X^T.
    X, m = torch.randn(6, 10, dtype=torch.float64), 3
    model = nn.Linear(10, m, bias=False).double()
    expected = m * X @ X.T
    torch.testing.assert_close(ntk_gram(model, X, method=method), expected)
    eig = np.linalg.eigvalsh(expected.numpy())
    # The closed form does not depend on the weights: any re-initialisation gives it.
    assert ntk_condition_number(model, X, num_inits=2, method=method) == pytest.approx(
        eig[-1] / eig[0], rel=1e-9
    )


def small_nets():
    masks = {"cell": [(1, 2, 3, 4)] * 6}
    darts = {
        t: [("skip_connect", "sep_conv_3x3", "max_pool_3x3")] * 14 for t in ("normal", "reduce")
    }
    return {
        "nb201-supernet": (NB201Network(C=2, N=1, image_size=8), {"weights": masks}),
        "nb201-discrete": (nb201_ntk_network({"cell": [("nor_conv_3x3",)] * 6}, C=2), {}),
        "darts-metric-net": (
            DartsMetricNet(darts, C=2),
            {"weights": {t: [(0, 1, 2)] * 14 for t in darts}},
        ),
    }


@pytest.mark.parametrize("name", list(small_nets()))
def test_vectorised_ntk_equals_the_per_sample_loop(name, digits):
    model, kwargs = small_nets()[name]
    loop = ntk_gram(model, digits[:6], kwargs, method="loop")
    vmap = ntk_gram(model, digits[:6], kwargs, method="vmap", chunk_size=4)
    assert torch.linalg.norm(vmap - loop) / torch.linalg.norm(loop) < 1e-6
    # The batched forward couples samples through BN: the Gram is not block-separable.
    assert loop.shape == (6, 6) and torch.isfinite(loop).all()


def test_ntk_parameters_are_weights_only():
    net = NB201Network(C=2, N=1)  # has alphas
    names = [n for n, _ in ntk_parameters(net)]
    assert (
        names and all(n.endswith("weight") for n in names) and not any("alphas" in n for n in names)
    )
    with_bias = [n for n, _ in ntk_parameters(net, include_biases=True)]
    assert "classifier.bias" in with_bias and "classifier.bias" not in names


@pytest.mark.parametrize(
    "gram",
    [
        torch.full((3, 3), float("nan")),
        torch.zeros(3, 3),
        torch.tensor([[1.0, 2.0], [2.0, 1.0]]),  # eigenvalues -1, 3
        torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]),
    ],
)
def test_condition_number_of_degenerate_kernels_is_inf(gram):
    assert condition_number(gram) == math.inf


def test_ntk_of_a_nan_network_is_inf_not_an_error():
    class NaNNet(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    assert ntk_condition_number(NaNNet(4, 2), torch.randn(3, 4)) == math.inf


def test_metrics_are_seeded_and_leave_the_model_alone(digits):
    net = nb201_ntk_network({"cell": [("nor_conv_3x3",)] * 6}, C=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    a = ntk_condition_number(net, digits[:6], seed=1)
    assert (
        a
        == ntk_condition_number(net, digits[:6], seed=1)
        != ntk_condition_number(net, digits[:6], seed=2)
    )
    crops = random_crops(digits, 200)
    thin = NB201SingleCell()
    assert linear_regions(thin, crops, num_inits=2, seed=3) == linear_regions(
        thin, crops, num_inits=2, seed=3
    )
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("inplace", [False, True])
def test_regions_of_a_1d_relu_layer_are_its_breakpoint_intervals(inplace):
    hidden, grid = 15, torch.linspace(-3, 3, 4001)[:, None]
    model = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(inplace=inplace))
    w, b = model[0].weight[:, 0].detach(), model[0].bias.detach()
    breaks = torch.sort(-b / w).values  # unit i switches at x = -b_i / w_i
    # Each grid point falls into one interval between sorted breakpoints; count occupied ones.
    expected = len(torch.unique(torch.searchsorted(breaks, grid[:, 0])))
    assert linear_regions(model, grid, init=None, batch_size=500) == expected
    assert 1 < expected <= hidden + 1


def test_count_unique_rows():
    rows = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    assert count_unique_rows(rows) == 3
    assert count_unique_rows(torch.zeros(5, 0, dtype=torch.bool)) == 1


def test_random_crops_are_patches_of_one_channel(digits):
    crops = random_crops(digits, 50, size=3, seed=0)
    assert crops.shape == (50, 1, 3, 3) and torch.equal(
        crops, random_crops(digits, 50, size=3, seed=0)
    )
    patches = digits.unfold(2, 3, 1).unfold(3, 3, 1).reshape(-1, 3, 3)
    assert all((patches == c[0]).flatten(1).all(1).any() for c in crops)


def test_thin_networks_take_one_channel_crops(digits):
    crops = random_crops(digits, 64)
    darts = {t: [("skip_connect", "sep_conv_3x3")] * 14 for t in ("normal", "reduce")}
    thin = DartsMetricNet(darts, in_channels=1, stem=False)
    assert thin(crops, {t: [(0, 1)] * 14 for t in darts}).shape == (64, 10)
    assert NB201SingleCell()(crops, {"cell": [(1, 2, 3, 4)] * 6}).shape == (64, 10)


def test_tenas_score_ranks_an_empty_cell_last():
    images = torch.randn(40, 3, 16, 16)
    kw = {"ntk_batch": 8, "n_crops": 400, "num_inits": 1}
    empty = tenas_score_nb201("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", images, **kw)
    convs = tenas_score_nb201(
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
        images,
        **kw,
    )
    assert empty == {"ntk": math.inf, "regions": 1.0}  # the output ignores the weights: one region
    assert math.isfinite(convs["ntk"]) and convs["regions"] > 10 * empty["regions"]
