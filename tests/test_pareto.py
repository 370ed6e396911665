"""Issue 17: ``oneshot-report`` over a budget sweep - each run's cost and accuracy, the
non-dominated runs (checked against brute force), ``pareto.png``, W&B; and the ``cost`` that
``report.json`` holds, checked against the network rebuilt from the run's files."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from oneshot.pareto import cost_value, non_dominated
from oneshot.report import find_runs, main

BIN = Path(sys.executable).parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_front(points):
    """By the definition, over all pairs: i is dominated iff some j is no worse in both and
    strictly better in one."""
    dominated = set()
    for i, j in itertools.permutations(range(len(points)), 2):
        (ci, ai), (cj, aj) = points[i], points[j]
        if cj <= ci and aj >= ai and (cj, aj) != (ci, ai):
            dominated.add(i)
    return set(range(len(points))) - dominated


def test_non_dominated_set_equals_brute_force():
    rng = random.Random(0)
    for n in (1, 2, 3, 5, 8, 13):
        for _ in range(60):
            # few distinct values, so ties in cost, in accuracy and whole duplicate points occur
            points = [
                (rng.choice([0.5, 1.0, 1.5, 2.0]), rng.choice([0.1, 0.2, 0.3, 0.4]))
                for _ in range(n)
            ]
            assert non_dominated(points) == brute_force_front(points), points
    assert non_dominated([(1.0, 0.5), (1.0, 0.5)]) == {0, 1}  # equal runs are both on the front
    assert non_dominated([(1.0, 0.5), (2.0, 0.5), (2.0, 0.9)]) == {0, 2}


def cost(params, mflops, ms, budget=None):
    c = {"parameters": params, "flops": int(mflops * 1e6), "batch_size": 1,
         "latency": {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "repeats": 5, "device": "cpu",
                     "device_name": "x", "threads": 1}}  # fmt: skip
    if budget is not None:
        c["budget"] = {"metric": "latency", "unit": "ms", "max": budget, "measured": ms, "table": ms,
                       "within": ms <= budget, "table_within": ms <= budget}  # fmt: skip
    return c


def write_run(path: Path, seed, acc, cost_=None, budget=None, wandb=False) -> Path:
    path.mkdir(parents=True)
    config = {"seed": seed, "name": "search", "budget": {"metric": "latency", "max": budget},
              "data": {"name": "digits"}, "space": {"name": "nb201"}}  # fmt: skip
    if wandb:
        config["logger"] = {"wandb": {"_target_": "pytorch_lightning.loggers.WandbLogger", "project": "oneshot",
                                      "entity": None, "group": None, "mode": "offline"}}  # fmt: skip
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    report = {"genotype": f"g{path.name}", "space": "nb201", "strategy": "DartsSearch",
              "retrain": {"test_acc": acc}, **({"cost": cost_} if cost_ is not None else {})}  # fmt: skip
    (path / "report.json").write_text(json.dumps(report))
    return path


def sweep(tmp_path, wandb=False):
    """Four budgeted runs and one older run without a cost; run 1 is dominated by run 2."""
    specs = [(0.60, cost(1000, 1.0, 1.0, 1.0)), (0.62, cost(3000, 3.0, 3.0, 3.0)), (0.70, cost(2000, 2.0, 2.0, 2.0)),
             (0.75, cost(4000, 4.0, 4.0, 4.0)), (0.80, None)]  # fmt: skip
    for i, (acc, c) in enumerate(specs):
        write_run(
            tmp_path / str(i), i, acc, c, budget=c["budget"]["max"] if c else None, wandb=wandb
        )
    return tmp_path


def tradeoff_rows(out: str) -> list[list[str]]:
    """The cells of the cost-and-accuracy table in oneshot-report's output."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "cost and accuracy" in line)
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in lines[start:]
            if line.startswith("│")]  # fmt: skip


def test_report_prints_costs_marks_the_front_and_draws_a_png(tmp_path, capsys):
    main([str(sweep(tmp_path))])
    out = capsys.readouterr().out
    rows = tradeoff_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4"], (
        out
    )  # every run, the one without a cost too
    assert rows[4][1:5] == ["-", "-", "-", "-"] and rows[4][5] == "0.8000"
    assert rows[0][1:5] == ["latency <= 1 ms", "0.001", "1", "1"]
    front = {r[0] for r in rows if r[-1] == "*"}
    assert front == {"0", "2", "3"}  # run 1 costs more than run 2 and is less accurate
    assert "pareto front: 3 of 4 runs non-dominated" in out
    png = tmp_path / "pareto.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    runs = find_runs([tmp_path])
    assert [cost_value(r.cost, "latency") for r in runs] == [1.0, 3.0, 2.0, 4.0, None]
    assert [cost_value(r.cost, "params") for r in runs][:2] == [0.001, 0.003]


def test_a_run_without_cost_or_accuracy_is_reported_not_a_crash(tmp_path, capsys):
    write_run(tmp_path / "a", 0, None, cost(1000, 1.0, 1.0))
    write_run(tmp_path / "b", 1, 0.5, {"parameters": "many"})  # a damaged cost: shown as dashes
    write_run(tmp_path / "c", 2, 0.5)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "no pareto figure: 0 run(s) with both a cost and a test accuracy" in out
    assert not (tmp_path / "pareto.png").exists()


def test_front_is_logged_to_wandb_when_the_runs_used_it(tmp_path, capsys):
    main([str(sweep(tmp_path, wandb=True)), "--cost", "flops"])
    out = capsys.readouterr().out
    assert f"logged to W&B (offline): group search-{tmp_path.name}" in out
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (image,) = (run / "files" / "media" / "images" / "pareto").glob("front_*.png")
    assert image.read_bytes()[:8] == PNG_MAGIC
    (table,) = (run / "files" / "media" / "table" / "pareto").glob("runs_*.table.json")
    data = json.loads(table.read_text())
    assert [row[-1] for row in data["data"]] == ["*", "", "*", "*", ""]


# ---- the real apps: a budget sweep, then oneshot-report ------------------------------------------

TINY = ["data=digits", "data.batch_size=16", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "retrain.trainer.max_epochs=1", "+retrain.trainer.limit_train_batches=2",
        "+retrain.trainer.limit_val_batches=1", "retrain.export=[]", "cost.repeats=5", "cost.warmup=1",
        "logger.pictures=false"]  # fmt: skip


@pytest.mark.slow
def test_budget_sweep_then_report(tmp_path):
    import oneshot

    env = {
        "OMP_NUM_THREADS": "1",
        "PATH": str(BIN),
        "HOME": str(tmp_path),
        "WANDB_MODE": "disabled",
    }
    done = subprocess.run([str(BIN / "oneshot-search"), "-m", "budget=params", "budget.max=0.08,0.12,0.3",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", *TINY], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for job, budget in enumerate((0.08, 0.12, 0.3)):
        run = tmp_path / "sweep" / str(job)
        report = json.loads((run / "report.json").read_text())
        c = report["cost"]
        # the cost is the retrained network's, recomputed here from its weights file
        net = oneshot.load_network(run / "retrain" / "network.pt")
        assert c["parameters"] == sum(
            p.numel() for n, p in net.named_parameters() if "auxiliary" not in n
        )
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(torch.zeros(1, 1, 8, 8))
        assert c["flops"] == counter.get_total_flops()
        assert (
            c["budget"]["max"] == budget
            and c["budget"]["within"]
            and c["parameters"] / 1e6 <= budget
        )
        assert c["budget"]["table"] == pytest.approx(
            c["parameters"] / 1e6
        )  # params are additive, exactly
        assert c["latency"]["median_ms"] > 0 and c["latency"]["repeats"] == 5
    shown = subprocess.run([str(BIN / "oneshot-report"), str(tmp_path / "sweep")], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "cost and accuracy (front by params, M params)" in shown.stdout
    assert shown.stdout.count("params <= ") == 3
    assert (tmp_path / "sweep" / "pareto.png").read_bytes()[:8] == PNG_MAGIC
