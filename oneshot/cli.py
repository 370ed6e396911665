"""Command-line apps: ``oneshot-search`` and ``oneshot-retrain`` (Hydra), thin by design.

Errors a user can fix (a bad genotype, an unknown dataset, impossible sizes, missing data while
offline, a NaN loss) end the app with exit status 2 and one line naming the bad value and the
valid choices; Hydra reports bad overrides and unknown config choices the same way. Set
``ONESHOT_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from oneshot import validate

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
    disk = validate.disk_error(seen)
    if disk is not None:
        return disk
    if type(seen).__name__ == "MisconfigurationException":  # Lightning's: a Trainer argument it refuses
        return ValueError(f"trainer: {str(seen).strip().splitlines()[0]}")
    if isinstance(seen, RuntimeError) and str(seen).startswith("Error(s) in loading state_dict"):
        lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
        return ValueError(
            f"the checkpoint does not fit this run's network (saved by a run with another space, size or "
            f"strategy?): {' '.join(lines[1:2])[:200]}"
        )
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


class RefuseBadStart(Callback):
    """Checks the composed config before Hydra creates the run directory (``on_run_start``
    runs before ``run_job`` makes it): a bad value or override ends the app in about a second,
    before torch and Lightning are imported, and leaves nothing on disk. Registered in
    ``hydra.callbacks`` of ``conf/search.yaml`` and ``conf/retrain.yaml``."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        global _existed
        dirs = [config.get("run_dir"), OmegaConf.select(config, "hydra.run.dir", default=None)]
        _existed = {p for d in dirs if d for p in (Path(d).absolute(), *Path(d).absolute().parents) if p.exists()}
        pinned = any(o.startswith("hydra.run.dir=") for o in config.hydra.overrides.hydra)
        try:
            HydraConfig.instance().set_config(config)  # run_job sets it again; the type check reads it now
            validate.check_override_types(config)
            datasets = GlobalHydra.instance().config_loader().get_group_options("data")
            validate.check_config(config, hydra_run_dir=config.hydra.run.dir if pinned else None, datasets=datasets)
        except validate.ConfigError as err:
            _refuse(err)


# Directories (and their parents) that existed before this start, recorded by RefuseBadStart;
# None where it did not run (multirun jobs, the Python API): then nothing is removed.
_existed: set[Path] | None = None


def _only_startup_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a start writes before any work: Hydra's ``.hydra/``
    and job log, ``config.yaml``, hidden lock and temporary files."""
    for p in run_dir.rglob("*"):
        rel = p.relative_to(run_dir)
        top = len(rel.parts) == 1
        if p.is_dir() or rel.parts[0] == ".hydra" or rel.name.startswith(".") or (
            top and (rel.name == "config.yaml" or rel.suffix == ".log")
        ):
            continue
        return False
    return True


def _remove_refused_start(cfg: DictConfig) -> None:
    """A refused start leaves no directory behind: remove the run directories this start
    created, while they hold nothing but startup files, and the parents it created."""
    from hydra.core.hydra_config import HydraConfig

    if _existed is None:
        return
    dirs = [cfg.get("run_dir"), HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None]
    for d in dict.fromkeys(Path(d).absolute() for d in dirs if d):
        if d in _existed or not d.is_dir() or not _only_startup_files(d):
            continue
        shutil.rmtree(d, ignore_errors=True)
        for parent in d.parents:
            if parent in _existed:
                break
            try:
                parent.rmdir()  # only if empty
            except OSError:
                break


def _refuse(err: BaseException) -> None:
    log.error("error: %s", err)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def _run(fn, cfg: DictConfig):
    try:
        _one_run_dir_for_all_ranks(cfg)
        validate.check_override_types(cfg)  # again for -m jobs, which RefuseBadStart does not see
        return fn(cfg)  # oneshot.search / retrain check the values again (the Python API's path)
    except Exception as exc:
        err = _user_error(exc)
        if err is None or os.environ.get("ONESHOT_TRACEBACK"):
            raise
        _remove_refused_start(cfg)
        _refuse(err)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="search")
def search_main(cfg: DictConfig) -> None:
    from oneshot import search

    _run(search, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="retrain")
def retrain_main(cfg: DictConfig) -> None:
    from oneshot import retrain

    _run(retrain, cfg)
