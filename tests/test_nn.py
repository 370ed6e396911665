"""oneshot.nn choices and oneshot.arch values, against direct computation (issue 15)."""

import copy
import json

import pytest
import torch
from torch import nn

from oneshot.arch import Arch, ArchError, check_arch, load_arch, parse_arch
from oneshot.nn import ChosenInputs, InputChoice, LayerChoice, Repeat, fixed_arch, label_scope
from oneshot.spaces.model import ModelSpace

torch.manual_seed(0)


class Wrap(nn.Module):
    """A model around one choice (a space needs a model to hold it)."""

    def __init__(self, choice):
        super().__init__()
        self.choice = choice

    def forward(self, x):
        return self.choice(x)


def ops():
    return [nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1), nn.Tanh()]


def test_layer_choice_weighted_sum_index_and_mask_match_direct_computation():
    candidates = ops()
    space = ModelSpace(Wrap(LayerChoice(candidates, label="op")))
    x = torch.randn(3, 2, 5, 5)
    direct = [op(x) for op in candidates]
    w = torch.softmax(torch.randn(3), -1)
    torch.testing.assert_close(space(x, {"op": [w]}), sum(wi * d for wi, d in zip(w, direct)))
    torch.testing.assert_close(space(x, {"op": [1]}), direct[1])
    torch.testing.assert_close(space(x, {"op": [(0, 2)]}), direct[0] + direct[2])
    space._state.average_masks = True  # TE-NAS: a mask's mean
    torch.testing.assert_close(space(x, {"op": [(0, 2)]}), (direct[0] + direct[2]) / 2)
    space._state.average_masks = False
    # The default weights are the softmax of the alphas
    torch.testing.assert_close(
        space(x), sum(wi * d for wi, d in zip(torch.softmax(space.alphas["op"][0], -1), direct))
    )


def test_layer_choice_names_from_a_dict_and_only_the_chosen_op_runs():
    calls = []
    a, b = nn.Identity(), nn.Identity()
    b.register_forward_hook(lambda *args: calls.append("b"))
    space = ModelSpace(Wrap(LayerChoice({"a": a, "b": b}, label="op")))
    assert space.candidates == {"op": [("a", "b")]}
    space(torch.randn(1, 2), {"op": [0]})
    assert calls == []


class Inputs(nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.pick = InputChoice(n, n_chosen=k, label="pick")

    def forward(self, xs):
        return self.pick(xs)


@pytest.mark.parametrize("k", [1, 2])
def test_input_choice_is_a_categorical_over_sets_of_inputs(k):
    space = ModelSpace(Inputs(4, k))
    names = space.candidates["pick"][0]
    sets = [[int(i) for i in n.split("+")] for n in names]
    assert len(names) == (4 if k == 1 else 6) and all(len(s) == k for s in sets)
    xs = [torch.randn(2, 3) for _ in range(4)]
    w = torch.softmax(torch.randn(len(names)), -1)
    direct = sum(wc * sum(xs[i] for i in s) for wc, s in zip(w, sets))
    torch.testing.assert_close(space(xs, {"pick": [w]}), direct)
    torch.testing.assert_close(space(xs, {"pick": [len(names) - 1]}), sum(xs[i] for i in sets[-1]))
    torch.testing.assert_close(space(xs, {"pick": [(0, 1)]}), sum(xs[i] for i in sets[0] + sets[1]))
    assert space.genotype()["pick"] == sets[int(space.alphas["pick"].argmax())]


def test_repeat_mixes_the_outputs_at_each_depth():
    blocks = [nn.Linear(3, 3) for _ in range(3)]
    space = ModelSpace(Wrap(Repeat(lambda i: blocks[i], depth=(1, 3), label="depth")))
    x = torch.randn(2, 3)
    outs = [x]
    for b in blocks:
        outs.append(b(outs[-1]))
    w = torch.softmax(torch.randn(3), -1)
    torch.testing.assert_close(space(x, {"depth": [w]}), sum(w[i] * outs[i + 1] for i in range(3)))
    torch.testing.assert_close(space(x, {"depth": [1]}), outs[2])
    assert space.candidates == {"depth": [("1", "2", "3")]}
    # depth 0 is the identity; an int depth is no decision
    zero = ModelSpace(Wrap(Repeat(nn.Linear(3, 3), depth=(0, 2), label="d")))
    torch.testing.assert_close(zero(x, {"d": [0]}), x)
    assert isinstance(Repeat(nn.Linear(3, 3), depth=2), nn.Sequential)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = LayerChoice([nn.Linear(3, 3), nn.Identity()], label="op")
        self.b = LayerChoice([nn.Linear(3, 3), nn.Identity()], label="op")
        self.c = LayerChoice([nn.Linear(3, 3), nn.Tanh()])

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_one_label_is_one_decision_with_shared_alphas():
    space = ModelSpace(Shared())
    assert space.cell_types == ("op", "layerchoice_1")
    assert [tuple(a.shape) for a in space.alphas.values()] == [(1, 2), (1, 2)]
    x = torch.randn(4, 3)
    space(x).sum().backward()
    # both places feed the one alpha row: its gradient is the sum of what each place gives
    w = torch.softmax(space.alphas["op"][0].detach(), -1)
    wc = torch.softmax(space.alphas["layerchoice_1"][0].detach(), -1)
    m = space.model
    a_out = [m.a._modules["0"](x), x]
    a_mix = w[0] * a_out[0] + w[1] * a_out[1]
    b_out = [m.b._modules["0"](a_mix), a_mix]
    b_mix = w[0] * b_out[0] + w[1] * b_out[1]
    out = wc[0] * m.c._modules["0"](b_mix) + wc[1] * torch.tanh(b_mix)
    torch.testing.assert_close(space(x), out)
    assert space.alphas["op"].grad is not None and space.genotype().keys() == {
        "op",
        "layerchoice_1",
    }


def test_auto_labels_count_per_scope_and_fixed_arch_builds_the_chosen_modules():
    with label_scope():
        first = Shared()
    with label_scope():
        second = Shared()
    assert first.c.label == second.c.label == "layerchoice_1"
    with fixed_arch({"op": "1", "layerchoice_1": "0"}):
        net = Shared()
    assert (
        isinstance(net.a, nn.Identity)
        and isinstance(net.b, nn.Identity)
        and isinstance(net.c, nn.Linear)
    )
    with fixed_arch({"pick": [2, 0]}):
        inputs = Inputs(4, 2)
    assert isinstance(inputs.pick, ChosenInputs) and inputs.pick.chosen == [0, 2]
    with fixed_arch({"depth": 2}):
        rep = Repeat(lambda i: nn.Linear(3, 3), depth=(1, 3), label="depth")
    assert isinstance(rep, nn.Sequential) and len(rep) == 2


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ({"op": "1"}, "arch misses label 'layerchoice_1'"),
        ({"op": "7", "layerchoice_1": "0"}, "arch['op']='7' is not a candidate of op; valid: 0, 1"),
        (
            {"op": "1", "layerchoice_1": "0", "other": 3},
            "arch label 'other' is not a choice of this model",
        ),
    ],
)
def test_fixed_arch_rejects_a_bad_arch_naming_the_label(arch, message):
    with pytest.raises(ArchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with fixed_arch(arch):
            Shared()


def test_arch_canonical_json_round_trip(tmp_path):
    arch = Arch({"z": "k5", "a": [2, 0], "depth": 3})
    assert str(arch) == '{"a":[2,0],"depth":3,"z":"k5"}'
    assert parse_arch(str(arch)) == arch and hash(parse_arch(str(arch))) == hash(arch)
    (tmp_path / "arch.json").write_text(json.dumps(arch.to_json(), indent=2))
    assert load_arch(tmp_path / "arch.json") == arch == load_arch(tmp_path) == load_arch(dict(arch))
    for bad in ("not json", "[1, 2]", '{"a": 1.5}', '{"a": true}'):
        with pytest.raises(ArchError):
            parse_arch(bad)
    with pytest.raises(ArchError, match="no such file"):
        load_arch(tmp_path / "missing.json")


class All(nn.Module):
    def __init__(self):
        super().__init__()
        self.op = LayerChoice({"k3": nn.Identity(), "k5": nn.Identity()}, label="op")
        self.pick = InputChoice(3, 2, label="pick")
        self.depth = Repeat(nn.Identity(), (1, 3), label="depth")

    def forward(self, x):
        return self.depth(self.pick([self.op(x), x, x]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"op": "k7"}, """arch['op']="k7" is not a candidate of op; valid: "k3", "k5\""""),
        (
            {"pick": [1, 1]},
            "arch['pick']=[1, 1] is not a candidate of pick; valid: [0, 1], [0, 2], [1, 2]",
        ),
        ({"pick": [3]}, "arch['pick']=[3] is not a candidate of pick"),
        ({"depth": 0}, "arch['depth']=0 is not a candidate of depth; valid: 1, 2, 3"),
        ({"depth": "2"}, "arch['depth']=\"2\" is not a candidate of depth"),
    ],
)
def test_check_arch_names_the_label_and_the_valid_values(change, message):
    choices = ModelSpace(All()).choices
    good = {"op": "k3", "pick": [0, 2], "depth": 2}
    assert check_arch(good, choices) == good
    with pytest.raises(ArchError) as err:
        check_arch({**good, **change}, choices)
    assert str(err.value).startswith(message)
    with pytest.raises(ArchError, match="arch misses label 'depth'; valid values there: 1, 2, 3"):
        check_arch({"op": "k3", "pick": [0, 2]}, choices)


def test_choices_survive_deepcopy_and_bad_constructor_arguments_are_named():
    space = ModelSpace(All())
    twin = copy.deepcopy(space)
    x = torch.randn(2, 3)
    torch.testing.assert_close(twin(x, {"op": [1], "pick": [2], "depth": [0]}), 2 * x)
    assert twin.choices["op"] is twin.model.op
    with pytest.raises(ValueError, match="n_chosen=3; valid: 1..2"):
        InputChoice(2, 3)
    with pytest.raises(ValueError, match=r"depth=\(3, 1\)"):
        Repeat(nn.Identity(), (3, 1))
    with pytest.raises(ValueError, match="choice label 'a/b' is not valid"):
        LayerChoice([nn.Identity()], label="a/b")


def test_a_sample_with_a_straight_through_weight_runs_one_candidate_and_carries_the_gradient():
    """GDAS' ``(index, weight)`` entry: only that candidate runs, times a weight of value 1."""
    space = ModelSpace(All())
    x = torch.randn(2, 3)
    weight = torch.ones((), requires_grad=True)
    out = space(x, {"op": [(1, weight)], "pick": [(2, weight)], "depth": [(0, weight)]})
    torch.testing.assert_close(out, 2 * x)
    out.sum().backward()
    # out = w_depth * w_pick * (x + x): inputs 1 and 2 leave the op's output out, so two factors of w
    torch.testing.assert_close(weight.grad, 2 * out.sum().detach())


# ---- candidate factories and PC-DARTS' partial channels -----------------------------------------


@pytest.mark.parametrize(
    "stride, names",
    [(1, ["skip_connect", "nor_conv_3x3", "avg_pool_3x3"]), (2, ["max_pool_3x3", "sep_conv_3x3", "skip_connect"])],
    ids=["nb201-ops", "darts-ops-stride2"],
)  # fmt: skip
def test_partial_channel_choice_is_the_cell_spaces_pc_darts_mixed_op_on_the_same_weights(stride, names):
    from oneshot.mixed import MixedOp
    from oneshot.nn import ChoiceState, partial_channels
    from oneshot.ops import make_op

    C, K = 8, 4
    torch.manual_seed(0)
    mixed = MixedOp(C, C, stride, names, partial=K).eval()
    with partial_channels(K):
        choice = LayerChoice({n: (lambda c, n=n: make_op(n, c, c, stride, False)) for n in names}, label="e",
                             channels=C).eval()  # fmt: skip
    # MixedOp's ops.<i>.<param> are the choice's <name>.<param>: the same weights in both
    choice.load_state_dict({f"{names[int(k.split('.')[1])]}.{k.split('.', 2)[2]}": v
                            for k, v in mixed.state_dict().items()})  # fmt: skip
    assert next(choice._modules["nor_conv_3x3" if stride == 1 else "sep_conv_3x3"].parameters()).shape[1] <= C // K
    choice._state = ChoiceState()
    x = torch.randn(2, C, 6, 6)
    for w in (torch.softmax(torch.randn(3), -1), 1, (0, 2), (1, torch.tensor(1.0))):
        choice._state.weights = {"e": w}
        torch.testing.assert_close(choice(x), mixed(x, w))


def test_candidate_factories_are_built_at_channels_and_fixed_at_channels():
    from oneshot.nn import partial_channels

    factories = {"k3": lambda c: nn.Conv2d(c, c, 3, padding=1), "id": lambda c: nn.Identity()}
    plain = LayerChoice(factories, label="f", channels=8)
    assert plain.partial == 1 and plain._modules["k3"].weight.shape == (8, 8, 3, 3)
    with partial_channels(2):
        half = LayerChoice(factories, label="f", channels=8)
        modules = LayerChoice([nn.Conv2d(8, 8, 1), nn.Identity()], label="m")  # modules: full width
    assert half.partial == 2 and half._modules["k3"].weight.shape == (4, 4, 3, 3) and modules.partial == 1
    with fixed_arch({"f": "k3"}):
        fixed = LayerChoice(factories, label="f", channels=8)
    assert isinstance(fixed, nn.Conv2d) and fixed.weight.shape == (8, 8, 3, 3)
    with pytest.raises(ValueError, match="'f': candidate factories need channels=C"):
        LayerChoice(factories, label="f")
    with pytest.raises(ValueError, match="'f': give every candidate as an nn.Module, or every one as a factory"):
        LayerChoice({"k3": factories["k3"], "id": nn.Identity()}, label="f", channels=8)
    with pytest.raises(ValueError, match="'m': channels=8 is for candidate factories"):
        LayerChoice([nn.Identity()], label="m", channels=8)
    with partial_channels(3), pytest.raises(ValueError, match="'f': channels=8 is not divisible by partial_channels=3"):
        LayerChoice(factories, label="f", channels=8)
    with pytest.raises(ValueError, match="partial_channels=0; valid: an integer >= 1"), partial_channels(0):
        pass
