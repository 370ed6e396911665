"""Every fast path equals its reference implementation (allclose), forward and backward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.darts import DartsSearch, frozen
from torch import nn

from oneshot.ops import avg_pool_3x3
from oneshot.spaces import DartsSupernet, NB201Network


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_box_filter_avg_pool_equals_avg_pool2d(stride, size):
    x = torch.randn(3, 5, size, size, requires_grad=True)
    ref = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False)
    g = torch.randn_like(ref(x))
    (expected,) = torch.autograd.grad(ref(x), x, g)
    y = avg_pool_3x3(x, stride)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], expected)
    # channels_last input, as the supernets feed it
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(avg_pool_3x3(x_cl, stride), ref(x.detach()))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_recomputing_max_pool_equals_max_pool2d(stride, size):
    """Same output and input gradient as ``nn.MaxPool2d``, ties included, and no int64
    indices kept for backward."""
    from oneshot.ops import MaxPool3x3

    x = torch.randn(3, 5, size, size).round(decimals=1).contiguous(memory_format=torch.channels_last)  # ties
    x.requires_grad_()
    ref = nn.MaxPool2d(3, stride, padding=1)
    g = torch.randn_like(ref(x))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = MaxPool3x3(stride)(x)
    assert torch.int64 not in saved
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref(x), x, g)[0], rtol=0, atol=0)


def _small(space, channels_last):
    torch.manual_seed(0)
    if space == "nb201":
        return NB201Network(C=4, N=1, channels_last=channels_last)
    return DartsSupernet(C=4, layers=3, channels_last=channels_last)


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_channels_last_supernet_equals_contiguous_one(space):
    fast, ref = _small(space, True), _small(space, False)
    ref.load_state_dict(fast.state_dict())
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in fast.parameters())  # fmt: skip
    x = torch.randn(4, 3, 16, 16)
    out_fast, out_ref = fast(x), ref(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-5)
    out_fast.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        # atol 5e-5: a conv bias before a non-affine BN has gradient 0 in exact arithmetic; the two
        # layouts leave float32 rounding of ~1e-5 there (seen with one thread); real gradients are O(0.1).
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=5e-5, msg=name)


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_fast_darts_steps_equal_plain_backward(space):
    """The arch step's alpha-only ``autograd.grad`` and the weight step with frozen alphas give
    exactly the gradients of a plain ``loss.backward()``."""
    net = _small(space, True)
    ref = copy.deepcopy(net)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    F.cross_entropy(ref(x), y).backward()
    module = DartsSearch(net, order=1)
    a_opt = torch.optim.SGD(net.arch_parameters(), lr=0.0)  # lr 0: keep alphas, look at grads
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=0.0)
    module.manual_backward = lambda loss: loss.backward()
    module.arch_step((x, y), (x, y), w_opt, a_opt)
    for a, b in zip(net.arch_parameters(), ref.arch_parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    module.grad_clip = 0
    module.weight_step((x, y), w_opt)
    for a, b in zip(net.weight_parameters(), ref.weight_parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    assert all(a.requires_grad for a in net.arch_parameters())  # frozen() restored them


def test_frozen_restores_requires_grad_after_an_error():
    p, q = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1), requires_grad=False)
    with pytest.raises(RuntimeError), frozen([p, q]):
        assert not p.requires_grad
        raise RuntimeError
    assert p.requires_grad and not q.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["darts", "enas"])
def test_bf16_mixed_search_and_retrain_run(strategy, tmp_path):
    """``trainer.precision=bf16-mixed`` through the real configs: search, derive and retrain."""
    import oneshot

    cfg = oneshot.compose("search", [
        f"strategy={strategy}", "space=nb201", f"run_dir={tmp_path}", "+trainer.fast_dev_run=true", "data=digits",
        "data.batch_size=8", "trainer.precision=bf16-mixed",
        *(["strategy.derive_samples=2"] if strategy == "enas" else []),
    ])  # fmt: skip
    report = oneshot.search(cfg)
    assert report["genotype"] and report["retrain"]["test_acc"] is not None
    assert "precision: bf16-mixed" in (tmp_path / "config.yaml").read_text()


def test_bf16_autocast_supernet_step_is_finite():
    """Under CPU bf16 autocast the supernet's convs (the box-filter pool included) run in bf16
    and the gradients reach every alpha and weight finite."""
    net = _small("darts", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(torch.randn(4, 3, 16, 16))
        assert logits.dtype == torch.bfloat16
        assert avg_pool_3x3(torch.randn(2, 3, 8, 8), 1).dtype == torch.bfloat16
    F.cross_entropy(logits.float(), torch.randint(0, 10, (4,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.arch_parameters())



@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_shared_node_relu_equals_one_relu_per_op(space, monkeypatch):
    """The node's shared ReLU changes nothing but the order of a sum: outputs and BN statistics
    are bit-identical to every op computing its own ReLU, gradients equal up to rounding (the
    node's gradient is summed before the ReLU's backward, not after); it runs once per node."""
    from oneshot import mixed

    net = _small(space, True)
    ref = copy.deepcopy(net)
    x = torch.randn(4, 3, 16, 16)
    relus = []
    hooks = [m.register_forward_hook(lambda *a: relus.append(1)) for m in net.modules() if isinstance(m, nn.ReLU)]
    out = net(x)
    for h in hooks:
        h.remove()
    shared_calls = len(relus)
    monkeypatch.setattr(mixed, "run_op", lambda op, node: op(node.x))  # every op its own ReLU
    relus.clear()
    hooks = [m.register_forward_hook(lambda *a: relus.append(1)) for m in ref.modules() if isinstance(m, nn.ReLU)]
    expected = ref(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)  # biases before BN: ~0 +- 1e-6
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        assert torch.equal(a, b), name
    # NB201 (N=1: 3 cells): 12 ReLU'd op inputs per cell -> 3 nodes; DARTS: 56 per cell -> 5.
    per_cell = {"nb201": (12, 3), "darts": (56, 5)}[space]
    n_cells = sum(1 for m in net.modules() if type(m).__name__ in ("NB201Cell", "SearchCell"))
    assert len(relus) - shared_calls == n_cells * (per_cell[0] - per_cell[1])
