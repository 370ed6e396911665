"""Command-line apps: ``oneshot-search`` and ``oneshot-retrain`` (Hydra), thin by design.

Errors a user can fix (a bad genotype, an unknown dataset, impossible sizes, missing data while
offline, a NaN loss) end the app with exit status 2 and one line naming the bad value and the
valid choices; Hydra reports bad overrides and unknown config choices the same way. Set
``ONESHOT_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from oneshot import validate

log = logging.getLogger("oneshot")

CONFIG_PATH = "pkg://oneshot.conf"

# pl.Trainer.__init__'s parameters and defaults (Lightning 2.6), written out so that the apps check
# ``trainer.<arg>=...`` within a second, before Lightning is imported; tests/test_cli.py checks
# the list against the installed Lightning's signature.
TRAINER_ARGS = {
    "accelerator": "auto", "strategy": "auto", "devices": "auto", "num_nodes": 1, "precision": None,
    "logger": None, "callbacks": None, "fast_dev_run": False, "max_epochs": None, "min_epochs": None,
    "max_steps": -1, "min_steps": None, "max_time": None, "limit_train_batches": None,
    "limit_val_batches": None, "limit_test_batches": None, "limit_predict_batches": None,
    "overfit_batches": 0.0, "val_check_interval": None, "check_val_every_n_epoch": 1,
    "num_sanity_val_steps": None, "log_every_n_steps": None, "enable_checkpointing": None,
    "enable_progress_bar": None, "enable_model_summary": None, "accumulate_grad_batches": 1,
    "gradient_clip_val": None, "gradient_clip_algorithm": None, "deterministic": None, "benchmark": None,
    "inference_mode": True, "use_distributed_sampler": True, "profiler": None, "detect_anomaly": False,
    "barebones": False, "plugins": None, "sync_batchnorm": False, "reload_dataloaders_every_n_epochs": 0,
    "default_root_dir": None, "enable_autolog_hparams": True, "model_registry": None,
}  # fmt: skip
# Trainer arguments oneshot sets itself from the run directory and its own config.
SET_BY_ONESHOT = ("logger", "callbacks", "plugins", "default_root_dir")
_TRAINER_KEY = re.compile(r"(\+{0,2})((?:retrain\.)?trainer)\.(\w+)")
# space=model's ``space.model.<arg>=v``: any constructor argument of the user's class (issue 15).
_MODEL_KEY = re.compile(r"space\.model\.\w+")

# What oneshot-search returns to a Hydra sweeper (``objective=``): the retrained network's
# accuracy on the held-out validation part of the training set (the default: selecting on the
# test set makes the test accuracy an optimistic estimate), its test accuracy, or the search's
# last validation accuracy.
OBJECTIVES = ("retrain/val_acc", "retrain/test_acc", "search/val_acc")


def _config_keys(path: str, *inner: str) -> set[str]:
    """Keys a packaged config file defines (under ``inner``): those take a plain override."""
    import yaml

    node = yaml.safe_load(resources.files("oneshot.conf").joinpath(path).read_text()) or {}
    for key in inner:
        node = node.get(key) or {}
    return set(node)


# Overrides (keys, value prefix) that need a Hydra plugin from the `sweep` extra.
_PLUGINS = {
    (("hparams_search", "hydra/sweeper"), "optuna"): "hydra_plugins.hydra_optuna_sweeper",
    (("hydra/launcher",), "submitit"): "hydra_plugins.hydra_submitit_launcher",
}


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # hydra_plugins itself missing
        return False


def rewrite_overrides(args: list[str]) -> list[str]:
    """The command line as users of Lightning and Hydra write it, in Hydra's grammar:
    ``group=null`` removes a config group (``~group``; Hydra's parser reads ``null`` as no
    value and refuses it), and ``trainer.<arg>=v`` / ``retrain.trainer.<arg>=v`` for a Trainer
    argument the config does not define becomes ``++...`` (add or override). A name that is not a
    Trainer argument is a ConfigError naming the valid ones. Idempotent (DDP ranks rerun it)."""
    conf = resources.files("oneshot.conf")
    groups = {p.name for p in conf.iterdir() if p.is_dir() and not p.name.startswith("_")}
    defined = {"trainer": _config_keys("trainer/default.yaml"), "retrain.trainer": _config_keys("retrain/default.yaml", "trainer")}
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        for option, plugin in _PLUGINS.items():
            if eq and key.lstrip("+") in option[0] and value.startswith(option[1]) and not _installed(plugin):
                raise validate.ConfigError(
                    f"{arg} needs Hydra's {plugin.split('.')[-1].replace('_', '-')} plugin, which is not installed: "
                    "pip install 'oneshot[sweep]' (or the plugin alone)"
                )
        match = _TRAINER_KEY.fullmatch(key) if eq else None
        if eq and key in groups and value.strip() == "null":
            arg = f"~{key}"
        elif eq and _MODEL_KEY.fullmatch(key):  # issue 15: the user model's own constructor arguments
            arg = f"++{arg}"
        elif match:
            plus, where, name = match.groups()
            check_trainer_arg(f"{where}.{name}", name, value)
            if not plus and name not in defined[where]:
                arg = f"++{arg}"
        out.append(arg)
    return out


def check_trainer_arg(key: str, name: str, value) -> None:
    if name in SET_BY_ONESHOT:
        raise validate.ConfigError(
            f"{key} is set by oneshot itself (from logger=..., the run directory and its callbacks); "
            "leave it out of trainer.*"
        )
    if name not in TRAINER_ARGS:
        valid = ", ".join(n for n in TRAINER_ARGS if n not in SET_BY_ONESHOT)
        raise validate.ConfigError(f"{key}={value}: {name} is not a Lightning Trainer argument; valid: {valid}")


def check_trainer(cfg: DictConfig) -> None:
    """Every ``trainer.*`` / ``retrain.trainer.*`` key is a Trainer argument of its default's type
    (what a ``+``/``++`` override or a config file added, which Hydra does not check)."""
    for where in ("trainer", "retrain.trainer"):
        section = OmegaConf.select(cfg, where, default=None)
        if not isinstance(section, DictConfig):
            continue
        for name in section:
            if str(name).startswith("_"):  # _target_ and friends of an instantiable trainer config
                continue
            value = section[name]
            check_trainer_arg(f"{where}.{name}", str(name), value)
            default, ok = TRAINER_ARGS[name], True
            if name == "fast_dev_run":
                ok, kind = isinstance(value, bool | int), "true, false or a number of batches"
            elif isinstance(default, bool):
                ok, kind = isinstance(value, bool), "true or false"
            elif isinstance(default, int):
                ok, kind = value is None or (isinstance(value, int) and not isinstance(value, bool)), "an integer"
            elif isinstance(default, float):
                ok, kind = isinstance(value, int | float) and not isinstance(value, bool), "a number"
            if not ok:
                raise validate.ConfigError(f"{where}.{name}={value}: {name} must be {kind} (Lightning's default is {default})")


def check_objective(cfg: DictConfig) -> None:
    objective = cfg.get("objective")
    if objective is not None and objective not in OBJECTIVES:
        raise validate.ConfigError(f"objective={objective} is not an objective; valid: {', '.join(OBJECTIVES)}")
    retrain = cfg.get("retrain")
    if objective == "retrain/val_acc" and isinstance(retrain, DictConfig) and retrain.get("enabled", True):
        if retrain.get("val_split") == 0:
            raise validate.ConfigError(
                "objective=retrain/val_acc needs a validation part (retrain.val_split=0 runs no validation); "
                f"valid: retrain.val_split > 0, or objective={OBJECTIVES[1]} (selecting on the test set is optimistic)"
            )


def _last_value(path: Path, columns) -> float | None:
    """The last value logged in any of ``columns`` of a ``metrics.csv``."""
    if not path.is_file():
        return None
    last = None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for col in columns:
                if row.get(col) not in (None, ""):
                    last = float(row[col])
    return last


def objective_value(report: dict, run_dir: Path, objective: str = OBJECTIVES[0], warn: bool = False) -> float | None:
    """The number a Hydra sweeper optimises (higher is better), from the run's report and
    metrics; a run without retraining falls back to ``search/val_acc``. None when the run
    measured nothing of the kind (``warn``: say so; a sweeper then has no number for the run)."""
    say = log.warning if warn else log.debug
    stage, _, metric = objective.partition("/")
    if stage == "retrain" and report.get("retrain") is not None:
        value = report["retrain"].get(metric)
        if value is None:
            say("objective %s: the retraining measured no %s (retrain.val_split=0?)", objective, metric)
        return None if value is None else float(value)
    if stage == "retrain":
        log.debug("objective: no retraining in this run, so search/val_acc (the search's last val/acc)")
    value = _last_value(run_dir / "metrics.csv", ("val/acc", "search/val/acc", "search/val_acc"))
    if value is None:
        say("objective search/val_acc: the search logged no val/acc (strategy=tenas, or no validation batches)")
    return value


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to report in one line, if ``exc`` (or what it wraps) is one a user can fix."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from oneshot.data import DatasetUnavailableError
    from oneshot.genotypes import GenotypeError
    from oneshot.lightning_modules.base import NonFiniteLossError

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
            check_trainer(config)
            check_objective(config)
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
    """The error once on stderr, and in the job's log file (``cli.log``) where there is one; not
    also through Hydra's console handler, which would print it a second time."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (err,), None)
    for handler in {*logging.getLogger().handlers, *log.handlers}:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def _run(fn, cfg: DictConfig):
    from oneshot.quiet import quiet_libraries

    quiet_libraries()  # no hardware banners, tips or library deprecation warnings
    try:
        _one_run_dir_for_all_ranks(cfg)
        validate.check_override_types(cfg)  # again for -m jobs, which RefuseBadStart does not see
        check_trainer(cfg)
        check_objective(cfg)
        report = fn(cfg)  # oneshot.search / retrain check the values again (the Python API's path)
    except Exception as exc:
        err = _user_error(exc)
        if err is None or os.environ.get("ONESHOT_TRACEBACK"):
            raise
        _remove_refused_start(cfg)
        _refuse(err)
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    sweeping = "BasicSweeper" not in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default=""))
    run_dir = Path(cfg.get("run_dir") or hydra_cfg.runtime.output_dir)
    return objective_value(report, run_dir, cfg.get("objective") or OBJECTIVES[0], warn=sweeping)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="search")
def _search_app(cfg: DictConfig) -> float | None:
    from oneshot import search

    return _run(search, cfg)  # the objective: what a sweeper (hydra/sweeper=optuna) optimises


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="retrain")
def _retrain_app(cfg: DictConfig) -> float | None:
    from oneshot import retrain

    return _run(retrain, cfg)


def _with_rewritten_argv(app) -> None:
    try:
        sys.argv[1:] = rewrite_overrides(sys.argv[1:])  # in place: Lightning's DDP ranks rerun sys.argv
    except validate.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)  # before Hydra sets up logging: this line only
        sys.exit(2)
    app()


def search_main() -> None:
    """``oneshot-search``."""
    _with_rewritten_argv(_search_app)


def retrain_model_overrides(args: list[str]) -> list[str]:
    """``oneshot-retrain space=model arch=arch.json`` (issue 15): the retrain config has no space
    group and no ``arch`` key, so both are added (``+``); idempotent."""
    return [f"+{a}" if a.partition("=")[0] in ("space", "arch") and "=" in a else a for a in args]


def retrain_main() -> None:
    """``oneshot-retrain``."""
    sys.argv[1:] = retrain_model_overrides(sys.argv[1:])
    _with_rewritten_argv(_retrain_app)


def export_main() -> None:
    """``oneshot-export RUN_DIR`` (issue 17): the run's network as ONNX and TorchScript files."""
    from oneshot.export import main

    main()
