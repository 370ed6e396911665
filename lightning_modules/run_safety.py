"""What keeps a run directory one run: an OS lock (one process per directory), a resume that
may change only an explicit list of keys, checkpoints read without running code, and a
checkpoint callback that keeps ``last.ckpt`` the latest in a moved or copied directory.

A NAS run costs GPU-days and run directories are shared and downloaded, so a checkpoint named
by ``ckpt_path`` is untrusted input: it is read with ``torch.load(weights_only=True)`` (tensors
and plain containers only; a pickle that would run code is refused) and told apart by its
contents, a search's supernet (``supernet.*`` weights) from a retraining's network
(``network.*``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from oneshot.validate import load_checkpoint

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

LOCK_FILE = ".lock"

# Keys a resume may change, as patterns over dotted keys; any other difference from the run's
# config.yaml is another run. Extending a run (max_epochs/max_steps/max_time), where and how it
# logs, and knobs that do not change what is computed. ``data.num_workers`` changes only
# speed, but exact replay of the augmentation needs the same value (workers are seeded apart).
RESUMABLE_KEYS = (
    "ckpt_path", "run_dir", "name",
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time",
    "retrain.trainer.max_epochs", "retrain.trainer.max_steps", "retrain.trainer.max_time",
    "retrain.enabled",  # a finished search, resumed to retrain its genotype
    "logger", "logger.*",
    "callbacks", "callbacks.*",  # checkpoint policy, progress bar, pictures, a user's callbacks
    "trainer.enable_progress_bar", "retrain.trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "retrain.trainer.log_every_n_steps",
    "data.num_workers", "data.root", "data.download",
)  # fmt: skip

# ---- one process per run directory --------------------------------------------------------------

# Resolved run directory -> fd of its lock file, held for the life of the process.
_HELD: dict[str, int] = {}


def _drop_inherited_locks() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file; closing its copy keeps
    # the lock with the parent, so a killed parent frees the directory even while workers linger.
    for fd in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_run_dir(run_dir: Path) -> None:
    """Hold an exclusive ``flock`` on ``RUN_DIR/.lock`` until this process ends (the OS releases
    it when the process dies, so a killed run never leaves the directory locked). A second
    process is refused with one line naming the holder's PID, which the holder writes there.
    Re-entrant within a process (the Python API may resume in the same process)."""
    if fcntl is None:
        return
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    key = str(run_dir.resolve())
    if key in _HELD:
        try:
            if os.fstat(_HELD[key]).st_ino == os.stat(path).st_ino:
                return
        except OSError:
            pass
        os.close(_HELD.pop(key))  # the directory was removed and made again: lock the new one
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = re.sub(r"\D", "", os.pread(fd, 64, 0).decode("ascii", "replace"))[:12] or "unknown"
        os.close(fd)
        raise ValueError(
            f"run directory {run_dir} is in use by another process (PID {holder}); wait for it to end or "
            "stop it, or give a new directory (run_dir=... or hydra.run.dir=...)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


# ---- a resume is the same run ---------------------------------------------------------------------


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


def _show(value) -> str:
    text = (
        "<absent>"
        if value is _ABSENT
        else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    )
    text = text.removesuffix("\n...").removesuffix(" ...").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


_ABSENT = object()


def config_changes(run_dir: Path, cfg: DictConfig) -> dict[str, tuple]:
    """``{key: (old, new)}`` between ``RUN_DIR/config.yaml`` and ``cfg`` as it would be written
    (both through the same YAML, so equal configs compare equal exactly)."""
    path = Path(run_dir) / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}); a resume checks the new config against it"
        ) from None
    if not isinstance(old, dict):
        raise ValueError(
            f"{path} is not a config (a YAML mapping); a resume checks the new config against it"
        )
    new = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    a, b = _flat(old), _flat(new)
    return {
        k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(a.keys() | b.keys())
        if a.get(k, _ABSENT) != b.get(k, _ABSENT)
    }


def check_resume(run_dir: Path, cfg: DictConfig) -> dict[str, tuple]:
    """On a resume (``ckpt_path`` set, ``config.yaml`` present), refuse any change outside
    ``RESUMABLE_KEYS`` with one line listing the differing keys; return the allowed changes."""
    if not cfg.get("ckpt_path") or not (Path(run_dir) / "config.yaml").is_file():
        return {}
    changes = config_changes(run_dir, cfg)
    refused = {k: v for k, v in changes.items() if not resumable(k)}
    if refused:
        shown = [f"{k}: {_show(old)} -> {_show(new)}" for k, (old, new) in refused.items()]
        more = f" and {len(shown) - 6} more" if len(shown) > 6 else ""
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path}: a resume continues the run in {run_dir} as its config.yaml has it, but this "
            f"command changes {'; '.join(shown[:6])}{more}. A resume may change only max_epochs/max_steps, logger "
            "and callback settings, data.num_workers (see README: Resuming); start a new run in a new directory instead"
        )
    return changes


def keep_config_history(run_dir: Path) -> Path:
    """The path to keep the current ``config.yaml`` under before a resume rewrites it:
    ``config.v1.yaml``, ``config.v2.yaml``, ... oldest first."""
    n = 1
    while (Path(run_dir) / f"config.v{n}.yaml").exists():
        n += 1
    return Path(run_dir) / f"config.v{n}.yaml"


# ---- checkpoints: read safely, told apart by contents ---------------------------------------------

STAGES = {"search": "supernet.", "retrain": "network."}


def read_checkpoint(path, what: str = "ckpt_path") -> dict:
    """A checkpoint read safely (``weights_only=True``), or one line saying why it cannot be."""
    return load_checkpoint(path, what)


def checkpoint_stage(ckpt: dict) -> str | None:
    """``"search"`` for a supernet's checkpoint, ``"retrain"`` for a discrete network's, else None."""
    keys = list(ckpt.get("state_dict", {}))
    for stage, prefix in STAGES.items():
        if keys and all(isinstance(k, str) and k.startswith(prefix) for k in keys):
            return stage
    return None


def progress(ckpt: dict) -> tuple[int, int]:
    return int(ckpt.get("epoch", -1)), int(ckpt.get("global_step", -1))


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The latest of ``last.ckpt`` and any ``last-vN.ckpt`` (an older Lightning left those in a
    moved directory) by the progress stored in them; None when there is none."""
    found = sorted(Path(ckpt_dir).glob("last*.ckpt"))
    if len(found) <= 1:
        return found[0] if found else None
    return max(found, key=lambda p: progress(read_checkpoint(p)))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, at home in a moved or copied run directory.

    A checkpoint stores absolute paths; resumed from another directory, Lightning drops its
    ``last_model_path`` and writes ``last-v1.ckpt`` beside a stale ``last.ckpt``. Here the stored
    paths are moved to the current directory, and files are overwritten, never versioned (the
    names say the epoch, so a rewound run's epoch file replaces the old one)."""

    def __init__(self, **kwargs):
        super().__init__(enable_version_counter=False, **kwargs)

    # Lightning 2.6 rewrites last.ckpt only when a top-k checkpoint was saved at the same step, so
    # with `monitor` set an epoch that is not among the best would leave last.ckpt behind and a
    # resume would redo it. ``last.ckpt`` is what resume reads: written after every epoch here.
    def _save_last_anyway(self, trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_anyway(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_anyway(trainer)

    @property
    def state_key(self) -> str:
        # Lightning's own key: checkpoints written with either class restore into the other.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and old != self.dirpath:

            def here(path):
                p = Path(path) if path else None
                return str(Path(self.dirpath) / p.name) if p and p.parent == Path(old) else path

            state_dict = {**state_dict, "dirpath": self.dirpath,
                          "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
                          **{k: here(state_dict.get(k)) for k in ("best_model_path", "kth_best_model_path", "last_model_path")}}  # fmt: skip
        super().load_state_dict(state_dict)
