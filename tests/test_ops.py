"""Every registered op: output shape, backward, and the paper-specific structure."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oneshot.mixed import MixedOp
from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES, OPS, FactorizedReduce, Pool, make_op


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_op_shapes_and_backward(name, stride, size):
    op = make_op(name, 4, 4, stride, affine=True)
    x = torch.randn(2, 4, size, size, requires_grad=True)
    y = op(x)
    expected = (size + stride - 1) // stride
    assert y.shape == (2, 4, expected, expected)
    if name != "none":  # `none` is a constant zero: nothing to differentiate
        y.sum().backward()
        assert x.grad is not None


def test_unknown_op_names_valid_choices():
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'.*sep_conv_3x3"):
        make_op("conv_9x9", 4, 4, 1, True)


def test_sep_conv_is_two_relu_dw_pw_bn_blocks():
    op = make_op("sep_conv_3x3", 4, 4, 2, True)
    kinds = [type(m).__name__ for m in op.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"] * 2
    depthwise = [m for m in op.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [m.stride for m in depthwise] == [(2, 2), (1, 1)]  # only the first block strides


def test_reduction_skip_is_factorized_reduce():
    assert isinstance(make_op("skip_connect", 4, 4, 2, True), FactorizedReduce)
    assert isinstance(make_op("skip_connect", 4, 4, 1, True), nn.Identity)


def test_nb201_conv_is_relu_conv_bn_with_benchmark_bias():
    op = make_op("nor_conv_3x3", 4, 4, 1, affine=True)
    assert [type(m).__name__ for m in op] == ["ReLU", "Conv2d", "BatchNorm2d"]
    assert op[1].bias is None
    assert make_op("nor_conv_3x3", 4, 4, 1, affine=False)[1].bias is not None


def test_darts_supernet_pools_are_followed_by_bn():
    mixed = MixedOp(4, 4, 1, DARTS_PRIMITIVES, pool_bn=True)
    for name, op in zip(DARTS_PRIMITIVES, mixed.ops):
        wrapped = isinstance(op, nn.Sequential) and isinstance(op[0], Pool)
        assert wrapped == ("pool" in name), name
        if wrapped:
            assert isinstance(op[1], nn.BatchNorm2d) and not op[1].affine


def test_primitive_lists_are_registered():
    assert set(DARTS_PRIMITIVES) | set(NB201_PRIMITIVES) <= set(OPS)


@pytest.mark.parametrize("C_in", [1, 2, 4, 6, 16])
def test_factorized_reduce_channels_last_small_channels(C_in):
    """FactorizedReduce on channels-last input with few channels (PC-DARTS' reduction edges,
    TE-NAS' C=1 networks) equals torch's 1x1 stride-2 convs in the contiguous format, gradients
    included; torch 2.14's own channels-last kernel corrupts the heap there (oneshot.ops)."""
    torch.manual_seed(0)
    op = FactorizedReduce(C_in, 2 * C_in, affine=True)
    x = torch.randn(2, C_in, 9, 9)
    g = torch.randn(2, 2 * C_in, 5, 5)

    def reference(x):
        x = torch.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        out = torch.cat([F.conv2d(x, op.conv_1.weight, stride=2), F.conv2d(shifted, op.conv_2.weight, stride=2)], 1)
        return F.batch_norm(out, None, None, op.bn.weight, op.bn.bias, training=True)

    x_ref = x.clone().requires_grad_(True)
    reference(x_ref).backward(g)
    grads_ref = [p.grad.clone() for p in (op.conv_1.weight, op.conv_2.weight)]
    op.zero_grad()
    x_cl = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    out = op.to(memory_format=torch.channels_last)(x_cl)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    out.backward(g)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for p, ref in zip((op.conv_1.weight, op.conv_2.weight), grads_ref):
        torch.testing.assert_close(p.grad, ref, rtol=1e-5, atol=1e-5)
