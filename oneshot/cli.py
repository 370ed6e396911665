"""Command-line apps: ``oneshot-search`` and ``oneshot-retrain`` (Hydra), thin by design.

Errors a user can fix (a bad genotype, an unknown dataset, impossible sizes, missing data while
offline, a NaN loss) end the app with exit status 2 and one line naming the bad value and the
valid choices; Hydra reports bad overrides and unknown config choices the same way. Set
``ONESHOT_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("oneshot")

CONFIG_PATH = "pkg://oneshot.conf"


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to report in one line, if ``exc`` (or what it wraps) is one a user can fix."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from lightning_modules.base import NonFiniteLossError
    from oneshot.data import DatasetUnavailableError
    from oneshot.genotypes import GenotypeError

    seen = exc
    while isinstance(seen, InstantiationException) and seen.__cause__ is not None:
        seen = seen.__cause__
    if isinstance(seen, MissingMandatoryValue):
        key = getattr(seen, "full_key", None) or "a value"
        return ValueError(f"{key} is required, e.g. {key}=... on the command line (see --help)")
    if isinstance(seen, GenotypeError | DatasetUnavailableError | NonFiniteLossError | ValueError | FileNotFoundError):
        return seen
    return None


def _one_run_dir_for_all_ranks(cfg: DictConfig) -> None:
    """Lightning's DDP launcher starts each extra rank as this command again, with
    ``sys.argv[1:]`` plus ``hydra.run.dir=<hydra.run.dir>``. Make both mean this job: the run
    directory Hydra resolved (not the pattern), and this job's own overrides instead of a
    ``-m`` sweep, which a rank would otherwise rerun whole. So every rank uses one directory.

    Ranks started by torchrun or srun are separate Hydra runs, each resolving the default
    ``outputs/<name>/<now>`` itself, so they need the directory spelled out."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    external = int(os.environ.get("WORLD_SIZE", 1)) > 1 and "LOCAL_RANK" in os.environ
    external = external or int(os.environ.get("SLURM_STEP_NUM_TASKS", 1)) > 1  # under srun
    pinned = cfg.get("run_dir") or any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra)
    if external and not pinned and hydra_cfg.mode == RunMode.RUN:
        raise ValueError(
            "processes started by torchrun/srun must share one run directory: add "
            "hydra.run.dir=<dir> (e.g. outputs/search/$SLURM_JOB_ID) to the command"
        )
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]


# Trainer arguments whose default is an int but which also take strings or lists.
_ANY_TYPE = {"trainer.devices"}


def _check_override_types(cfg: DictConfig) -> None:
    """``seed=abc``: a value override must have its default's type (an int for an int, a number
    for a float, a bool for a bool), checked against the config composed without the values."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import ListConfig, OmegaConf

    if not HydraConfig.initialized() or not GlobalHydra.instance().is_initialized():
        return
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices)
    overrides = [o.split("=", 1) for o in hydra_cfg.overrides.task if "=" in o]
    values = [(k, v) for k, v in overrides if k not in groups and k[0] not in "+~" and k not in _ANY_TYPE]
    if not values:
        return
    choices = [f"{k}={v}" for k, v in overrides if k.lstrip("+~") in groups]
    try:
        defaults = GlobalHydra.instance().hydra.compose_config(hydra_cfg.job.config_name, choices, run_mode=RunMode.RUN)
    except Exception:  # a checker must never stop a run that Hydra accepted
        return
    for key, text in values:
        try:
            default, value = (OmegaConf.select(c, key, default=None) for c in (defaults, cfg))
        except Exception:
            continue
        if default is None or value is None or isinstance(default, str | list | dict | DictConfig | ListConfig):
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        if not ok:
            raise ValueError(f"{key}={text}: {key} must be {kind} (its default is {default})")


def _run(fn, cfg: DictConfig):
    try:
        _one_run_dir_for_all_ranks(cfg)
        _check_override_types(cfg)
        return fn(cfg)
    except Exception as exc:
        err = _user_error(exc)
        if err is None or os.environ.get("ONESHOT_TRACEBACK"):
            raise
        log.error("error: %s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="search")
def search_main(cfg: DictConfig) -> None:
    from oneshot import search

    _run(search, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="retrain")
def retrain_main(cfg: DictConfig) -> None:
    from oneshot import retrain

    _run(retrain, cfg)
