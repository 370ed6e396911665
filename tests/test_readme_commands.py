"""Every command of the README's "Using it" block, read from README.md, runs through the real app
(shrunk: the embedded digits, tiny networks, one epoch of two batches, no retraining where the
command allows); the GPU commands are refused in one line on a machine without a GPU."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# One thread: nets this small gain nothing from two, and on a shared 2-core machine OpenMP's
# hand-off made a 2-step DARTS search take 37 s instead of 5 s.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Using it\s+```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


COMMANDS = readme_commands()
GPU = re.compile(r"trainer=ddp\b(?!_cpu)|experiment=\w*cifar10")  # the README marks these (GPU)
DATA = ["data=digits", "data.batch_size=16", "logger.pictures=false"]
EPOCH = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
PRUNE = ["num_inits=1", "n_crops=50", "images=40", "ntk_batch=8"]  # TE-NAS at its smallest
RETRAIN = ["retrain.trainer.max_epochs=1", "retrain.trainer.limit_train_batches=2", "retrain.trainer.limit_val_batches=1"]


def key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~")


def shrink(app: str, args: list[str]) -> list[str]:
    """The command's own arguments, with tiny values for the keys it sets and tiny extra ones."""
    tiny = [*DATA, *RETRAIN]
    if app == "oneshot-search":
        darts = "space=darts" in args
        tiny += ["space.supernet.C=4", "space.supernet.layers=3" if darts else "space.supernet.N=1", *EPOCH]
        tiny += [] if "retrain.enabled=false" in args else ["retrain.enabled=false"]
        tiny += [f"strategy.{o}" for o in PRUNE] if "strategy=tenas" in args else []
        tiny += [f"warmstart.{o}" for o in PRUNE] if "warmstart=tenas" in args else []
        tiny += ["strategy.derive_samples=2"] if "strategy=enas" in args else []  # 100 to score by default
        if "trainer.max_steps=200" in args:  # two batches an epoch, 3 steps: ends inside epoch 2
            tiny = [a for a in tiny if key(a) != "trainer.max_epochs"]
            tiny += ["trainer.max_steps=3", "trainer.max_epochs=5", "trainer.log_every_n_steps=1"]
    elif app == "oneshot-retrain":
        tiny += ["network.C=4", "network.N=1"]
    ours = {key(a) for a in tiny}
    return [a for a in args if key(a) not in ours] + tiny


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return {"cwd": tmp_path_factory.mktemp("readme"), "done": {}}


def run_line(work, line: str) -> subprocess.CompletedProcess:
    """Run a README line once (shrunk), after the lines whose outputs it reads."""
    if line in work["done"]:
        return work["done"][line]
    cwd = work["cwd"]
    app, *args = shlex.split(line, comments=True)
    run_dir = cwd / "run"
    if "RUN_DIR" in line or "genotype.txt" in line:  # a run made by the README's own command
        first = next(c for c in COMMANDS if c.split("#")[0].split() == ["oneshot-search", "retrain.enabled=false"])
        assert run_line(work, first + f" hydra.run.dir={run_dir}").returncode == 0
    if "<date>" in line:
        sweep = next(c for c in COMMANDS if " -m " in c)
        assert run_line(work, sweep).returncode == 0
        (found,) = (cwd / "multirun" / "search").iterdir()
        args = [str(found) if "<date>" in a else a for a in args]
    args = [a.replace("RUN_DIR", str(run_dir)) for a in args]
    args = [f"genotype={run_dir / 'genotype.txt'}" if a.startswith("genotype=outputs/") else a for a in args]
    if app in ("oneshot-search", "oneshot-retrain") and "--help" not in args and not GPU.search(line):
        args = shrink(app, args)
    if "trainer.max_steps" in line:
        args.append(f"hydra.run.dir={cwd / 'steps'}")
    before = set(cwd.rglob("*"))
    proc = subprocess.run([str(BIN / app), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    proc.made = set(cwd.rglob("*")) - before
    work["done"][line] = proc
    return proc


@pytest.mark.parametrize("line", COMMANDS)
def test_readme_command_runs(work, line):
    if GPU.search(line) and torch.cuda.is_available():
        pytest.skip("a GPU command: runs for real on this machine, too long for the suite")
    proc = run_line(work, line)
    if GPU.search(line):  # refused before anything is made: one line naming what would work here
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "needs a CUDA GPU" in errors[0] and "trainer=cpu" in errors[0]
        assert not proc.made  # nothing on disk
        return
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    assert "error:" not in proc.stderr
    if "--help" in line:
        assert "trainer:" in proc.stdout
    if "oneshot-report" in line:
        assert proc.stdout.count("DartsSearch") == 4 + 1  # four seeds and their group


def test_max_steps_counts_search_steps(work):
    """``trainer.max_steps=3`` with two batches an epoch: three architecture + weight steps, so
    the search stops one batch into its second epoch (not after 1.5 steps, as when Lightning
    counted every optimizer's step). On 2 CPU processes (``trainer.devices=2``)."""
    (line,) = [c for c in COMMANDS if "trainer.max_steps" in c]
    assert run_line(work, line).returncode == 0
    run_dir = work["cwd"] / "steps"
    with open(run_dir / "metrics.csv", newline="") as f:
        steps = [row for row in csv.DictReader(f) if row.get("train/loss")]  # logged every step here
    assert len(steps) == 3
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["genotypes_per_epoch"]) == 2  # epoch 0 whole, epoch 1 stopped after its first step
