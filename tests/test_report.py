"""``oneshot-report``: runs are grouped by every config value that differs between them (not
only strategy and space), a group of one shows no spread, accuracies are fractions as the apps
print them; the table of a real ``-m seed=0,1`` multirun; its error for a directory without runs."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from oneshot.report import Run, find_runs, render, setting_keys, summarise

BIN = Path(sys.executable).parent


def write_run(path: Path, seed: int, acc, data="digits", C=4, strategy="DartsSearch", **config) -> Path:
    path.mkdir(parents=True)
    cfg = {"seed": seed, "data": {"name": data, "root": f"/tmp/{seed}"}, "space": {"name": "nb201",
           "supernet": {"_target_": "x.Net", "C": C, "N": 1}}, "warmstart": {"seed": seed}, **config}  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = {"genotype": f"g{seed}", "space": "nb201", "strategy": strategy,
              "retrain": {"test_acc": acc, "network": {"C": 16, "N": 1}}}  # fmt: skip
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_groups_by_every_differing_config_value_and_not_by_seed(tmp_path):
    accs = {("digits", 4): [0.5, 0.7, 0.9], ("digits", 8): [0.6], ("mnist", 4): [0.3, 0.4]}
    for (data, C), values in accs.items():
        for seed, acc in enumerate(values):
            write_run(tmp_path / f"{data}{C}" / str(seed), seed, acc, data=data, C=C)
    runs = find_runs([tmp_path])
    # data.root differs but says where, not what; warmstart.seed is the seed (${seed})
    assert setting_keys(runs) == ["data.name", "space.supernet.C"]
    rows = {setting: (n, mean, std) for setting, n, mean, std in summarise(runs)}
    assert set(rows) == {("DartsSearch", "nb201", d, str(c)) for d, c in accs}
    for (data, C), values in accs.items():
        n, mean, std = rows["DartsSearch", "nb201", data, str(C)]
        assert n == len(values) and mean == pytest.approx(statistics.fmean(values))
        assert std == (pytest.approx(statistics.stdev(values)) if len(values) > 1 else None)


def test_keys_of_another_strategy_do_not_split_groups(tmp_path):
    """ENAS runs have no ``strategy.order``: the strategy already tells them apart."""
    runs = [Run(Path("a"), 0, "DartsSearch", "nb201", "g", 0.5, {"strategy.order": "1", "data.name": "digits"}),
            Run(Path("b"), 1, "DartsSearch", "nb201", "g", 0.7, {"strategy.order": "1", "data.name": "digits"}),
            Run(Path("c"), 0, "EnasSearch", "nb201", "g", None, {"strategy.controller_every": "1", "data.name": "digits"}),
            Run(Path("d"), 1, "EnasSearch", "nb201", "g", 0.4, {"strategy.controller_every": "1", "data.name": "digits"})]  # fmt: skip
    assert setting_keys(runs) == []
    rows = summarise(runs)
    assert [(s, n) for s, n, _, _ in rows] == [(("DartsSearch", "nb201"), 2), (("EnasSearch", "nb201"), 1)]
    assert rows[1][2:] == (0.4, None)  # a run without an accuracy is not counted; one run, no std


def test_table_shows_fractions_data_and_sizes_and_no_spread_for_one_run(tmp_path):
    write_run(tmp_path / "a", 0, 0.615, C=4)
    write_run(tmp_path / "b", 0, 0.5, C=8)
    write_run(tmp_path / "c", 1, 0.7, C=8)
    console = Console(width=250, record=True)
    render(find_runs([tmp_path]), console)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "genotype" in line)
    assert all(col in header for col in ("data", "sizes", "test acc"))
    assert "C=4 N=1 -> C=16 N=1" in text and "│ digits " in text
    (one,) = [line for line in text.splitlines() if line.startswith("│ DartsSearch") and "│ 4 " in line]
    assert "0.6150" in one and "±" not in one  # a group of one: its accuracy, no "± 0.0000"
    (two,) = [line for line in text.splitlines() if line.startswith("│ DartsSearch") and "│ 8 " in line]
    assert f"0.6000 ± {statistics.stdev([0.5, 0.7]):.4f}" in two
    assert "61.50" not in text  # one unit: fractions, as the apps print them


@pytest.mark.slow
def test_report_of_a_real_multirun(tmp_path):
    fast = ["data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger.pictures=false",
            "retrain.trainer.max_epochs=1", "retrain.trainer.limit_train_batches=2",
            "retrain.trainer.limit_val_batches=1", "space.network.C=4"]  # fmt: skip
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
    assert len(rows) == 3  # two runs and their group (the runs differ only by their seed)
    for seed, report in enumerate(reports):
        (row,) = [r for r in rows if report["genotype"] in r and f"│ {seed} " in r]
        assert f"{report['retrain']['test_acc']:.4f}" in row and "digits" in row and "C=4 N=1 -> C=4 N=1" in row
    assert f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f}" in rows[-1]


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
