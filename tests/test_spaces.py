"""Supernets and discrete networks of both spaces."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneshot import genotypes as G
from oneshot.genotypes import GenotypeError
from oneshot.spaces import (
    DartsNetwork,
    DartsSupernet,
    NB201Network,
    build_network,
    get_space,
    nb201_network,
)
from oneshot.spaces.darts import cell_edges

SHAPES = [(1, 28), (3, 32)]


def small_supernet(space, in_channels=3, image_size=32, **kw):
    if space == "nb201":
        return NB201Network(C=4, N=1, in_channels=in_channels, image_size=image_size, **kw)
    return DartsSupernet(C=4, layers=3, in_channels=in_channels, image_size=image_size, **kw)


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_parameter_split_is_disjoint_and_complete(space):
    net = small_supernet(space)
    arch, weights = net.arch_parameters(), net.weight_parameters()
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert arch and weights and not ids_a & ids_w
    assert ids_a | ids_w == {id(p) for p in net.parameters()}
    # Registered parameters: each one is in the state dict under alphas.<cell type>, so checkpoints keep it.
    by_id = {id(v): k for k, v in net.state_dict(keep_vars=True).items()}
    assert sorted(by_id[id(a)] for a in arch) == sorted(f"alphas.{t}" for t in net.alphas)


@pytest.mark.parametrize("space", ["nb201", "darts"])
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_supernet_forward_backward(space, channels, size):
    net = small_supernet(space, channels, size)
    logits = net(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in net.arch_parameters())


@pytest.mark.parametrize(("channels", "size"), SHAPES)
@pytest.mark.parametrize("genotype", [G.DARTS_V2, G.ENAS, G.NB201_RESNET])
def test_discrete_network_forward_backward(genotype, channels, size):
    kw = {"C": 8, "layers": 4} if isinstance(genotype, G.DartsGenotype) else {"C": 4, "N": 1}
    net = build_network(genotype, in_channels=channels, image_size=size, num_classes=7, **kw).train()
    out = net(torch.randn(2, channels, size, size))
    logits = out[0] if isinstance(out, tuple) else out
    assert logits.shape == (2, 7)
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()


def test_darts_v2_has_the_published_parameter_count():
    net = DartsNetwork(G.DARTS_V2, C=36, layers=20, num_classes=10)
    n = sum(p.numel() for name, p in net.named_parameters() if "auxiliary" not in name)
    assert n == 3_349_342  # the DARTS code (quark0/darts cnn/train.py) prints "param size = 3.349342MB"


def test_enas_cell_has_five_nodes():
    net = DartsNetwork(G.ENAS, C=8, layers=3, auxiliary=False)
    assert [len(c.ops) for c in net.cells] == [10, 10, 10]
    assert [c.multiplier for c in net.cells] == [5, 4, 4]  # normal concat: 5 nodes; reduce: [2, 4, 5, 6]
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def _copy_nb201(supernet, net):
    state = supernet.state_dict()
    mapped = {}
    for key in net.state_dict():
        m = re.match(r"(cells\.\d+\.edges\.(\d+)\.ops\.)0\.(.*)", key)
        if m:
            e = int(m.group(2))
            op = net.candidates["cell"][e][0]
            key_src = f"{m.group(1)}{supernet.candidates['cell'][e].index(op)}.{m.group(3)}"
        else:
            key_src = key
        mapped[key] = state[key_src]
    net.load_state_dict(mapped)


@pytest.mark.parametrize("genotype", [G.NB201_RESNET, G.NB201_BEST_CIFAR10])
def test_nb201_one_hot_supernet_equals_discrete_network(genotype):
    supernet = NB201Network(C=4, N=2, affine=True)
    net = nb201_network(genotype, C=4, N=2)
    _copy_nb201(supernet, net)
    x = torch.randn(4, 3, 16, 16)
    one_hot = {"cell": [torch.nn.functional.one_hot(torch.tensor(i), 5).float() for i in supernet.weights_for(genotype)["cell"]]}
    torch.testing.assert_close(supernet(x, one_hot), net(x))
    torch.testing.assert_close(supernet(x, supernet.weights_for(genotype)), net(x))
    assert net.genotype() == genotype


def test_darts_one_hot_supernet_equals_evaluation_network():
    # Pools carry an extra BN in the supernet, so use a pool-free genotype (where the space allows).
    cell = G.DARTS_V2.normal
    genotype = G.DartsGenotype(cell, (2, 3, 4, 5), cell, (2, 3, 4, 5))
    supernet = DartsSupernet(C=4, layers=3)
    net = DartsNetwork(genotype, C=4, layers=3, auxiliary=False)
    index = {edge: e for e, edge in enumerate(cell_edges(4))}
    state, mapped = supernet.state_dict(), {}
    for key, value in net.state_dict().items():
        m = re.match(r"cells\.(\d+)\.ops\.(\d+)\.(.*)", key)
        if m:
            i, k, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            t = "reduce" if supernet.cells[i].reduction else "normal"
            op, j = (genotype.reduce if t == "reduce" else genotype.normal)[k]
            e = index[(k // 2 + 2, j)]
            key = f"cells.{i}.edges.{e}.ops.{supernet.candidates[t][e].index(op)}.{rest}"
        if key not in state:  # BN affine weights exist only in the evaluation net; at init the identity
            assert key.endswith((".weight", ".bias")) and torch.equal(value, torch.ones_like(value) * key.endswith("weight"))
            assert key.replace(".weight", ".running_mean").replace(".bias", ".running_mean") in state
        mapped[m.group(0) if m else key] = state.get(key, value)
    net.load_state_dict(mapped)
    x = torch.randn(2, 3, 16, 16)
    weights = supernet.weights_for(genotype)
    one_hot = {
        t: [None if w is None else torch.nn.functional.one_hot(torch.tensor(w), 8).float() for w in ws]
        for t, ws in weights.items()
    }
    torch.testing.assert_close(supernet(x, weights), net(x))
    torch.testing.assert_close(supernet(x, one_hot), net(x))


def test_weights_for_rejects_genotype_outside_space():
    pruned = NB201Network(C=4, N=1, candidates={"cell": [("nor_conv_3x3", "skip_connect")] * 6})
    with pytest.raises(GenotypeError, match="'none' on edge 2<-0.*nor_conv_3x3, skip_connect"):
        pruned.weights_for(G.NB201_RESNET)
    with pytest.raises(GenotypeError, match="not an NB201"):
        pruned.weights_for(G.DARTS_V2)


def test_pruned_supernet_has_alphas_only_for_survivors():
    full = NB201Network(C=4, N=1)
    pruned = NB201Network(C=4, N=1, candidates={"cell": [("nor_conv_3x3", "skip_connect")] * 6})
    assert pruned.alphas["cell"].shape == (6, 2)
    assert pruned.num_weight_parameters() < full.num_weight_parameters()


def test_impossible_sizes_and_unknown_space():
    with pytest.raises(ValueError, match="C=5"):
        DartsSupernet(C=5)
    for layers in (0, 1, 2):  # every cell a reduction: the normal alphas could never be trained
        with pytest.raises(ValueError, match=rf"space.supernet.layers={layers}: .*layers >= 3"):
            DartsSupernet(C=4, layers=layers)
    assert DartsSupernet(C=4, layers=3).cells[0].reduction is False
    with pytest.raises(ValueError, match="unknown space 'nb301'.*nb201, darts"):
        get_space("nb301")


def test_same_input_twice_is_a_mask_of_both_ops():
    cell = ((("sep_conv_3x3", 0), ("skip_connect", 0)) + G.DARTS_V2.normal[2:])
    g = G.DartsGenotype(cell, (2, 3, 4, 5), cell, (2, 3, 4, 5))
    w = DartsSupernet(C=4, layers=3).weights_for(g)
    assert w["normal"][0] == (4, 3) and w["normal"][1] is None


def test_pc_darts_betas_are_arch_parameters_and_get_gradients():
    net = DartsSupernet(C=8, layers=3, partial_channels=4)
    assert net.edge_normalization and set(net.betas) == {"normal", "reduce"}
    arch, weights = net.arch_parameters(), net.weight_parameters()
    ids_a, ids_w = {id(p) for p in arch}, {id(p) for p in weights}
    assert {id(b) for b in net.betas.values()} <= ids_a and not ids_a & ids_w
    assert ids_a | ids_w == {id(p) for p in net.parameters()}
    assert any(k.startswith("betas.") for k in net.state_dict())
    net(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in net.betas.values())


def test_pc_darts_edge_weights_scale_each_edge_output():
    """Default forward == the cells computed by hand with beta-scaled edges."""
    net = DartsSupernet(C=8, layers=3, partial_channels=4).eval()
    with torch.no_grad():
        for b in net.betas.values():
            b.copy_(torch.randn_like(b))
    x = torch.randn(2, 3, 16, 16)
    weights, edge_weights = net.arch_weights(), net.edge_weights()
    for w in edge_weights.values():  # a softmax per node over its incoming edges
        start = 0
        for node in range(net.steps):
            torch.testing.assert_close(w[start : start + node + 2].sum(), torch.tensor(1.0))
            start += node + 2
    s0 = s1 = net.stem(x)
    for cell in net.cells:
        t = "reduce" if cell.reduction else "normal"
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        for e_node in range(net.steps):
            edges = [e for e, (target, _) in enumerate(cell_edges(net.steps)) if target == e_node + 2]
            states.append(sum(edge_weights[t][e] * cell.edges[e](states[j], weights[t][e])
                              for e, j in zip(edges, range(len(edges)))))  # fmt: skip
        s0, s1 = s1, torch.cat(states[-net.multiplier :], dim=1)
    expected = net.classifier(net.global_pooling(s1).flatten(1))
    torch.testing.assert_close(net(x), expected)


def test_k1_without_edge_normalisation_is_unchanged():
    """K=1: DARTS' cells exactly, each node the plain sum of its incoming mixed edges, each edge
    sum_k softmax(alpha_e)_k op_k(input), computed here op by op without the supernet's forward."""
    net = DartsSupernet(C=4, layers=3).eval()
    assert not net.edge_normalization and not net.betas
    assert net.arch_parameters() == list(net.alphas.values())
    with torch.no_grad():
        for a in net.alphas.values():
            a.copy_(torch.randn_like(a))
    x = torch.randn(2, 3, 16, 16)
    s0 = s1 = net.stem(x)
    for cell in net.cells:
        alphas = net.alphas["reduce" if cell.reduction else "normal"]
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        for node in range(net.steps):
            total = 0
            for e, (target, j) in enumerate(cell_edges(net.steps)):
                if target == node + 2:
                    w = torch.softmax(alphas[e], dim=-1)
                    ops = cell.edges[e].ops
                    total = total + sum(w[k] * ops[k](states[j]) for k in range(len(ops)))
            states.append(total)
        s0, s1 = s1, torch.cat(states[-net.multiplier :], dim=1)
    expected = net.classifier(net.global_pooling(s1).flatten(1))
    torch.testing.assert_close(net(x), expected)
    with_norm = DartsSupernet(C=4, layers=3, edge_normalization=True)
    assert with_norm.edge_normalization and len(with_norm.arch_parameters()) == 4


@pytest.mark.slow
def test_search_app_refuses_a_supernet_without_normal_cells(tmp_path):
    """layers=2: both cells are reductions; the search would end in autograd's traceback on the
    unused normal alphas. The app refuses it in one line before anything is written."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "oneshot-search"), f"run_dir={run_dir}", "space=darts",
         "space.supernet.layers=2", "space.supernet.C=4", "data=digits", "data.batch_size=16",
         "logger.pictures=false", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
         "+trainer.limit_val_batches=0", "retrain.enabled=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "space.supernet.layers=2" in error and "layers >= 3" in error
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "genotype.txt").exists()
