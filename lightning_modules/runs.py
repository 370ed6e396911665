"""Run directories, loggers and trainers: the plumbing every stage shares.

Every file is written to a temporary name and renamed (atomic on POSIX), checkpoints included,
so a run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger("oneshot")


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should read like any file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save(obj, path) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` directly in the run directory, kept across resumes."""

    def __init__(self, run_dir: Path):
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``cfg.run_dir``, else the Hydra run directory, else a new ``outputs/<name>/<time>``."""
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            run_dir = Path(HydraConfig.get().runtime.output_dir)
        else:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
            run_dir = Path("outputs") / cfg.get("name", "run") / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        import wandb

        logged_in = bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:
        logged_in = False
    return "online" if logged_in else "offline"


def make_loggers(cfg: DictConfig, run_dir: Path, wandb_from=None) -> list:
    """CSV always (``metrics.csv`` in the run directory); W&B when ``logger=wandb``.

    ``wandb_from``: loggers of an earlier stage in the same process whose W&B run is reused,
    so search and retraining land in one W&B run.
    """
    loggers = [RunCSVLogger(run_dir)]
    wcfg = cfg.get("logger", {}).get("wandb") if cfg.get("logger") else None
    if wcfg is None:
        return loggers
    for lg in wandb_from or []:
        if type(lg).__name__ == "WandbLogger":
            return [*loggers, lg]
    from pytorch_lightning.loggers import WandbLogger

    mode = _wandb_mode(wcfg.get("mode", "auto"))
    wandb_logger = WandbLogger(
        project=wcfg.get("project", "oneshot"),
        entity=wcfg.get("entity"),
        group=wcfg.get("group"),
        tags=list(wcfg.get("tags") or []),
        mode=mode,
        save_dir=str(run_dir),
        log_model=wcfg.get("log_model", False),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if mode == "offline":
        log.info("W&B is offline (no API key); upload later with: wandb sync %s/wandb/offline-run-*", run_dir)
    return [*loggers, wandb_logger]


def make_trainer(trainer_cfg: DictConfig, run_dir: Path, loggers, **extra) -> pl.Trainer:
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.update(extra)
    callbacks = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=-1, every_n_epochs=1,
                        filename="epoch={epoch:03d}", auto_insert_metric_name=False),
        RichProgressBar() if sys.stderr.isatty() else TQDMProgressBar(refresh_rate=20),
    ]  # fmt: skip
    strategy = kwargs.pop("strategy", "auto")
    if strategy == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        # Sampled paths (ENAS) leave parameters unused in a step; DDP must be told.
        strategy = DDPStrategy(find_unused_parameters=True)
    return pl.Trainer(
        default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], strategy=strategy, **kwargs,
    )  # fmt: skip
