"""Retraining recipes per space, the size preset of ``oneshot-retrain`` and the checks of the
retraining values: the real configs, composed as the apps compose them."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from oneshot.lightning_modules.retrain_recipes import (
    network_size,
    packaged_config,
    recipe_names,
    resolve_recipe,
)

import oneshot

BIN = Path(sys.executable).parent

# The benchmarks' published recipes, written out from their sources (not read from our configs):
# NAS-Bench-201: D-X-Y/AutoDL-Projects configs/nas-benchmark/hyper-opts/200E.config (no Cutout,
# no clipping in exps/NAS-Bench-201/functions.py); DARTS: quark0/darts cnn/train.py's defaults.
NB201 = dict(epochs=200, batch_size=256, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
             cutout=0, auxiliary_weight=0, drop_path_prob=0, grad_clip=0, lr_min=0)  # fmt: skip
DARTS = dict(epochs=600, batch_size=96, lr=0.025, momentum=0.9, nesterov=False, weight_decay=3e-4,
             cutout=0.5, auxiliary_weight=0.4, drop_path_prob=0.2, grad_clip=5, lr_min=0)  # fmt: skip


def flat(recipe):
    o = recipe.optimizer
    return dict(epochs=recipe.trainer.max_epochs, batch_size=recipe.batch_size, lr=o.lr, momentum=o.momentum,
                nesterov=o.nesterov, weight_decay=o.weight_decay, cutout=recipe.cutout,
                auxiliary_weight=recipe.auxiliary_weight, drop_path_prob=recipe.drop_path_prob,
                grad_clip=recipe.grad_clip, lr_min=recipe.lr_min)  # fmt: skip


@pytest.mark.parametrize(("space", "published"), [("nb201", NB201), ("darts", DARTS)])
def test_search_at_paper_size_retrains_with_its_space_recipe(space, published):
    cfg = oneshot.compose("search", [f"space={space}", "experiment=paper"])
    assert cfg.retrain.recipe is None  # retrain=default: chosen by space
    recipe = resolve_recipe(cfg, cfg.space.name)
    assert recipe.recipe == space and flat(recipe) == published
    optimizer = instantiate(recipe.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    assert {k: optimizer.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        k: published[k] for k in ("lr", "momentum", "nesterov", "weight_decay")
    }


@pytest.mark.parametrize(("genotype", "space", "published"), [("NB201_RESNET", "nb201", NB201), ("DARTS_V2", "darts", DARTS)])
def test_retrain_app_takes_the_genotype_space_recipe(genotype, space, published):
    cfg = oneshot.compose("retrain", [f"genotype={genotype}", "experiment=paper"])
    assert flat(resolve_recipe(cfg, space)) == published
    # A forced recipe wins over the space: the DARTS recipe for an NB201 cell, and back.
    other = "darts" if space == "nb201" else "nb201"
    forced = oneshot.compose("retrain", [f"genotype={genotype}", "experiment=paper", f"retrain={other}"])
    assert flat(resolve_recipe(forced, space)) == (DARTS if other == "darts" else NB201)
    # retrain.recipe=... under retrain=default does the same.
    named = oneshot.compose("retrain", [f"genotype={genotype}", "experiment=paper", f"retrain.recipe={other}"])
    assert flat(resolve_recipe(named, space)) == flat(resolve_recipe(forced, space))


def test_user_values_win_over_the_recipe_and_the_quickstart_sizes_it_down():
    cfg = oneshot.compose("search", ["experiment=paper", "retrain.optimizer.lr=0.05", "retrain.trainer.max_epochs=3",
                                     "+retrain.trainer.limit_train_batches=2", "retrain.val_split=100"])  # fmt: skip
    recipe = resolve_recipe(cfg, "nb201")
    assert (recipe.optimizer.lr, recipe.trainer.max_epochs, recipe.trainer.limit_train_batches) == (0.05, 3, 2)
    assert recipe.val_split == 100 and recipe.optimizer.nesterov is True and recipe.batch_size == 256
    quick = resolve_recipe(oneshot.compose("search", ["data.batch_size=32"]), "nb201")
    assert (quick.trainer.max_epochs, quick.batch_size, quick.cutout) == (8, 32, 0)
    assert quick.optimizer.lr == NB201["lr"]  # the space's recipe, only sized down


def test_default_has_a_null_for_every_recipe_value():
    """``retrain=default`` accepts every override a full recipe accepts, and sets none of the
    recipe's values itself (else it would hide the space's)."""
    default = OmegaConf.to_container(packaged_config("retrain", "default"))
    assert recipe_names() == ["darts", "nb201"]
    for name in recipe_names():
        recipe = OmegaConf.to_container(packaged_config("retrain", name))
        assert set(recipe) == set(default)
        assert set(recipe["optimizer"]) - {"_target_", "_partial_"} == set(default["optimizer"])
        assert set(recipe["trainer"]) == set(default["trainer"])
    nulls = {k: v for k, v in default.items() if k not in ("enabled", "export", "optimizer", "trainer")}
    assert all(v is None for v in nulls.values()) and default["enabled"] is True
    assert all(v is None for v in [*default["optimizer"].values(), *default["trainer"].values()])


@pytest.mark.parametrize(
    ("genotype", "overrides", "expected"),
    [
        ("NB201_RESNET", [], {"C": 16, "N": 1}),  # quickstart: size=cpu
        ("NB201_RESNET", ["experiment=paper"], {"C": 16, "N": 5}),
        ("DARTS_V2", [], {"C": 8, "layers": 3, "auxiliary": True}),
        ("DARTS_V2", ["size=paper"], {"C": 36, "layers": 20, "auxiliary": True}),
        ("DARTS_V2", ["experiment=darts_cifar10_retrain"], {"C": 36, "layers": 20, "auxiliary": True}),
        ("NB201_RESNET", ["network.C=4"], {"C": 4, "N": 1}),
    ],
)
def test_retrain_network_follows_the_size_preset(genotype, overrides, expected):
    cfg = oneshot.compose("retrain", [f"genotype={genotype}", *overrides])
    space = "darts" if genotype.startswith("DARTS") else "nb201"
    assert network_size(space, cfg.size, cfg.network) == expected


def test_published_darts_experiment_is_the_paper_recipe_on_all_training_images():
    cfg = oneshot.compose("retrain", ["genotype=DARTS_V2", "experiment=darts_cifar10_retrain"])
    recipe = resolve_recipe(cfg, "darts")
    assert flat(recipe) == DARTS and recipe.val_split == 0 and cfg.data.name == "cifar10"
    cfg = oneshot.compose("retrain", ["genotype=NB201_RESNET", "experiment=nb201_cifar10_retrain"])
    recipe = resolve_recipe(cfg, "nb201")
    assert flat(recipe) == NB201 and recipe.val_split == 0 and network_size("nb201", cfg.size, cfg.network) == {"C": 16, "N": 5}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("retrain.val_split=1.5", r"retrain\.val_split=1\.5 is out of range; valid: 0 \(no validation images\), a fraction in \(0, 1\)"),
        ("retrain.val_split=-2", r"retrain\.val_split=-2 is out of range"),
        ("retrain.val_split=1438", r"retrain\.val_split=1438 is out of range; .* 1\.\.1437 \(the training set has 1438\)"),
        ("retrain.cutout=-0.5", r"retrain\.cutout=-0\.5 is out of range; valid: 0\.\.1"),
        ("retrain.cutout=16", r"retrain\.cutout=16 is out of range; valid: 0\.\.1, the side of the Cutout square"),
        ("retrain.grad_clip=-1", r"retrain\.grad_clip=-1(\.0)? is out of range; valid: >= 0"),
        ("retrain.recipe=adam", r"retrain\.recipe=adam is not a recipe; valid: darts, nb201"),
        ("size=huge", r"size=huge is out of range; valid: one of paper, cpu"),  # refused up front (no space yet)
    ],
)
def test_bad_retrain_values_stop_before_anything_runs(tmp_path, override, message):
    cfg = oneshot.compose("retrain", ["genotype=NB201_RESNET", "data=digits", f"run_dir={tmp_path / 'r'}", override])
    with pytest.raises(ValueError, match=f"^{message}"):
        oneshot.retrain(cfg)
    assert not (tmp_path / "r").exists()  # no run directory was made


def test_search_refuses_a_bad_retrain_value_before_searching(tmp_path):
    cfg = oneshot.compose("search", ["data=digits", f"run_dir={tmp_path}", "retrain.val_split=2.0"])
    with pytest.raises(ValueError, match=r"^retrain\.val_split=2\.0 is out of range"):
        oneshot.search(cfg)
    assert not list(tmp_path.iterdir())  # nothing searched, nothing written


def test_cli_bad_cutout_is_one_line_and_exit_status_2(tmp_path):
    proc = subprocess.run(
        [str(BIN / "oneshot-retrain"), "genotype=NB201_RESNET", "data=digits", "retrain.cutout=16", f"run_dir={tmp_path / 'r'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: retrain.cutout=16 is out of range; valid: 0..1, the side of the Cutout square as a "
                     "fraction of the image side (DARTS' 16 px on 32 px images: 0.5); 0 = off"]  # fmt: skip
    assert not (tmp_path / "r").exists()
