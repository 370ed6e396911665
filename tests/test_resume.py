"""Resume and determinism: a search or retraining killed with SIGKILL in the middle of an epoch,
restarted in its run directory with ``ckpt_path=last``, ends exactly where an uninterrupted run
with the same seed ends; two runs with one seed give bit-identical architecture parameters."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import oneshot

BIN = Path(sys.executable).parent
# Augmentation stays on: a resumed run must replay its random crops too (RNG state restored).
TINY = ["data=digits", "data.batch_size=16", "logger.pictures=false", "seed=5", "trainer.log_every_n_steps=5"]
SPACE = ["space=nb201", "space.supernet.C=4", "space.supernet.N=1"]
SEARCH = [*TINY, *SPACE, "trainer.max_epochs=2", "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=1",
          "retrain.enabled=false"]  # fmt: skip
RETRAIN = [
    *TINY, "genotype=NB201_RESNET", "network.C=4", "network.N=1", "retrain.trainer.max_epochs=2",
    "+retrain.trainer.limit_train_batches=60", "+retrain.trainer.limit_val_batches=1", "+retrain.trainer.limit_test_batches=2",
]  # fmt: skip


def start(app, run_dir, *args):
    return subprocess.Popen(
        [str(BIN / app), f"hydra.run.dir={run_dir}", *args],
        cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc, timeout=600):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]


def run_killed_mid_epoch_then_resumed(app, run_dir, args):
    """Start, SIGKILL once the first epoch's checkpoint exists and the second epoch runs, resume."""
    ckpts = run_dir / "checkpoints"
    proc = start(app, run_dir, *args)
    deadline = time.monotonic() + 300
    # last.ckpt is written after epoch=000.ckpt (each by a rename): wait for both.
    while not ((ckpts / "epoch=000.ckpt").exists() and (ckpts / "last.ckpt").exists()):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.1)  # into the second (last) epoch, which takes a second or more here
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "epoch=001.ckpt").exists(), "killed too late: the second epoch had ended"
    killed_at = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert killed_at["epoch"] == 0
    finish(start(app, run_dir, *args, "ckpt_path=last"))
    return killed_at


def state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# Every strategy that trains; SPOS with an evolution small enough for a test.
STRATEGIES = {
    "darts": [],
    "gdas": ["strategy=gdas"],
    "drnas": ["strategy=drnas"],
    # A binding budget (expected cost 0.138 M params at the start): its dual multiplier moves every
    # step, so the alphas agree only if the checkpoint carries it across the kill.
    "darts-budget": ["budget=params", "budget.max=0.1", "cost.progress=false"],
    "spos": ["strategy=spos", "strategy.population=6", "strategy.generations=2", "strategy.top_k=2",
             "strategy.n_mutation=2", "strategy.n_crossover=2", "strategy.recalibration_batches=2",
             "strategy.eval_batches=2"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_search_killed_mid_epoch_resumes_to_the_uninterrupted_result(strategy, tmp_path):
    args = [*SEARCH, *STRATEGIES[strategy]]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start("oneshot-search", whole, *args))
    killed_at = run_killed_mid_epoch_then_resumed("oneshot-search", killed, args)
    # The report's search time is the whole run's: what the killed process had spent, and more.
    report = json.loads((killed / "report.json").read_text())
    assert 0 < killed_at["search_seconds"] < report["search_seconds"]

    a, b = state(whole / "checkpoints" / "last.ckpt"), state(killed / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)  # alphas and weights
    assert diff < 1e-5, diff
    if strategy == "darts-budget":
        budgets = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["budget"] for d in (whole, killed)]
        assert budgets[0]["multiplier"] > 0 and budgets[1]["multiplier"] == pytest.approx(budgets[0]["multiplier"])
        assert killed_at["budget"]["multiplier"] != budgets[0]["multiplier"]  # it moved after the kill
    assert (killed / "genotype.txt").read_text() == (whole / "genotype.txt").read_text()
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == sorted(
        p.name for p in (whole / "checkpoints").iterdir()
    )
    # The metrics file survived the kill and holds every epoch, each logged once.
    with open(killed / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    per_epoch = "search/w_lr" if strategy == "spos" else "arch/entropy"  # SPOS has no alphas
    epochs = [r["epoch"] for r in rows if r.get(per_epoch)]
    assert epochs == ["0", "1"]


@pytest.mark.slow
def test_retraining_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    finish(start("oneshot-retrain", whole, *RETRAIN))
    run_killed_mid_epoch_then_resumed("oneshot-retrain", killed, RETRAIN)
    a, b = torch.load(whole / "network.pt")["state_dict"], torch.load(killed / "network.pt")["state_dict"]
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff < 1e-5, diff


def test_same_seed_gives_bit_identical_alphas(tmp_path):
    args = [*TINY, *SPACE, "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=1",
            "retrain.enabled=false"]  # fmt: skip
    reports = [oneshot.search(oneshot.compose("search", [*args, f"run_dir={tmp_path / d}"])) for d in "ab"]
    a, b = (state(tmp_path / d / "checkpoints" / "last.ckpt") for d in "ab")
    assert torch.equal(a["supernet.alphas.cell"], b["supernet.alphas.cell"])
    assert reports[0]["genotype"] == reports[1]["genotype"]
    other = oneshot.search(oneshot.compose("search", [*args, "seed=6", f"run_dir={tmp_path / 'c'}"]))
    c = state(tmp_path / "c" / "checkpoints" / "last.ckpt")
    assert not torch.equal(a["supernet.alphas.cell"], c["supernet.alphas.cell"]) and other["genotype"]
