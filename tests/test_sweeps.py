"""Sweeps through Hydra's plugins (the ``sweep`` extra): ``oneshot-search`` returns its objective
to the sweeper; an Optuna study of two trials records the best of the objectives the runs wrote;
the submitit launcher runs each job in its own process and run directory, which
``oneshot-report`` summarises. Skipped where the plugins are not installed."""

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oneshot.cli import objective_value

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny nets: a second thread only waits on a busy CPU
TINY = [
    "data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "logger.pictures=false",
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
]  # fmt: skip
RETRAIN = ["space.network.C=4", "retrain.trainer.max_epochs=1", "retrain.trainer.limit_train_batches=2",
           "retrain.trainer.limit_val_batches=1"]  # fmt: skip


def last_val_acc(run_dir: Path) -> float:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    return [float(r["val/acc"]) for r in rows if r.get("val/acc")][-1]


def test_objective_is_the_configured_accuracy(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc,train/loss\n0,1,0.25,\n0,1,,2.0\n1,2,0.5,\n1,2,,1.0\n")
    report = {"retrain": {"val_acc": 0.7, "test_acc": 0.6}}
    assert objective_value(report, tmp_path) == 0.7  # default: validation, never the test set
    assert objective_value(report, tmp_path, "retrain/test_acc") == 0.6
    assert objective_value(report, tmp_path, "search/val_acc") == 0.5  # the search's last val/acc
    assert objective_value({}, tmp_path, "retrain/val_acc") == 0.5  # no retraining: the search's
    assert objective_value({"retrain": {"val_acc": None}}, tmp_path) is None  # val_split=0: none
    assert objective_value({}, tmp_path / "nothing") is None


@pytest.mark.slow
def test_optuna_sweep_optimises_the_returned_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1",
            *TINY, *RETRAIN]  # fmt: skip
    proc = subprocess.run([str(BIN / "oneshot-search"), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "search").iterdir()
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    lrs = [yaml.safe_load((t / "config.yaml").read_text())["strategy"]["w_optimizer"]["lr"] for t in trials]
    assert lrs[0] != lrs[1] and all(0.005 <= lr <= 0.1 for lr in lrs)  # the study's own draws
    objectives = [json.loads((t / "retrain" / "report.json").read_text())["val_acc"] for t in trials]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(objectives))  # the study saw what the runs measured


@pytest.mark.slow
def test_submitit_jobs_run_in_their_own_processes_and_report_summarises_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = ["-m", "hydra/launcher=submitit_local", "seed=0,1", "retrain.enabled=false", *TINY]
    proc = subprocess.run([str(BIN / "oneshot-search"), *args], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "search").iterdir()
    runs = [sweep / "0", sweep / "1"]
    assert all((r / "report.json").is_file() for r in runs)
    # Local submitit jobs are named by their process id: two jobs, two processes.
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2
    for job in jobs:  # what each job returned to the launcher: its objective (no retraining: search/val_acc)
        status, ret = pickle.loads((job / f"{job.name}_0_result.pkl").read_bytes())  # written by submitit here
        assert status == "success"
        assert ret.return_value == pytest.approx(last_val_acc(runs[ret.hydra_cfg.hydra.job.num]))
    out = subprocess.run([str(BIN / "oneshot-report"), str(sweep)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    genotypes = [json.loads((r / "report.json").read_text())["genotype"] for r in runs]
    rows = [line for line in out.stdout.splitlines() if "DartsSearch" in line]
    assert len(rows) == 3 and all(any(g in row for row in rows) for g in genotypes)  # 2 runs, 1 group (seeds)
