"""Faults: a NaN loss stops the run with one line naming the step and keeps the last good
checkpoint; a run never overwrites an earlier run's directory; the genotype parser, fed random
and mutated strings, raises only its own error or returns a genotype that round-trips."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oneshot.genotypes import GenotypeError, parse, resolve

BIN = Path(sys.executable).parent
TINY = [
    "data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "logger.pictures=false",
    "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=0", "retrain.enabled=false",
]  # fmt: skip


def search(*args, cwd):
    return subprocess.run([str(BIN / "oneshot-search"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: epoch 0's one step is finite and checkpointed; the weights it leaves give NaN next.
    run_dir = tmp_path / "run"
    proc = search(f"hydra.run.dir={run_dir}", "strategy.w_optimizer.lr=1e30", "trainer.max_epochs=2", *TINY, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "is nan at epoch 1, step 1" in errors[0] and "last good checkpoint is kept" in errors[0]
    ckpts = run_dir / "checkpoints"
    # No validation (limit_val_batches=0): nothing ranks epochs, so last.ckpt alone; no temp files left.
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "genotype.txt").exists() and not (run_dir / "report.json").exists()


def test_a_new_run_never_overwrites_an_old_runs_directory(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"earlier run")
    (run_dir / "report.json").write_text("{}")
    proc = search(f"run_dir={run_dir}", *TINY, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert str(run_dir) in error and "ckpt_path=last" in error and "report.json" in error
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"earlier run"
    assert (run_dir / "report.json").read_text() == "{}" and not (run_dir / "config.yaml").exists()


def parses_cleanly(text: str) -> None:
    """``parse`` either refuses with a GenotypeError or gives a genotype that round-trips."""
    try:
        genotype = parse(text)
    except GenotypeError as e:
        assert str(e)  # a message, not an empty error
        return
    assert parse(str(genotype)) == genotype


VALID = [str(resolve(name)) for name in ("NB201_RESNET", "NB201_BEST_CIFAR10", "DARTS_V2", "PC_DARTS")]
# The characters genotypes are made of, so mutations stay near the grammar.
NEAR = "|+~0123456789_,()[]'\" =abcdeilmnoprstuvxyzGN"


@settings(max_examples=1000, deadline=None)
@given(st.text())
def test_parse_survives_random_strings(text):
    parses_cleanly(text)


@settings(max_examples=1000, deadline=None)
@given(st.text(alphabet=NEAR, max_size=120))
def test_parse_survives_strings_of_genotype_characters(text):
    parses_cleanly(text)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.sampled_from("dir"), st.floats(0, 1), st.sampled_from(NEAR)), min_size=1, max_size=4),
)
def test_parse_survives_mutations_of_valid_genotypes(text, edits):
    for kind, where, char in edits:  # delete, insert or replace one character
        i = int(where * len(text))
        text = text[:i] + (char if kind != "d" else "") + text[i + (kind != "i") :]
    parses_cleanly(text)


@pytest.mark.parametrize(
    "text",
    ["Genotype(normal=" + "[" * 100_000, "(" * 100_000, "|" + "nor_conv_3x3~0|" * 10_000, "Genotype(normal=[('x', 10**99)])"],
)
def test_parse_refuses_pathological_strings(text):
    with pytest.raises(GenotypeError):
        parse(text)
