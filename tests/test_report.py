"""``oneshot-report``: the table of a real ``-m seed=0,1`` multirun, the mean ± std it computes,
and its error for a directory without runs."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from oneshot.report import Run, summarise

BIN = Path(sys.executable).parent


def test_summary_is_mean_and_sample_std_per_strategy_and_space():
    runs = [
        Run(Path(str(s)), s, "DartsSearch", "nb201", "g", acc)
        for s, acc in enumerate([0.5, 0.7, 0.9])
    ]
    runs += [
        Run(Path("x"), 0, "EnasSearch", "darts", "g", None),
        Run(Path("y"), 1, "EnasSearch", "darts", "g", 0.4),
    ]
    rows = summarise(runs)
    assert rows[0][:3] == ("DartsSearch", "nb201", 3)
    assert rows[0][3] == pytest.approx(0.7) and rows[0][4] == pytest.approx(
        statistics.stdev([0.5, 0.7, 0.9])
    )
    assert rows[1] == (
        "EnasSearch",
        "darts",
        1,
        0.4,
        0.0,
    )  # a run without an accuracy is not counted


@pytest.mark.slow
def test_report_of_a_real_multirun(tmp_path):
    fast = ["data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "trainer.max_epochs=1",
            "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "logger.pictures=false",
            "retrain.trainer.max_epochs=1", "+retrain.trainer.limit_train_batches=2",
            "+retrain.trainer.limit_val_batches=1", "space.network.C=4"]  # fmt: skip
    proc = subprocess.run([str(BIN / "oneshot-search"), "-m", "seed=0,1", *fast], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "search").iterdir()
    reports = [json.loads((sweep / str(i) / "report.json").read_text()) for i in (0, 1)]
    out = subprocess.run(
        [str(BIN / "oneshot-report"), str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    accs = [r["retrain"]["test_acc"] for r in reports]
    rows = [line for line in out.stdout.splitlines() if "DartsSearch" in line]
    assert len(rows) == 3  # two runs and their group
    for seed, report in enumerate(reports):
        (row,) = [r for r in rows if report["genotype"] in r and f"│ {seed} " in r]
        assert f"{100 * report['retrain']['test_acc']:.2f}" in row
    mean, std = statistics.fmean(accs), statistics.stdev(accs)
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in rows[-1]


def test_report_refuses_a_directory_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run(
        [str(BIN / "oneshot-report"), str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: no runs under {tmp_path / 'empty'}: a run directory holds report.json and config.yaml "
        "(give oneshot-search/oneshot-retrain output or multirun directories)"
    ]
