"""A user's own model as a search space (issue 15): the supernet protocol, fix(), every
strategy's view of it, and the real apps end to end on tests/user_models_example.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import oneshot
from oneshot import plots
from oneshot.arch import Arch, ArchError, load_arch
from oneshot.cell_pictures import arch_figure, arch_rows, mobilenet_blocks
from oneshot.controller import Controller
from oneshot.nn import Choice
from oneshot.prune import prune
from oneshot.spaces.model import ModelSpace, fix, tenas_space

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from user_models_example import TinyNet, TinyNetByHand, one_hot_output  # noqa: E402

ARCH = {"op1": "k5", "op2": "0", "skip": [2], "depth": 2}
CONFIG = {"_target_": "user_models_example.TinyNet", "width": 4}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def space(**kw):
    torch.manual_seed(0)
    return ModelSpace(TinyNet(4), num_classes=10, in_channels=3, image_size=8, **kw)


def test_protocol_one_cell_type_and_one_edge_per_decision():
    s = space()
    assert s.cell_types == ("op1", "op2", "skip", "depth")
    assert s.candidates["op1"] == [("k3", "k5", "pool")] and s.candidates["depth"] == [
        ("1", "2", "3")
    ]
    assert {t: tuple(a.shape) for t, a in s.alphas.items()} == {
        "op1": (1, 3),
        "op2": (1, 2),
        "skip": (1, 3),
        "depth": (1, 3),
    }
    assert s.edge_names("skip") == ["inputchoice"]
    arch, weights = {id(p) for p in s.arch_parameters()}, {id(p) for p in s.weight_parameters()}
    assert not arch & weights and arch | weights == {id(p) for p in s.parameters()}
    with torch.no_grad():
        for a in s.alphas.values():
            a.copy_(torch.randn_like(a))
    g = s.genotype()
    assert {t: [int(s.alphas[t].argmax())] for t in s.cell_types} == s.weights_for(g)


def test_fix_equals_hand_written_network_and_the_one_hot_supernet():
    s = space().eval()
    x = torch.randn(2, 3, 8, 8)
    fixed = fix(s, ARCH).eval()
    assert n_params(fixed) == n_params(TinyNetByHand(4)) < s.num_weight_parameters()
    assert (
        not any(isinstance(m, Choice) for m in fixed.modules())
        and "alphas" not in fixed.state_dict()
    )
    torch.testing.assert_close(fixed(x), one_hot_output(s, ARCH, x))
    # the same network built anew under fixed_arch: same tree, so the weights load into it
    built = fix(CONFIG, ARCH).eval()
    assert n_params(built) == n_params(fixed)
    built.load_state_dict(fixed.state_dict())
    torch.testing.assert_close(built(x), fixed(x))
    traced = torch.jit.trace(fixed, x)
    torch.testing.assert_close(traced(x), fixed(x))
    assert n_params(oneshot.fix(TinyNet, ARCH)) == n_params(TinyNetByHand())


def test_fixed_network_exports_to_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    fixed = fix(CONFIG, ARCH).eval()
    torch.onnx.export(fixed, (torch.randn(1, 3, 8, 8),), str(tmp_path / "net.onnx"))
    assert (tmp_path / "net.onnx").stat().st_size > 0


def test_bad_models_are_one_line_naming_the_label():
    from user_models_example import BadShapes, NoChoices, SameLabelDifferentCounts

    with pytest.raises(ValueError, match="has no LayerChoice, InputChoice or Repeat"):
        ModelSpace(NoChoices(), in_channels=3, image_size=8)
    with pytest.raises(
        ValueError, match=r"choices labelled 'op' differ: a layerchoice of 2 .* of 3"
    ):
        ModelSpace(SameLabelDifferentCounts(), in_channels=3, image_size=8)
    with pytest.raises(
        ValueError,
        match=r"candidates of choice 'op' give different output shapes \(same: \[2, 4, 8, 8\], smaller",
    ):
        ModelSpace(BadShapes(), in_channels=3, image_size=8)
    with pytest.raises(ValueError, match="space.model._target_=nopkg.Net cannot be imported"):
        ModelSpace({"_target_": "nopkg.Net"})
    with pytest.raises(ArchError, match="arch misses label 'depth'"):
        space().weights_for({"op1": "k5", "op2": "0", "skip": [2]})


def test_warm_start_candidates_drop_the_pruned_modules():
    s = space(candidates={"op1": [("k3", "pool")], "depth": [("1", "2")]})
    assert s.candidates["op1"] == [("k3", "pool")] and s.alphas["op1"].shape == (1, 2)
    assert "k5" not in s.model.op1._modules and "2" not in s.model.blocks._modules
    full = space()
    k5 = n_params(full.model.op1._modules["k5"])
    block = n_params(full.model.blocks._modules["2"])
    assert s.num_weight_parameters() == full.num_weight_parameters() - k5 - block
    assert s.weights_for({**ARCH, "op1": "pool", "depth": 1})["op1"] == [1]
    with pytest.raises(
        ArchError, match='arch\\[\'op1\'\\]="k5" is not a candidate of op1; valid: "k3", "pool"'
    ):
        s.weights_for(ARCH)
    with pytest.raises(ValueError, match="candidates for 'nope'"):
        space(candidates={"nope": [("a",)]})


def test_enas_controller_one_step_per_decision_and_teacher_forcing():
    s = space()
    c = Controller.for_supernet(s)
    sample = c.sample(torch.Generator().manual_seed(3))
    assert [d.name for d in sample.decisions] == [
        "op1/layerchoice",
        "op2/layerchoice",
        "skip/inputchoice",
        "depth/repeat",
    ]
    assert [d.logits.numel() for d in sample.decisions] == [3, 2, 3, 3]
    torch.testing.assert_close(c.log_prob_of(sample.genotype), sample.log_prob)
    assert s.weights_for(sample.genotype) == sample.weights
    assert c.choices_of(load_arch(ARCH)) == [1, 0, 2, 1]
    # the supernet with the sample's indices computes the fixed network of its genotype
    s.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(s(x, sample.weights), fix(s, sample.genotype).eval()(x))


def test_tenas_prune_on_the_model_itself_keeps_one_candidate_per_decision():
    s = ModelSpace(CONFIG, num_classes=10, in_channels=3, image_size=8)
    ts = tenas_space(s, 10, 3, ntk_batch=6)
    images = torch.randn(40, 3, 8, 8)
    result = prune(ts, images, keep=1, num_inits=1, n_crops=20)
    assert set(result.genotype) == set(s.cell_types)
    s.weights_for(result.genotype)  # a valid architecture of the model
    two = prune(ts, images, keep=2, num_inits=1, n_crops=20)
    assert all(len(ops[0]) == 2 for ops in two.survivors.values())
    # the averaged mask of TE-NAS: two candidates give their mean
    from oneshot.prune import average_masked_ops

    s.eval()
    x = torch.randn(2, 3, 8, 8)
    both = {**s.weights_for(ARCH), "op1": [(0, 1)]}
    with average_masked_ops(s):
        mean = s(x, both)
    assert not s._state.average_masks
    w = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(mean, s(x, {**s.weights_for(ARCH), "op1": [w]}))


# ---- the real apps, end to end ----------------------------------------------------------------

FAST = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "data=digits",
        "data.batch_size=16"]  # fmt: skip
MODEL = ["space=model", "space.model._target_=user_models_example.TinyNet", "space.model.width=4"]


def app(name, args, cwd):
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / name
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_search_and_retrain_apps_on_a_user_model(tmp_path):
    run = tmp_path / "search"
    done = app(
        "oneshot-search", [*MODEL, *FAST, "retrain.enabled=false", f"run_dir={run}"], tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    arch = load_arch(run / "arch.json")
    report = json.loads((run / "report.json").read_text())
    assert report["genotype"] == str(arch) and report["space"] == "model"
    assert (run / "plots" / "alphas_op1.png").is_file()
    # the derived architecture's figure: after the epoch (the callback) and at the end (redrawn)
    from test_plots import pixels

    assert (run / "plots" / "epochs" / "epoch_000_arch.png").is_file()
    assert (pixels(run / "plots" / "arch.png") == pixels(plots.arch_picture(arch))).all()
    retrain = tmp_path / "retrain"
    done = app(
        "oneshot-retrain",
        [*MODEL, f"arch={run / 'arch.json'}", *FAST, f"run_dir={retrain}"],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    params = json.loads((retrain / "report.json").read_text())["parameters"]
    assert params == n_params(fix({**CONFIG, "in_channels": 1}, arch))  # digits: one channel
    # the exported weights load into the fixed network; load_network refuses to name a user class
    bundle = torch.load(retrain / "network.pt", weights_only=True)
    fix({**CONFIG, "in_channels": 1}, bundle["genotype"]).load_state_dict(bundle["state_dict"])
    with pytest.raises(ValueError, match="your own model class"):
        oneshot.load_network(retrain / "network.pt")
    # a bad arch and an unimportable model: one error line, nothing written
    (tmp_path / "bad.json").write_text(json.dumps({**arch.to_json(), "op1": "k7"}))
    for args, message in [
        ([*MODEL, f"arch={tmp_path / 'bad.json'}"], "error: arch['op1']='k7' is not a candidate of op1; valid: k3, k5, pool"),
        (["space=model", "space.model._target_=nopkg.Net", f"arch={run / 'arch.json'}"], "error: space.model._target_=nopkg.Net cannot be imported"),
    ]:  # fmt: skip
        done = app("oneshot-retrain", [*args, f"run_dir={tmp_path / 'refused'}"], tmp_path)
        assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(message), (
            done.stderr[-1000:]
        )
        assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy",
    [["strategy=enas", "strategy.derive_samples=4"], ["strategy.order=2"],
     ["warmstart=tenas", "warmstart.keep=2", "warmstart.num_inits=1", "warmstart.n_crops=50", "warmstart.ntk_batch=8",
      "warmstart.images=100"],
     ["strategy=tenas", "strategy.num_inits=1", "strategy.n_crops=50", "strategy.ntk_batch=8", "strategy.images=100"],
     ["strategy=gdas"], ["strategy=drnas"], ["space.supernet.partial_channels=2"],
     ["strategy=spos", "strategy.population=6", "strategy.generations=2", "strategy.top_k=3", "strategy.n_mutation=2",
      "strategy.n_crossover=2", "strategy.recalibration_batches=1", "strategy.eval_batches=1"]],
    ids=["enas", "darts2", "warmstart", "tenas", "gdas", "drnas", "pcdarts", "spos"],
)  # fmt: skip
def test_every_strategy_searches_a_user_model(strategy, tmp_path):
    model = [
        "space=model",
        "space.model._target_=user_models_example.TinyNet",
        "+space.model.width=4",
    ]
    cfg = oneshot.compose(
        "search", [*model, *strategy, *FAST, "retrain.enabled=false", f"run_dir={tmp_path}"]
    )
    report = oneshot.search(cfg)
    arch = load_arch(tmp_path / "arch.json")
    assert str(arch) == report["genotype"]
    fix(CONFIG, arch)
    if "space.supernet.partial_channels=2" in strategy:  # op1 searched at half its width
        full = ModelSpace({**CONFIG, "in_channels": 1}, num_classes=10, in_channels=1).num_weight_parameters()
        assert report["supernet_weight_parameters"] < full
    if "warmstart=tenas" in strategy:
        survivors = report["warmstart"]["survivors"]
        assert all(len(ops[0]) == 2 for ops in survivors.values())
        choices = ModelSpace(CONFIG).choices  # the search chose among the survivors only
        assert all(choices[t].name_of(arch[t]) in survivors[t][0] for t in arch)


# ---- space=mobilenet ----------------------------------------------------------------------------

MOBILENET = {"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", "width_mult": 0.25, "first_channels": 32,
             "stages": [[24, 2, 2], [40, 2, 2], [80, 2, 2]], "last_channels": 128}  # fmt: skip


def mbconv(c_in, c_out, k, e):
    """Parameters of an MBConv block, by hand: 1x1 expansion + BN, depthwise kxk + BN, 1x1 + BN."""
    h = c_in * e
    return (0 if e == 1 else c_in * h + 2 * h) + h * k * k + 2 * h + h * c_out + 2 * c_out


def test_fixed_mobilenet_has_the_parameter_count_of_the_hand_written_network():
    arch = {
        "s1b1": "k3e3",
        "s1b2": "skip",
        "s2b1": "k7e6",
        "s2b2": "k5e3",
        "s3b1": "k5e6",
        "s3b2": "k3e6",
    }
    net = fix(MOBILENET, arch)
    # channels at width 0.25, rounded to multiples of 8: stem 8, first block 8, stages 8, 16, 24; head 128
    by_hand = (
        (3 * 8 * 9 + 2 * 8)
        + mbconv(8, 8, 3, 1)
        + mbconv(8, 8, 3, 3)
        + mbconv(8, 16, 7, 6)
        + mbconv(16, 16, 5, 3)
    )
    by_hand += mbconv(16, 24, 5, 6) + mbconv(24, 24, 3, 6) + (24 * 128 + 2 * 128) + (128 * 10 + 10)
    assert n_params(net) == by_hand
    s = ModelSpace(MOBILENET, num_classes=10, in_channels=3, image_size=32).eval()
    assert s.candidates["s1b1"] == [("k3e3", "k3e6", "k5e3", "k5e6", "k7e3", "k7e6")]
    assert s.candidates["s1b2"][0][-1] == "skip"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fix(s, arch).eval()(x), one_hot_output(s, arch, x))
    assert fix(s, arch).blocks[1].__class__ is nn.Identity


def test_mobilenet_strides_for_cifar_and_imagenet_sizes():
    from oneshot.spaces.mobilenet import MobileNetSpace

    for side, final in ((32, 4), (224, 7)):
        net = fix({"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", "image_size": side},
                  {t: "k3e3" for t in ModelSpace(MobileNetSpace(image_size=side), check_shapes=False).cell_types})  # fmt: skip
        feats = net.blocks(net.first(net.stem(torch.zeros(1, 3, side, side))))
        assert feats.shape[-1] == final


@pytest.mark.slow
def test_model_space_search_killed_mid_epoch_resumes_to_the_uninterrupted_result(
    tmp_path, monkeypatch
):
    """tests/test_resume.py's kill-and-resume protocol, on a user model (its helpers, reused)."""
    from test_resume import TINY, finish, run_killed_mid_epoch_then_resumed, start, state

    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the apps import user_models_example
    args = [*TINY, *MODEL, "trainer.max_epochs=2", "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=1",
            "retrain.enabled=false"]  # fmt: skip
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start("oneshot-search", whole, *args))
    run_killed_mid_epoch_then_resumed("oneshot-search", killed, args)
    a, b = state(whole / "checkpoints" / "last.ckpt"), state(killed / "checkpoints" / "last.ckpt")
    for label in ("op1", "op2", "skip", "depth"):
        key = f"supernet.alphas.{label}"
        assert float((a[key] - b[key]).abs().max()) < 1e-5
    assert load_arch(killed / "arch.json") == load_arch(whole / "arch.json")


@pytest.mark.slow
def test_model_space_two_ddp_processes_end_with_the_architecture_of_one(tmp_path, monkeypatch):
    """tests/test_ddp.py's equivalence (2 CPU DDP processes vs 1 with ghost BN), on a user model."""
    import test_ddp

    model = [*MODEL[:2], "++space.model.width=4"]  # ++: the Python API has no command-line rewrite
    tiny = [a for a in test_ddp.TINY if not a.startswith("space")] + model
    monkeypatch.setattr(test_ddp, "TINY", tiny)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    args = test_ddp.STRATEGIES["darts1"]
    ddp_dir = test_ddp.ddp_search(tmp_path, args)
    report = json.loads((ddp_dir / "report.json").read_text())
    assert report["ddp"] == {"world_size": test_ddp.WORLD, "max_parameter_diff_across_ranks": 0.0}
    ref = test_ddp.one_process_search(tmp_path / "ref", args, monkeypatch, ghost_bn=True)
    assert (
        test_ddp.max_diff(test_ddp.arch_state(ddp_dir), test_ddp.arch_state(tmp_path / "ref"))
        < 1e-5
    )
    assert ref["genotype"] == report["genotype"] == str(load_arch(ddp_dir / "arch.json"))


# ---- the derived architecture's figure (plots/arch.png) ---------------------------------------


def test_arch_figure_of_a_user_model_is_a_table_of_every_decision():
    arch = {"op1": "k5", "op2": "0", "skip": [0, 2], "depth": 2}
    rows = [("depth", "depth", "2"), ("op1", "candidate", "k5"), ("op2", "candidate", "0"),
            ("skip", "inputs", "0 + 2")]  # fmt: skip
    assert arch_rows(arch) == rows and mobilenet_blocks(arch) is None
    cells = arch_figure(arch).axes[0].tables[0].get_celld()
    drawn = [tuple(cells[r, c].get_text().get_text() for c in range(3)) for r in range(5)]
    assert drawn == [("decision", "kind", "chosen"), *rows]
    # plots: a picture for a model space's arch (value, dict or JSON text), none for a cell genotype
    from test_plots import pixels

    from oneshot.genotypes import NB201_BEST_CIFAR10

    assert plots.arch_picture(NB201_BEST_CIFAR10) is None and plots.cell_pictures(Arch(arch)) == {}
    assert (pixels(plots.arch_picture(str(Arch(arch)))) == pixels(plots.arch_picture(arch))).all()


def test_arch_figure_of_mobilenet_is_a_block_diagram_of_its_stages():
    from matplotlib.patches import FancyBboxPatch

    arch = {"s1b1": "k3e3", "s1b2": "skip", "s2b1": "k7e6", "s2b2": "k5e3", "s10b1": "k5e6"}
    assert mobilenet_blocks(arch) == {1: [(1, 3, 3), (2, None, None)], 2: [(1, 7, 6), (2, 5, 3)],
                                      10: [(1, 5, 6)]}  # fmt: skip
    ax = arch_figure(arch).axes[0]
    texts = [t.get_text() for t in ax.texts if t.get_text()]
    assert len(ax.texts) - len(texts) == 2  # an arrow between neighbouring blocks of a stage
    assert texts == ["stage 1\n1/2 blocks", "MB3 3x3", "skip", "stage 2\n2/2 blocks", "MB6 7x7", "MB3 5x5",
                     "stage 10\n1/1 blocks", "MB6 5x5"]  # fmt: skip
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) == 5 and [b.get_linestyle() for b in boxes].count("--") == 1
    # a label of that form with a value of another kind: not mobilenet's, drawn as the table
    assert mobilenet_blocks({"s1b1": "k3e3", "s1b2": "conv"}) is None
    assert arch_figure({"s1b1": "k3e3", "s1b2": "conv"}).axes[0].tables


# ---- PC-DARTS on a model space (space.supernet.partial_channels) ---------------------------------


def test_pc_darts_builds_factory_choices_at_c_over_k_and_fixes_them_at_c():
    torch.manual_seed(0)  # TinyNet(4) built inside the space: op1's candidates are factories, op2's modules
    s = ModelSpace(CONFIG, num_classes=10, in_channels=3, image_size=8, partial_channels=2)
    assert s.model.op1._modules["k3"][0].weight.shape == (2, 2, 3, 3)
    assert s.model.op2._modules["0"][0].weight.shape == (4, 4, 3, 3)
    assert s.num_weight_parameters() < space().num_weight_parameters()
    x = torch.randn(2, 3, 8, 8)
    assert s(x).shape == (2, 10) and s(x, s.weights_for(ARCH)).shape == (2, 10)
    fixed = fix(s, ARCH)  # the chosen factory built anew at full width: the network by hand
    assert n_params(fixed) == n_params(TinyNetByHand(4))
    fixed.load_state_dict(fix(CONFIG, ARCH).state_dict())
    # mobilenet: a stage's non-first blocks are factories (channels 8, 16, 24 at width 0.25)
    mb = ModelSpace(MOBILENET, num_classes=10, in_channels=3, image_size=32, partial_channels=4)
    assert mb.model.blocks[1]._modules["k3e3"].conv[0][0].weight.shape == (6, 2, 1, 1)  # 8/4 channels, x3
    assert mb.model.blocks[0].partial == 1 and mb.model.blocks[1].partial == 4
    arch = {t: "k5e6" for t in mb.cell_types}
    assert n_params(fix(mb, arch)) == n_params(fix(MOBILENET, arch))
    with pytest.raises(ValueError, match="partial_channels=2: no LayerChoice of TinyNet takes 1/K"):
        ModelSpace(TinyNet(4), partial_channels=2)  # built before: its factories are at full width
    with pytest.raises(ValueError, match="'op1': channels=4 is not divisible by partial_channels=3"):
        ModelSpace(CONFIG, partial_channels=3)
