"""Output a person can read: a piped run shows our lines (one per epoch, with its numbers, as
fractions) and errors, not the libraries' banners, tips and warnings; the TE-NAS prune says
something every round."""

import csv
import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits

from oneshot.prune import prune
from oneshot.quiet import quiet_libraries

BIN = Path(sys.executable).parent
TINY = [
    "data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "logger.pictures=false",
    "trainer.max_epochs=2", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
    "retrain.trainer.max_epochs=1", "+retrain.trainer.limit_train_batches=2", "+retrain.trainer.limit_val_batches=2",
    "+retrain.trainer.limit_test_batches=2",
]  # fmt: skip
NOISE = re.compile(r"GPU available|TPU available|Tip:|Seed set to|Warning|deprecated|does not have many workers|litlogger")
FRACTION = r"(0\.\d{4}|1\.0000)"


def test_a_piped_run_shows_our_lines_and_no_library_noise(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(BIN / "oneshot-search"), f"hydra.run.dir={run_dir}", *TINY], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not proc.stderr.strip(), proc.stderr[-3000:]  # no warnings, no tracebacks
    noise = [line for line in proc.stdout.splitlines() if NOISE.search(line)]
    assert not noise, noise
    assert max(len(line) for line in proc.stdout.splitlines()) < 400  # no progress bar redrawn in one line

    # One line per search epoch with its numbers, the validation accuracy the one metrics.csv holds.
    with open(run_dir / "metrics.csv", newline="") as f:
        val_acc = {int(r["epoch"]): float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")}
    for epoch in (0, 1):
        line = re.search(rf"epoch {epoch}: train loss \S+ acc {FRACTION}, val loss \S+ acc {FRACTION}, genotype \|",
                         proc.stdout)  # fmt: skip
        assert line, proc.stdout[-3000:]
        assert line[2] == f"{val_acc[epoch]:.4f}"  # the same number, printed to 4 places (0.03125 -> 0.0312)
    assert re.search(rf"retrain epoch 0: train loss \S+ acc {FRACTION}, val loss \S+ acc {FRACTION}\n", proc.stdout)
    test_acc = json.loads((run_dir / "report.json").read_text())["retrain"]["test_acc"]
    assert 0 <= test_acc <= 1 and f"test accuracy: {test_acc}" in proc.stdout


def test_quiet_drops_the_noise_and_keeps_what_it_did_not_foresee(caplog):
    quiet_libraries()
    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO):
        lightning.info("GPU available: False, used: False")
        lightning.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logging.getLogger("lightning_fabric.utilities.seed").info("Seed set to 0")
        lightning.info("Restoring states from the checkpoint path at run/checkpoints/last.ckpt")
        lightning.warning("GPU available: but something is wrong")  # warnings and errors always pass
    assert [r.getMessage() for r in caplog.records] == [
        "Restoring states from the checkpoint path at run/checkpoints/last.ckpt",
        "GPU available: but something is wrong",
    ]


@pytest.mark.parametrize("space, kwargs", [
    ("nb201", {"C": 1, "primitives": ("none", "skip_connect", "nor_conv_3x3", "avg_pool_3x3")}),
    ("darts", {"steps": 2, "multiplier": 2, "primitives": ("none", "skip_connect", "sep_conv_3x3", "avg_pool_3x3")}),
])  # fmt: skip
def test_a_piped_prune_logs_one_line_per_round(space, kwargs, caplog, monkeypatch, one_thread):
    """Piped, a prune that takes minutes per round says so every round: round i of N, where N is
    the number of rounds it then takes (DARTS: op rounds, then edge rounds)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar, plain lines
    x = torch.tensor(load_digits().images[:100], dtype=torch.float32)
    images = ((x - x.mean()) / x.std())[:, None].repeat(1, 3, 1, 1)
    caplog.set_level(logging.INFO, logger="oneshot.prune")
    result = prune(space, images, 1, num_inits=1, ntk_batch=4, n_crops=200, progress=True, **kwargs)
    line = re.compile(r"TE-NAS round (\d+) \((\d+) of (\d+), (ops|edges)\): \d+ networks x 1 inits, \d+ s in")
    lines = [m.group(1, 2, 3, 4) for r in caplog.records if (m := line.fullmatch(r.getMessage()))]
    rounds = 1 + max(row.round for row in result.history)
    assert [g[:3] for g in lines] == [(str(i), str(i + 1), str(rounds)) for i in range(rounds)]
    assert (lines[-1][3] == "edges") == (space == "darts")
