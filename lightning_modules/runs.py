"""Run directories, loggers and trainers: the plumbing every stage shares.

Every file is written to a temporary name and renamed (atomic on POSIX), checkpoints included,
so a run killed at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import random
import socket
import sys
import tempfile
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.loggers.logger import rank_zero_experiment
from omegaconf import DictConfig, OmegaConf
from oneshot.lightning_modules.run_safety import (
    check_resume,
    keep_config_history,
    lock_run_dir,
)
from pytorch_lightning.callbacks import Callback, RichProgressBar
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
    """Lightning's checkpoint writer, but through a temporary file and a rename; its reader
    never runs code (``ckpt_path`` is a user-supplied file; ours hold only plain types)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))

    def save(self) -> None:
        """Lightning appends rows in place, so a kill mid-write leaves a torn last row; here the
        file is rewritten whole through a temporary file (metrics files are small)."""
        if not self.metrics:
            return
        rows = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                rows = list(csv.DictReader(f))
        self._record_new_keys()
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows + self.metrics)
        atomic_write_text(self.metrics_file_path, out.getvalue())
        self.metrics = []

    def forget_from_epoch(self, epoch: int, step: int | None = None) -> None:
        """Drop rows of epochs >= ``epoch``: what a killed run logged after its last checkpoint,
        which the resumed run logs again. Rows without an epoch (a callback's, such as the
        learning-rate monitor's at an epoch's start) go by their step: those at ``step`` or later."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        def before(r):
            if r.get("epoch"):
                return int(float(r["epoch"])) < epoch
            return step is None or not r.get("step") or int(float(r["step"])) < step

        kept = [r for r in rows if before(r)]
        if len(kept) < len(rows):
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.metrics_file_path, out.getvalue())


class RNGState(Callback):
    """Keeps the global RNG states (torch, CUDA, numpy, random) in every checkpoint and restores
    them when a run resumes: augmentation draws from them, so a resumed run repeats the draws
    of an uninterrupted one (the data order is seeded separately, see ``oneshot.data``).

    Restored at ``on_train_start``, the last moment before the first batch, so that nothing
    Lightning does after loading the checkpoint can shift it. That is exact because between
    saving at an epoch's end and the next epoch's first batch an uninterrupted run draws
    nothing: the data loaders draw from their own generators (``oneshot.data``). At the same
    moment ``metrics.csv`` forgets the rows a killed run logged after its last checkpoint."""

    def __init__(self):
        self._pending = None

    def state_dict(self) -> dict:
        np_state = np.random.get_state(legacy=False)  # plain types: loads with weights_only=True
        np_state["state"]["key"] = np_state["state"]["key"].tolist()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np_state, "random": random.getstate()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, RunCSVLogger) and trainer.is_global_zero:
                lg.experiment.forget_from_epoch(trainer.current_epoch, trainer.fit_loop.epoch_loop._batches_that_stepped)
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np_state = state["numpy"]
        np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
        np.random.set_state(np_state)
        random.setstate(state["random"])


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` directly in the run directory, kept across resumes."""

    def __init__(self, save_dir):
        super().__init__(save_dir=str(save_dir), name="", version="")

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self.save()  # the metrics up to a checkpoint survive a kill, as the checkpoint does

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
    # The other DDP ranks start after rank 0 wrote here, and are the same run: rank 0 holds the
    # lock. Checked before the lock is taken (a refused run adds no file), then again under it.
    if rank_zero_only.rank == 0:
        refuse_to_overwrite(run_dir, cfg.get("ckpt_path"))
        check_resume(run_dir, cfg)
        lock_run_dir(run_dir)
        refuse_to_overwrite(run_dir, cfg.get("ckpt_path"))
        changed = set(check_resume(run_dir, cfg)) - {"ckpt_path", "run_dir"}
        if changed:  # e.g. more epochs: the config it replaces is kept too
            atomic_write_text(keep_config_history(run_dir), (run_dir / "config.yaml").read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


# What marks a directory as holding a run: a started search or retraining, or its results.
RUN_OUTPUTS = ("report.json", "genotype.txt", "network.pt", "checkpoints/last.ckpt")


def refuse_to_overwrite(run_dir: Path, ckpt_path) -> None:
    """A new run never overwrites an earlier one; ``ckpt_path`` set means "continue it"."""
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if found and not ckpt_path:
        raise ValueError(
            f"run directory {run_dir} already holds a run ({', '.join(found)}); continue it with "
            "ckpt_path=last, or give a new directory (run_dir=... or hydra.run.dir=...)"
        )


def progress_bar(**kwargs):
    """``callbacks.progress_bar``: Rich's bar on a terminal; ``None`` (no bar) when stderr is not
    one, since a piped bar is a 1,000-character line of carriage returns. The modules log one
    plain line per epoch either way (``oneshot.lightning_modules.base.info``)."""
    return RichProgressBar(**kwargs) if sys.stderr.isatty() else None


def _entries(group) -> dict:
    """The ``_target_`` entries of a ``callbacks``/``logger`` group (``null`` ones are switched
    off; plain values such as ``logger.pictures`` are settings, not objects)."""
    return {name: e for name, e in (group or {}).items() if isinstance(e, DictConfig) and "_target_" in e}


def _target(entry, where: str):
    from hydra.utils import get_object

    try:
        return get_object(entry._target_)
    except Exception as e:  # a typo in a user's _target_: one line naming it
        raise ValueError(f"{where}._target_={entry._target_} cannot be imported ({str(e).splitlines()[0][:160]})") from None


def _build(entry, where: str, **fill):
    """Instantiate a group entry; ``fill`` gives values only to the entry's keys left ``null``
    (paths of the run directory), so a user's YAML never holds a path of this machine."""
    from hydra.utils import instantiate

    _target(entry, where)
    try:
        return instantiate(entry, **{k: v for k, v in fill.items() if k in entry and entry[k] is None})
    except Exception as e:
        raise ValueError(f"{where}: {entry._target_} cannot be made ({str(e).splitlines()[-1][:200]})") from None


def _with(entry, values: dict) -> DictConfig:
    """The entry with ``values`` set (new keys too: the composed config is struct)."""
    return OmegaConf.create({**OmegaConf.to_container(entry, resolve=True), **values})


def _is(entry, where: str, base: type) -> bool:
    obj = _target(entry, where)
    return isinstance(obj, type) and issubclass(obj, base)


def pictures_enabled(cfg: DictConfig) -> bool:
    """``logger.pictures`` (``logger=none``: false): the per-epoch pictures and the final ones."""
    return bool((cfg.get("logger") or {}).get("pictures", True))


def make_callbacks(cfg: DictConfig, stage_dir: Path, validates: bool = True) -> list:
    """The ``callbacks`` group for a stage writing into ``stage_dir`` (checkpoints in
    ``stage_dir/checkpoints``). ``validates=False`` (no validation loop: ``limit_val_batches=0``,
    ``retrain.val_split=0``): there is no metric to rank checkpoints or stop early by, so only
    ``last.ckpt`` is kept (or every epoch with ``save_top_k=-1``) and early stopping is off."""
    from oneshot.lightning_modules.pictures import ArchitecturePictures
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    out = []
    for name, entry in _entries(cfg.get("callbacks")).items():
        where, extra = f"callbacks.{name}", {}
        if _is(entry, where, ArchitecturePictures) and not pictures_enabled(cfg):
            continue
        if _is(entry, where, EarlyStopping) and not validates:
            log.info("%s is off: this stage runs no validation to monitor", where)
            continue
        if _is(entry, where, ModelCheckpoint) and not validates and entry.get("monitor"):
            extra = {"monitor": None, "save_top_k": -1 if entry.get("save_top_k") == -1 else 0}
        callback = _build(_with(entry, extra), where, dirpath=str(stage_dir / "checkpoints"), run_dir=str(stage_dir))
        if callback is not None:  # a factory may decline (progress_bar when piped)
            out.append(callback)
    return out


def validates(trainer_kwargs: dict) -> bool:
    """Whether a Trainer with these arguments runs a validation loop."""
    return trainer_kwargs.get("limit_val_batches", 1.0) not in (0, 0.0)


def _wandb_mode(requested: str) -> tuple[str, str]:
    """``(mode, reason)``: ``auto`` is online when logged in and the W&B server answers, offline
    otherwise (an online run without network would stall in ``wandb.init`` for minutes)."""
    if requested != "auto":
        return requested, "logger.wandb.mode"
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    try:
        import wandb

        logged_in = bool(os.environ.get("WANDB_API_KEY") or wandb.api.api_key)
    except Exception:
        logged_in = False
    if not logged_in:
        return "offline", "no API key"
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    if not any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        try:  # behind a proxy a direct connection proves nothing; wandb's own retries decide there
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
        except OSError:
            return "offline", f"{url.hostname} unreachable"
    return "online", "logged in"


def _sweep_names(cfg: DictConfig) -> dict:
    """Under ``-m`` the jobs of one Hydra sweep share a W&B group (the sweep directory's name)
    and each is named by its overrides; single runs keep W&B's names."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return {}
        hc = HydraConfig.get()
    except Exception:  # a Hydra without the mode field: no grouping, nothing else changes
        return {}
    sweep = Path(hc.runtime.output_dir).parent.name
    return {"group": f"{cfg.get('name', 'run')}-{sweep}", "name": hc.job.override_dirname or f"job{hc.job.num}"}


def make_loggers(cfg: DictConfig, run_dir: Path, stage: str | None = None, search_run=None) -> list:
    """The ``logger`` group for a stage writing into ``run_dir`` (``save_dir: null`` is filled
    with it). Every logger's config is the resolved Hydra config, exactly (``config.yaml``; the
    CSV logger has it there already). ``stage`` (``search``/``retrain``; default ``cfg.name``)
    is W&B's job type; ``search_run`` (the search's W&B run) puts the retraining in the
    search's group, named after it: two runs whose summaries each mean one stage."""
    from pytorch_lightning.loggers import WandbLogger

    loggers, stage = [], stage or cfg.get("name", "run")
    for name, entry in _entries(cfg.get("logger")).items():
        where, fill = f"logger.{name}", {"save_dir": str(run_dir)}
        if _is(entry, where, WandbLogger):
            settings, why = _wandb_settings(cfg, entry, run_dir, stage, search_run)
            entry = _with(entry, settings)
            if settings["mode"] == "offline" and rank_zero_only.rank == 0:
                log.info("W&B is offline (%s); upload later with: wandb sync %s/wandb/offline-run-*", why, run_dir)
        loggers.append(_build(entry, where, **fill))
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        if not isinstance(lg, RunCSVLogger):  # it has config.yaml beside it
            lg.log_hyperparams(config)
    return loggers


def _wandb_settings(cfg: DictConfig, entry, run_dir: Path, stage: str, search_run) -> tuple[dict, str]:
    """W&B's mode (``auto`` resolved), group, name, job type and directory for one stage."""
    mode, why = _wandb_mode(entry.get("mode") or "auto")
    sweep = _sweep_names(cfg)
    group = entry.get("group") or sweep.get("group") or f"{cfg.get('name', 'run')}-{Path(run_dir).name}"
    name = entry.get("name") or sweep.get("name")
    if search_run is not None:  # the retraining of a search: beside it, named after it
        group = search_run.group or group
        name = f"{search_run.name or search_run.id}-retrain"
    settings = {"mode": mode, "group": group, "name": name, "job_type": entry.get("job_type") or stage,
                "save_dir": entry.get("save_dir") or str(run_dir)}  # fmt: skip
    return settings, why


def _several_processes(kwargs: dict) -> bool:
    """Whether Lightning's ``strategy=auto`` becomes DDP: several nodes, or several devices
    (``-1``/``auto``: every GPU there is; a CPU counts as one device)."""
    devices = kwargs.get("devices", "auto")
    if kwargs.get("num_nodes", 1) > 1:
        return True
    if isinstance(devices, list | tuple):
        return len(devices) > 1
    if str(devices).strip() in ("auto", "-1"):
        return kwargs.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.device_count() > 1
    text = str(devices).strip()
    return len([p for p in text.split(",") if p.strip()]) > 1 if "," in text else int(text) > 1


def make_trainer(trainer_cfg: DictConfig, run_dir: Path, loggers, callbacks=(), **extra) -> pl.Trainer:
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.update(extra)
    callbacks = [c for c in callbacks if c is not None]
    from pytorch_lightning.callbacks import LearningRateMonitor, ProgressBar

    if not kwargs.get("enable_progress_bar", True) or not any(isinstance(c, ProgressBar) for c in callbacks):
        # trainer.enable_progress_bar=false, or no bar configured (piped output): no bar at all,
        # not Lightning's default one.
        kwargs["enable_progress_bar"] = False
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    strategy = kwargs.pop("strategy", "auto")
    # Architecture values (alphas, probabilities, entropy) are logged per epoch without
    # sync_dist: they are equal on every rank, so Lightning's advice to reduce them is noise.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*when logging on epoch level")
    if strategy == "ddp" or (strategy == "auto" and _several_processes(kwargs)):  # trainer.devices=2 too
        from pytorch_lightning.strategies import DDPStrategy

        # Sampled paths (ENAS) leave parameters unused in a step; DDP must be told.
        strategy = DDPStrategy(find_unused_parameters=True)
    return pl.Trainer(
        default_root_dir=str(run_dir), logger=loggers or False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], strategy=strategy, **kwargs,
    )  # fmt: skip
