"""The mixed op: one-hot weights equal the chosen op; samples and masks compute only their ops."""

import pytest
import torch

from oneshot.mixed import MixedOp
from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES


@pytest.mark.parametrize("primitives", [DARTS_PRIMITIVES, NB201_PRIMITIVES])
@pytest.mark.parametrize("stride", [1, 2])
def test_one_hot_weights_equal_the_chosen_op(primitives, stride):
    mixed = MixedOp(4, 4, stride, primitives, affine=True).eval()
    x = torch.randn(2, 4, 8, 8)
    for k in range(len(primitives)):
        w = torch.zeros(len(primitives))
        w[k] = 1.0
        torch.testing.assert_close(mixed(x, w), mixed.ops[k](x))
        torch.testing.assert_close(mixed(x, k), mixed.ops[k](x))


def test_soft_weights_are_the_weighted_sum():
    mixed = MixedOp(4, 4, 1, NB201_PRIMITIVES, affine=True).eval()
    x, w = torch.randn(2, 4, 8, 8), torch.softmax(torch.randn(len(NB201_PRIMITIVES)), 0)
    expected = sum(wk * op(x) for wk, op in zip(w, mixed.ops))
    torch.testing.assert_close(mixed(x, w), expected)


def _count_calls(mixed):
    calls = [0] * len(mixed.ops)
    for k, op in enumerate(mixed.ops):
        op.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
    return calls


def test_sample_and_mask_compute_only_their_ops():
    mixed = MixedOp(4, 4, 1, DARTS_PRIMITIVES)
    calls = _count_calls(mixed)
    x = torch.randn(2, 4, 8, 8)
    mixed(x, 4)
    assert calls == [0, 0, 0, 0, 1, 0, 0, 0]
    out = mixed(x, (1, 3))
    assert calls == [0, 1, 0, 1, 1, 0, 0, 0]
    torch.testing.assert_close(out, mixed.ops[1](x) + mixed.ops[3](x))
    assert mixed(x, None) is None


def test_dense_weights_skip_the_none_op():
    mixed = MixedOp(4, 4, 1, DARTS_PRIMITIVES)
    calls = _count_calls(mixed)
    mixed(torch.randn(2, 4, 8, 8), torch.full((8,), 0.125))
    assert calls[0] == 0 and all(c == 1 for c in calls[1:])


def test_alpha_none_still_gets_gradient():
    mixed = MixedOp(4, 4, 1, DARTS_PRIMITIVES)
    alpha = torch.zeros(8, requires_grad=True)
    mixed(torch.randn(2, 4, 8, 8), torch.softmax(alpha, 0)).square().mean().backward()
    assert alpha.grad[0] != 0


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_keep_shape_and_use_a_quarter(stride):
    mixed = MixedOp(8, 8, stride, DARTS_PRIMITIVES, partial=4)
    assert mixed.ops[4][0][1].in_channels == 2  # sep conv sees C/K channels
    y = mixed(torch.randn(2, 8, 8, 8), torch.full((8,), 0.125))
    assert y.shape == (2, 8, 8 // stride, 8 // stride)


def test_partial_channels_reject_bad_k():
    with pytest.raises(ValueError, match="K=3"):
        MixedOp(8, 8, 1, DARTS_PRIMITIVES, partial=3)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_channels_bypass_and_shuffle_order(stride):
    """PC-DARTS (yuhuixu1993/PC-DARTS, model_search.py): the first C/K channels go through the ops,
    the last C - C/K go around them unchanged (max-pooled 2x2 at stride 2), and ``channel_shuffle``
    with K groups interleaves them: output channel j*K + g is channel g*C/K + j of [ops, bypass].
    Written out index by index here, not with the view/transpose the module uses."""
    C, K = 24, 4  # C/K = 6 != K, so a shuffle with C/K groups instead of K would show
    k = C // K
    mixed = MixedOp(C, C, stride, DARTS_PRIMITIVES, partial=K).eval()
    x, w = torch.randn(2, C, 9, 9), torch.softmax(torch.randn(len(DARTS_PRIMITIVES)), 0)
    through = sum(w[i] * op(x[:, :k]) for i, op in enumerate(mixed.ops))
    bypass = x[:, k:] if stride == 1 else torch.nn.functional.max_pool2d(x[:, k:], 2, 2, ceil_mode=True)
    joined = torch.cat([through, bypass], dim=1)
    expected = torch.stack([joined[:, g * k + j] for j in range(k) for g in range(K)], dim=1)
    out = mixed(x, w)
    torch.testing.assert_close(out, expected)
    # Which channels are untouched: at stride 1 every bypassing channel is copied bit for bit.
    if stride == 1:
        for j in range(k):
            for g in range(1, K):
                assert torch.equal(out[:, j * K + g], x[:, g * k + j])
    # and only the first C/K input channels reach the ops' output channels (0, K, 2K, ...).
    x2 = x.clone()
    x2[:, k:] += 1.0
    torch.testing.assert_close(mixed(x2, w)[:, ::K], out[:, ::K])
