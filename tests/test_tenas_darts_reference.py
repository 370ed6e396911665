"""TE-NAS' DARTS-space metric networks against a reference-equivalent computation.

Below is an independent re-implementation of what VITA-Group/TENAS measures in the DARTS space
(``prune_tenas.py`` with ``search_space_name='darts'``): ``NASNetworkDARTS(C=1, N=1, depth=2,
stem_multiplier=1, affine=True)`` built from ``lib/models/cell_operations.py``'s ops in its
``DARTS_SPACE`` order, pruned ops masked by ``-INF`` logits (``softmax`` weights, an op runs only
when its weight exceeds 0.01, an edge with every op masked adds 0), kappa as
``lib/procedures/ntk.py::get_ntk_n`` (one train-mode batched forward, one backward per sample,
gradients of every parameter whose name contains ``weight``) and the regions as
``lib/procedures/linear_region_counter.py`` (sign patterns of every ReLU on 4-D inputs, batches
of 1,000, distinct patterns by its Hamming-matrix formula). The same weights are copied into
oneshot's networks (``oneshot.prune.darts_space``, the ones the prune measures) and both must
give the same kappa and the same count, for several masks.

Run as a script (``python tests/test_tenas_darts_reference.py [images.npz]``) to print the table.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from oneshot.metrics import random_crops, sample_images
from oneshot.metrics.ntk import condition_number, ntk_gram
from oneshot.metrics.regions import activation_patterns, count_unique_rows
from oneshot.ops import DARTS_PRIMITIVES
from oneshot.prune import average_masked_ops, darts_space

INF = 1000  # the reference's mark of a pruned op
REF_SPACE = ["none", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
             "avg_pool_3x3", "max_pool_3x3"]  # fmt: skip
N_EDGES = 14


# ---- the reference's ops (cell_operations.py), affine BN, track_running_stats=True ----------
def relu_conv_bn(C_in, C_out, k, stride, pad, dil):
    return nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C_in, C_out, k, stride, pad, dil, bias=False),
                         nn.BatchNorm2d(C_out, affine=True))  # fmt: skip


def sep_conv(C_in, C_out, k, stride, pad, dil):  # the reference's ``SepConv``: DARTS' dil conv
    return nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(C_in, C_in, k, stride, pad, dil, groups=C_in, bias=False),
                         nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out, affine=True))  # fmt: skip


class DualSepConv(nn.Module):
    def __init__(self, C_in, C_out, k, stride, pad, dil):
        super().__init__()
        self.op_a = sep_conv(C_in, C_in, k, stride, pad, dil)
        self.op_b = sep_conv(C_in, C_out, k, 1, pad, dil)

    def forward(self, x):
        return self.op_b(self.op_a(x))


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.convs = nn.ModuleList(
            nn.Conv2d(C_in, c, 1, stride=2, bias=False) for c in (C_out // 2, C_out - C_out // 2)
        )
        self.pad = nn.ConstantPad2d((0, 1, 0, 1), 0)
        self.bn = nn.BatchNorm2d(C_out, affine=True)

    def forward(self, x):
        x = self.relu(x)
        y = self.pad(x)
        return self.bn(torch.cat([self.convs[0](x), self.convs[1](y[:, :, 1:, 1:])], dim=1))


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


def make_ref_op(name, C, stride):
    return {
        "none": lambda: Zero(stride),
        "skip_connect": lambda: nn.Identity() if stride == 1 else FactorizedReduce(C, C),
        "sep_conv_3x3": lambda: DualSepConv(C, C, 3, stride, 1, 1),
        "sep_conv_5x5": lambda: DualSepConv(C, C, 5, stride, 2, 1),
        "dil_conv_3x3": lambda: sep_conv(C, C, 3, stride, 2, 2),
        "dil_conv_5x5": lambda: sep_conv(C, C, 5, stride, 4, 2),
        # POOLING with C_in == C_out: the bare pool, no BN after it
        "avg_pool_3x3": lambda: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
        "max_pool_3x3": lambda: nn.MaxPool2d(3, stride=stride, padding=1),
    }[name]()


class RefMixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(make_ref_op(name, C, stride) for name in REF_SPACE)

    def forward_darts(self, x, weights):
        return sum(w * op(x) if w > 0.01 else 0 for w, op in zip(weights, self._ops))


class RefCell(nn.Module):  # NASNetSearchCell
    def __init__(self, steps, multiplier, C_pp, C_p, C, reduction):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.preprocess0 = relu_conv_bn(C_pp, C, 1, 1, 0, 1)  # the previous cell never reduces here
        self.preprocess1 = relu_conv_bn(C_p, C, 1, 1, 0, 1)
        self.edges = nn.ModuleDict()
        for i in range(steps):
            for j in range(2 + i):
                self.edges[f"{i}<-{j}"] = RefMixedOp(C, 2 if reduction and j < 2 else 1)
        self.edge2index = {key: k for k, key in enumerate(sorted(self.edges))}

    def forward_darts(self, s0, s1, weightss, alphass):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            clist = []
            for j, h in enumerate(states):
                k = self.edge2index[f"{i}<-{j}"]
                if sum(alphass[k]) <= -INF * len(alphass[k]):
                    clist.append(0)  # every op of this edge is masked
                else:
                    clist.append(self.edges[f"{i}<-{j}"].forward_darts(h, weightss[k]))
            states.append(sum(clist))
        return torch.cat(states[-self.multiplier :], dim=1)


class RefNetwork(
    nn.Module
):  # NASNetworkDARTS(C, N=1, steps=4, multiplier=4, stem_multiplier=1, depth=2)
    def __init__(self, C=1, num_classes=10, use_stem=True, in_channels=3, steps=4, multiplier=4):
        super().__init__()
        self.use_stem = use_stem
        self.stem = nn.Sequential(nn.Conv2d(in_channels if use_stem else min(3, C), C, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C))  # fmt: skip
        self.cells = nn.ModuleList([RefCell(steps, multiplier, C, C, C, False),
                                    RefCell(steps, multiplier, C, multiplier * C, 2 * C, True)])  # fmt: skip
        self.lastact = nn.Sequential(nn.BatchNorm2d(multiplier * 2 * C), nn.ReLU(inplace=True))
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(multiplier * 2 * C, num_classes)
        self.arch_normal_parameters = nn.Parameter(torch.zeros(N_EDGES, len(REF_SPACE)))
        self.arch_reduce_parameters = nn.Parameter(torch.zeros(N_EDGES, len(REF_SPACE)))

    def forward(self, inputs):
        normal_w = nn.functional.softmax(self.arch_normal_parameters, dim=1)
        reduce_w = nn.functional.softmax(self.arch_reduce_parameters, dim=1)
        normal_a, reduce_a = (
            self.arch_normal_parameters.detach(),
            self.arch_reduce_parameters.detach(),
        )
        s0 = s1 = self.stem(inputs) if self.use_stem else inputs
        for cell in self.cells:
            ww, aa = (reduce_w, reduce_a) if cell.reduction else (normal_w, normal_a)
            s0, s1 = s1, cell.forward_darts(s0, s1, ww, aa)
        out = self.global_pooling(self.lastact(s1)).view(s1.size(0), -1)
        return out, self.classifier(out)


def ref_init(model, mode, seed):  # prune_tenas.py::kaiming_normal_fan{in,out}_init
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.constant_(m.bias, 0.0)


def set_masks(net, masks):
    """``masks``: {"normal"/"reduce": [tuple of surviving op names, or () for no op] per edge}."""
    with torch.no_grad():
        for t, alpha in (
            ("normal", net.arch_normal_parameters),
            ("reduce", net.arch_reduce_parameters),
        ):
            alpha.fill_(-INF)
            for e, ops in enumerate(masks[t]):
                for op in ops:
                    alpha[e, REF_SPACE.index(op)] = 0.0


def ref_kappa(net, inputs):
    """get_ntk_n(num_batch=1, train_mode=True); the Gram and its eigenvalues in float64 here
    (the reference's float32 ``symeig`` only adds round-off)."""
    net.train()
    net.zero_grad()
    logit = net(inputs)[1]
    grads = []
    for i in range(len(inputs)):
        logit[i : i + 1].backward(torch.ones_like(logit[i : i + 1]), retain_graph=True)
        grads.append(torch.cat([W.grad.view(-1).detach() for name, W in net.named_parameters()
                                if "weight" in name and W.grad is not None]))  # fmt: skip
        net.zero_grad()
    grads = torch.stack(grads).double()
    eig = torch.linalg.eigvalsh(torch.einsum("nc,mc->nm", grads, grads))
    return (eig[-1] / eig[0]).item()


@torch.no_grad()
def ref_regions(net, crops):
    """Linear_Region_Collector: forward 1,000 crops at a time in train mode, record sign(ReLU
    output) of every ReLU on 4-D input, count distinct rows by the Hamming-matrix formula."""
    net.train()
    feats = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o.detach()) if i[0].dim() == 4 else None)
             for m in net.modules() if isinstance(m, nn.ReLU)]  # fmt: skip
    rows = []
    for chunk in crops.split(1000):
        feats.clear()
        net(chunk)
        rows.append(torch.sign(torch.cat([f.view(len(chunk), -1) for f in feats], 1)))
    for h in hooks:
        h.remove()
    a = torch.cat(rows).double()  # exact in float64 (the reference: half precision)
    res = a @ (1 - a).T
    res = 1 - torch.sign(res + res.T)
    return round((1.0 / res.sum(1)).sum().item())


def copy_weights(ref, ours):
    """Same weights, module by module: the reference's parameters (without its alphas, and the
    thin copy's unused stem) in registration order onto ours."""
    src = [
        p
        for n, p in ref.named_parameters()
        if "arch_" not in n and not (n.startswith("stem") and not ref.use_stem)
    ]
    dst = list(ours.parameters())
    assert [p.shape for p in src] == [p.shape for p in dst]
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.copy_(s)


def our_masks(masks):
    """The prune's per-edge entries for the same masks: op indices in the metric net's
    candidates (the reference's order), ``None`` for a removed edge."""
    cands = darts_space().candidates
    return {t: [tuple(cands[t][e].index(op) for op in ops) or None for e, ops in enumerate(masks[t])]
            for t in ("normal", "reduce")}  # fmt: skip


def example_masks() -> dict[str, dict]:
    """Four masks: the first round (every op but none), a seeded random subset per edge, one op
    per edge on two inputs per node (a finished prune), and pools and skips only."""
    live = tuple(op for op in REF_SPACE if op != "none")
    g = torch.Generator().manual_seed(0)
    rand = {t: [tuple(op for op in live if torch.rand(1, generator=g) < 0.5) or ("sep_conv_3x3",)
                for _ in range(N_EDGES)] for t in ("normal", "reduce")}  # fmt: skip
    kept = [0, 1, 2, 3, 5, 7, 9, 13]  # two inputs per node
    single = {t: [(live[(3 * e + k) % 7],) if e in kept else () for e in range(N_EDGES)]
              for k, t in enumerate(("normal", "reduce"))}  # fmt: skip
    pools = ("skip_connect", "avg_pool_3x3", "max_pool_3x3")
    return {"all ops": {t: [live] * N_EDGES for t in ("normal", "reduce")}, "random subset": rand,
            "one op, two inputs": single, "pools + skip": {t: [pools] * N_EDGES for t in ("normal", "reduce")}}  # fmt: skip


def measure(masks, images, seed=0, ntk_batch=14, n_crops=3000):
    """(ours, reference) kappa and regions for one mask on the same weights and inputs."""
    in_ch = images.shape[1]
    space = darts_space(in_channels=in_ch)
    batch, crops = sample_images(images, ntk_batch, seed), random_crops(images, n_crops, 3, seed)
    ref_ntk, ref_thin = RefNetwork(in_channels=in_ch), RefNetwork(use_stem=False)
    ntk_net, thin = space.ntk_network(), space.regions_network()
    ref_init(ref_ntk, "fan_out", seed)
    ref_init(ref_thin, "fan_in", seed)
    copy_weights(ref_ntk, ntk_net)
    copy_weights(ref_thin, thin)
    set_masks(ref_ntk, masks)
    set_masks(ref_thin, masks)
    weights = {"weights": our_masks(masks)}
    with average_masked_ops(ntk_net), average_masked_ops(thin):  # as oneshot.prune._Meter does
        kappa = condition_number(ntk_gram(ntk_net, batch, weights))
        regions = count_unique_rows(activation_patterns(thin, crops, 1000, weights))
    return {"kappa": kappa, "regions": regions, "ref_kappa": ref_kappa(ref_ntk, batch),
            "ref_regions": ref_regions(ref_thin, crops)}  # fmt: skip


def digits_images():
    x = torch.tensor(load_digits().images[:200], dtype=torch.float32)
    return ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_metric_networks_have_the_references_parameters():
    space = darts_space()
    for ours, ref in (
        (space.ntk_network(), RefNetwork()),
        (space.regions_network(), RefNetwork(use_stem=False)),
    ):
        copy_weights(ref, ours)  # asserts the same parameter shapes in the same order
        bns = [m for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(bn.affine for bn in bns)
    # The NTK spans every weight, BN weights included: 5,138 columns with every op.
    ntk_net = space.ntk_network()
    assert sum(p.numel() for n, p in ntk_net.named_parameters() if n.endswith("weight")) == 5138
    assert space.candidates["normal"][0] == tuple(REF_SPACE) and DARTS_PRIMITIVES != tuple(
        REF_SPACE
    )


@pytest.mark.parametrize("name", list(example_masks()))
def test_kappa_and_regions_equal_the_reference_computation(name):
    got = measure(example_masks()[name], digits_images())
    assert math.isfinite(got["kappa"]) and got["regions"] > 1
    assert got["kappa"] == pytest.approx(
        got["ref_kappa"], rel=1e-5
    )  # round-off apart (w * op vs. sum / k)
    assert got["regions"] == got["ref_regions"]


if __name__ == "__main__":
    import numpy as np

    if len(sys.argv) > 1:  # e.g. CIFAR-10 images: x N x H x W x C uint8, normalised per channel
        x = torch.tensor(np.load(sys.argv[1])["x"], dtype=torch.float32).permute(0, 3, 1, 2)
        imgs = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    else:
        imgs = digits_images()
    torch.set_num_threads(1)
    for label, m in example_masks().items():
        print(label, {k: round(v, 4) for k, v in measure(m, imgs).items()})
