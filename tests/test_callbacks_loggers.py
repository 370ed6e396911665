"""Callbacks and loggers from config (conf/callbacks/, conf/logger/), the checkpoint policy (last +
the best k by a monitored metric) and ``Module.load_from_checkpoint`` for every module."""

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oneshot.lightning_modules.darts import DartsSearch
from oneshot.lightning_modules.enas import EnasSearch
from oneshot.lightning_modules.pictures import ArchitecturePictures
from oneshot.lightning_modules.retrain import Retrain
from oneshot.lightning_modules.run_safety import RunCheckpoint
from oneshot.lightning_modules.runs import RNGState, RunCSVLogger, make_callbacks, make_loggers
from oneshot.lightning_modules.tenas import TenasSearch
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, Timer
from pytorch_lightning.loggers import CSVLogger

import oneshot

BIN = Path(sys.executable).parent
TINY = [
    "data=digits", "data.batch_size=16", "space.supernet.C=4", "space.supernet.N=1", "trainer.max_epochs=3",
    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2", "retrain.trainer.max_epochs=2",
    "+retrain.trainer.limit_train_batches=2", "+retrain.trainer.limit_val_batches=1", "+retrain.trainer.limit_test_batches=1",
]  # fmt: skip


def test_callbacks_and_loggers_are_built_from_the_config_with_the_run_paths(tmp_path):
    cfg = oneshot.compose("search", [
        "callbacks=[default,early_stopping]", "callbacks.lr_monitor=null", "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer",
        "+callbacks.timer.duration=00:01:00:00", "+logger.plain._target_=pytorch_lightning.loggers.CSVLogger",
        "+logger.plain.save_dir=null", "+logger.plain.name=plain",
    ])  # fmt: skip
    callbacks = make_callbacks(cfg, tmp_path)
    kinds = [type(c) for c in callbacks]
    # pytest captures stderr, so it is no terminal: no progress bar (one plain line per epoch instead)
    assert kinds == [RunCheckpoint, RNGState, ArchitecturePictures, EarlyStopping, Timer]
    ckpt = callbacks[0]
    assert ckpt.dirpath == str(tmp_path / "checkpoints") and callbacks[2].plots_dir == tmp_path / "plots"
    assert (ckpt.monitor, ckpt.mode, ckpt.save_top_k, ckpt.save_last) == ("val/acc", "max", 1, True)
    assert not any(isinstance(c, LearningRateMonitor) for c in callbacks)

    # No validation: nothing to rank by or stop on, so last.ckpt only and no early stopping.
    no_val = make_callbacks(cfg, tmp_path, validates=False)
    assert (no_val[0].monitor, no_val[0].save_top_k) == (None, 0)
    assert not any(isinstance(c, EarlyStopping) for c in no_val)
    every = oneshot.compose("search", ["callbacks.model_checkpoint.save_top_k=-1"])
    assert make_callbacks(every, tmp_path, validates=False)[0].save_top_k == -1

    loggers = make_loggers(cfg, tmp_path)
    assert [type(lg) for lg in loggers] == [RunCSVLogger, CSVLogger]
    assert Path(loggers[0].log_dir) == tmp_path and loggers[1].log_dir.startswith(str(tmp_path / "plain"))
    # logger=none keeps the run's own metrics.csv and draws no pictures
    none = oneshot.compose("search", ["logger=none"])
    assert [type(lg) for lg in make_loggers(none, tmp_path)] == [RunCSVLogger]
    assert not any(isinstance(c, ArchitecturePictures) for c in make_callbacks(none, tmp_path))


def test_a_bad_target_is_one_line_naming_it(tmp_path):
    cfg = oneshot.compose("search", ["+callbacks.my._target_=mypkg.NoSuchCallback"])
    with pytest.raises(ValueError, match=r"callbacks\.my\._target_=mypkg\.NoSuchCallback cannot be imported"):
        make_callbacks(cfg, tmp_path)


def val_accs(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]


def same_weights(module, ckpt_path: Path) -> bool:
    saved = torch.load(ckpt_path, weights_only=True)["state_dict"]
    state = module.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_the_app_keeps_last_and_the_best_epoch_runs_user_callbacks_and_two_loggers(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(BIN / "oneshot-search"), f"hydra.run.dir={run_dir}", *TINY, "+callbacks.timer._target_=pytorch_lightning.callbacks.Timer",
         "+logger.plain._target_=pytorch_lightning.loggers.CSVLogger", "+logger.plain.save_dir=null", "+logger.plain.name=plain"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Piped: no progress bar's carriage-return lines, one plain line per epoch.
    out = proc.stdout + proc.stderr
    assert "\r" not in out and "it/s" not in out
    assert len(re.findall(r"(?m)^.*\bepoch \d+: ", out)) == 3 + 2, out[-3000:]  # search + retraining epochs

    # The best epoch by val/acc (the first of equals, as Lightning keeps it) and last.ckpt.
    accs = val_accs(run_dir / "metrics.csv")
    assert len(accs) == 3
    best = accs.index(max(accs))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"epoch={best:03d}.ckpt", "last.ckpt"]
    assert any("Timer" in key for key in torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"])
    # The second logger saw the same values.
    (plain,) = (run_dir / "plain").glob("version_*/metrics.csv")
    assert val_accs(plain) == accs
    retrain_accs = val_accs(run_dir / "retrain" / "metrics.csv")
    best = retrain_accs.index(max(retrain_accs))
    assert sorted(p.name for p in (run_dir / "retrain" / "checkpoints").iterdir()) == [f"epoch={best:03d}.ckpt", "last.ckpt"]

    # load_from_checkpoint rebuilds each module from the checkpoint alone, with the trained weights.
    search = DartsSearch.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert same_weights(search, run_dir / "checkpoints" / "last.ckpt")
    assert str(search.derive_genotype()) == (run_dir / "genotype.txt").read_text().strip()
    retrain = Retrain.load_from_checkpoint(run_dir / "retrain" / "checkpoints" / "last.ckpt")
    assert same_weights(retrain, run_dir / "retrain" / "checkpoints" / "last.ckpt")
    exported = oneshot.load_network(run_dir / "retrain" / "network.pt")
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(retrain.eval()(x), exported.eval()(x))
    assert retrain.hparams["optimizer"]["_target_"] == "torch.optim.SGD"


@pytest.mark.slow
def test_enas_and_tenas_load_from_their_checkpoints(tmp_path):
    args = [*TINY, "strategy=enas", "trainer.max_epochs=1", "retrain.enabled=false", "strategy.derive_samples=2"]
    oneshot.search(oneshot.compose("search", [*args, f"run_dir={tmp_path / 'enas'}"]))
    path = tmp_path / "enas" / "checkpoints" / "last.ckpt"
    enas = EnasSearch.load_from_checkpoint(path)
    assert same_weights(enas, path) and enas.hparams["derive_samples"] == 2
    assert enas.current_genotype() is not None

    # TE-NAS trains nothing, so the app writes no checkpoint; one saved by hand rebuilds too.
    from oneshot.lightning_modules.checkpoint_hparams import record_hparams

    from oneshot.spaces import NB201Network

    supernet = {"_target_": "oneshot.spaces.NB201Network", "C": 4, "N": 1, "num_classes": 10, "in_channels": 1, "image_size": 8}
    module = TenasSearch(NB201Network(C=4, N=1, num_classes=10, in_channels=1, image_size=8), num_inits=1)
    record_hparams(module, supernet=supernet, num_inits=1)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, tmp_path / "tenas.ckpt")  # fmt: skip
    tenas = TenasSearch.load_from_checkpoint(tmp_path / "tenas.ckpt")
    assert same_weights(tenas, tmp_path / "tenas.ckpt") and tenas.options.num_inits == 1


def test_a_checkpoint_naming_foreign_code_is_refused(tmp_path):
    from oneshot.spaces import NB201Network

    net = NB201Network(C=4, N=1, num_classes=10, in_channels=1, image_size=8)
    module = DartsSearch(net)
    module.save_hyperparameters({"supernet": {"_target_": "os.system", "command": "touch pwned"}}, logger=False)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, tmp_path / "x.ckpt")  # fmt: skip
    with pytest.raises(ValueError, match="'os.system', which is not an optimizer"):
        DartsSearch.load_from_checkpoint(tmp_path / "x.ckpt")
    assert not (tmp_path / "pwned").exists()
