"""The installed command-line apps, as a user runs them: help, overrides, multirun, and one clear
line (no traceback) for every kind of bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oneshot.genotypes import resolve

BIN = Path(sys.executable).parent
FAST = ["+trainer.fast_dev_run=true", "data=digits", "data.batch_size=8"]


def run(app, *args, cwd, timeout=300):
    env = {**os.environ, "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([str(BIN / app), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_groups(tmp_path):
    out = run("oneshot-search", "--help", cwd=tmp_path).stdout
    for group in ("space:", "strategy:", "data:", "trainer:", "logger:", "experiment:", "warmstart:", "retrain:"):
        assert group in out
    assert "nb201" in out and "darts" in out and "ddp_cpu" in out


BAD_INPUT = [
    # (app, args, exit code, what the one message must name)
    ("oneshot-search", ["space=nb301"], 1, ["nb301", "nb201", "darts"]),
    ("oneshot-search", ["strategy=nsga"], 1, ["nsga", "darts", "gdas"]),
    ("oneshot-search", ["data.name=imagenet"], 2, ["imagenet", "mnist_embedded", "cifar10"]),
    ("oneshot-search", ["seed=[1"], 1, ["[1", "override_grammar"]),
    ("oneshot-search", ["no_such_key=1"], 1, ["no_such_key"]),
    ("oneshot-search", ["space=darts", "space.supernet.C=5"], 2, ["C=5"]),
    ("oneshot-search", ["strategy.order=3"], 2, ["order", "3"]),
    ("oneshot-search", ["data=cifar10", "data.download=false", "data.root=ROOT"], 2, ["CIFAR10", "ROOT"]),
    # NB201 strings hold Hydra's special characters (~, |, +): quote them inside the override.
    ("oneshot-retrain", ["genotype='|nor_conv_3x3~0|+|none~0|'"], 2, ["node 2 needs 2 edges"]),
    ("oneshot-retrain", ["genotype=DARTS_V3"], 2, ["DARTS_V3", "DARTS_V2", "NB201_RESNET"]),
    ("oneshot-retrain", ["genotype='|conv_9x9~0|+|none~0|none~1|+|none~0|none~1|none~2|'"], 2, ["conv_9x9", "nor_conv_3x3"]),
    ("oneshot-retrain", [], 2, ["genotype is required"]),
    # A genotype that does not fit its space: sizes of the other space, an op of the other space.
    ("oneshot-retrain", ["genotype=NB201_RESNET", "network.layers=8"], 2, ["network.layers=8", "nb201", "network.N"]),
    ("oneshot-retrain", [f'genotype="{str(resolve("DARTS_V2")).replace("sep_conv_3x3", "nor_conv_3x3", 1)}"'], 2,
     ["nor_conv_3x3", "sep_conv_3x3"]),
    ("oneshot-search", ["data=imagenet"], 1, ["imagenet", "digits"]),
    # Overrides of the wrong type name the key, the expected type and the default.
    ("oneshot-search", ["seed=abc"], 2, ["seed=abc", "integer", "default is 0"]),
    ("oneshot-search", ["strategy.w_optimizer.lr=fast"], 2, ["strategy.w_optimizer.lr=fast", "a number"]),
    ("oneshot-search", ["trainer.max_epochs=1.5"], 2, ["trainer.max_epochs=1.5", "integer"]),
]


@pytest.mark.parametrize(("app", "args", "code", "names"), BAD_INPUT, ids=[" ".join(a[1]) or a[0] for a in BAD_INPUT])
def test_bad_input_gives_one_clear_error(app, args, code, names, tmp_path):
    root = tmp_path / "no-data"
    args = [a.replace("ROOT", str(root)) for a in args]
    fast = [f for f in FAST if not (f.startswith("data=") and any(a.startswith("data=") for a in args))]
    proc = run(app, *args, *fast, cwd=tmp_path)
    message = proc.stderr + proc.stdout
    assert proc.returncode == code, message
    assert "Traceback" not in message
    for name in names:
        assert name.replace("ROOT", str(root)) in message, (name, message)


def test_bad_input_leaves_earlier_outputs_alone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "genotype.txt").write_text("precious\n")
    proc = run("oneshot-search", f"run_dir={run_dir}", "space=darts", "space.supernet.C=5", *FAST, cwd=tmp_path)
    assert proc.returncode == 2
    assert (run_dir / "genotype.txt").read_text() == "precious\n"


@pytest.mark.slow
def test_search_app_runs_and_multirun_makes_one_directory_per_job(tmp_path):
    proc = run("oneshot-search", "-m", "seed=0,1", "retrain.enabled=false", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    genotypes = sorted(tmp_path.glob("multirun/search/*/*/genotype.txt"))
    assert len(genotypes) == 2
    seeds = {json.loads((g.parent / "report.json").read_text())["genotype"] for g in genotypes}
    assert seeds  # both jobs derived a genotype
    assert (genotypes[0].parent / "config.yaml").read_text().count("seed: 0") == 1


@pytest.mark.slow
def test_configs_ship_in_the_wheel(tmp_path):
    if shutil.which("unzip") is None and sys.version_info < (3, 8):
        pytest.skip("no unzip")
    import zipfile

    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("oneshot-*.whl"))).namelist()
    for required in ("oneshot/conf/search.yaml", "oneshot/conf/retrain.yaml", "oneshot/conf/space/nb201.yaml",
                     "oneshot/conf/strategy/darts.yaml", "oneshot/lightning_modules/darts.py", "oneshot/spaces/darts.py"):  # fmt: skip
        assert required in names
    # No generic top-level module that could clash in a user's environment (issue 14, item 9).
    assert {name.split("/")[0] for name in names if not name.startswith("oneshot-")} == {"oneshot"}


def test_well_typed_overrides_pass_the_type_check(tmp_path):
    # A list default (tags) takes a list, a float default an int: neither is a type error.
    proc = run("oneshot-search", "logger=wandb", "logger.wandb.tags=[a,b]", "logger.wandb.mode=disabled",
               "strategy.w_optimizer.lr=1", "retrain.enabled=false", f"run_dir={tmp_path / 'run'}", *FAST,
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "genotype.txt").exists()


# ---- the command line as Lightning and Hydra users write it (issue 14) ----


def test_trainer_args_are_lightnings():
    """The apps check trainer.<arg> against a list kept without importing Lightning: it must be
    the installed Trainer's parameters and defaults, so an upgrade that adds one fails here."""
    import inspect

    import pytorch_lightning as pl

    from oneshot.cli import TRAINER_ARGS

    params = inspect.signature(pl.Trainer.__init__).parameters
    assert TRAINER_ARGS == {n: p.default for n, p in params.items() if n != "self"}


def test_overrides_are_rewritten_into_hydras_grammar():
    from oneshot.cli import rewrite_overrides
    from oneshot.validate import ConfigError

    args = ["experiment=null", "warmstart=null", "seed=null", "trainer.max_steps=200", "trainer.max_epochs=3",
            "retrain.trainer.precision=bf16-mixed", "retrain.trainer.max_epochs=2", "+trainer.benchmark=true",
            "-m", "--cfg", "job", "hydra.run.dir=x"]  # fmt: skip
    expected = ["~experiment", "~warmstart", "seed=null", "++trainer.max_steps=200", "trainer.max_epochs=3",
                "++retrain.trainer.precision=bf16-mixed", "retrain.trainer.max_epochs=2", "+trainer.benchmark=true",
                "-m", "--cfg", "job", "hydra.run.dir=x"]  # fmt: skip
    assert rewrite_overrides(args) == expected
    assert rewrite_overrides(expected) == expected  # DDP ranks rerun the rewritten command
    for bad in ("trainer.max_step=2", "++retrain.trainer.foo=1", "trainer.logger=false"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].lstrip("+")):
            rewrite_overrides([bad])


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["trainer.foo=1"], ["trainer.foo=1", "not a Lightning Trainer argument", "max_steps", "accumulate_grad_batches"]),
        (["+trainer.max_steps=abc"], ["trainer.max_steps=abc", "an integer"]),
        (["trainer.deterministic=maybe"], ["trainer.deterministic=maybe", "true or false"]),
        (["objective=test_acc"], ["objective=test_acc", "retrain/val_acc", "search/val_acc"]),
        (["retrain.val_split=0"], ["objective=retrain/val_acc", "retrain.val_split"]),
    ],
)
def test_bad_trainer_arguments_and_objectives_are_one_line(args, names, tmp_path):
    proc = run("oneshot-search", *args, *FAST, cwd=tmp_path, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for name in names:
        assert name in errors[0]
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a directory


def test_group_null_and_trainer_arguments_compose(tmp_path):
    proc = run("oneshot-search", "experiment=null", "trainer.max_steps=200", "retrain.trainer.benchmark=true",
               "--cfg", "job", cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(proc.stdout)
    assert cfg["size"] == "paper" and cfg["trainer"]["max_epochs"] == 50  # no quickstart bundle
    assert cfg["trainer"]["max_steps"] == 200 and cfg["retrain"]["trainer"]["benchmark"] is True
