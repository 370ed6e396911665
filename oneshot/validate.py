"""Values checked before anything runs: a table of config keys with their valid ranges, the
override types, paths, devices and checkpoints.

Every check here reads only the composed config and the file system (omegaconf and the standard
library; torch is imported only to open a checkpoint or count GPUs, and only when the config asks
for one), so ``oneshot-search`` refuses a bad value within about a second, before the heavy
imports and before a run directory exists (``oneshot.cli`` calls ``check_config`` from a Hydra
callback that runs before Hydra creates its output directory). Each refusal is one line:
``<key>=<value> is out of range; valid: <range>``.

The values in ``RULES`` are the ones that would otherwise run and give a wrong answer without a
word: ``strategy.grad_clip < 0`` flips every gradient's sign in torch's clipping (gradient
ascent), ``num_inits=0`` makes the TE-NAS prune loop zero times, ``max_epochs=-1`` trains forever,
an out-of-range ``seed`` is replaced by 0 in Lightning with only a warning.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot run, or would run and give a wrong answer."""


class Rule(NamedTuple):
    valid: str  # the valid range, as the message says it
    ok: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(low: int | None = None, high: int | None = None, null: str | None = None) -> Rule:
    """An integer in ``low..high``; ``null`` says what null means where null is allowed."""
    span = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    return Rule(
        span + (f", or null ({null})" if null else ""),
        lambda v: (v is None and null is not None)
        or (_is_int(v) and (low is None or v >= low) and (high is None or v <= high)),
    )


def number(low=None, high=None, *, open_low=False, open_high=False, null=None) -> Rule:
    lo = "" if low is None else f"{'>' if open_low else '>='} {low}"
    hi = "" if high is None else f"{'<' if open_high else '<='} {high}"
    span = "a number " + " and ".join(s for s in (lo, hi) if s)
    return Rule(
        span + (f", or null ({null})" if null else ""),
        lambda v: (v is None and null is not None)
        or (
            _is_number(v)
            and (low is None or (v > low if open_low else v >= low))
            and (high is None or (v < high if open_high else v <= high))
        ),
    )


def choice(*values) -> Rule:
    return Rule("one of " + ", ".join(map(str, values)), lambda v: v in values)


def _devices(v) -> bool:
    if _is_int(v):
        return v >= 1 or v == -1
    if isinstance(v, list | ListConfig):
        return len(v) > 0 and all(_is_int(d) and d >= 0 for d in v)
    if isinstance(v, str):
        parts = [p for p in v.split(",") if p.strip()]
        return v == "auto" or v.strip() == "-1" or (bool(parts) and all(p.strip().isdigit() for p in parts))
    return False


DEVICES = Rule("a count >= 1, -1 (all), 'auto', or a list of device ids such as [0,1]", _devices)

# Keys of the TE-NAS prune (warmstart=tenas and strategy=tenas take the same options).
_PRUNE = {
    "num_inits": integer(1),
    "n_crops": integer(1),
    "crop_size": integer(1),
    "ntk_batch": integer(2, null="the reference's per space"),
    "ops_per_round": integer(1, null="the reference's per space"),
    "precision": integer(0),
    "images": integer(2),
    "threads": integer(0),
    "method": choice("loop", "vmap"),
}
_RECIPE = "the space's retraining recipe"
# Key -> rule; a key the config does not have (another strategy's option) is not checked.
RULES: dict[str, Rule] = {
    "seed": integer(0, 2**32 - 1),  # Lightning's seed_everything replaces others by 0
    "size": choice("paper", "cpu"),
    "trainer.max_epochs": integer(1),
    "trainer.devices": DEVICES,
    "trainer.num_nodes": integer(1),
    "data.batch_size": integer(1),
    "data.split": number(0, 1, open_low=True, open_high=True),
    "data.num_workers": integer(0),
    "data.limit": integer(1, null="all images"),
    "data.image_size": integer(1, null="the native size"),
    # retrain.*: null takes the value of the space's recipe (conf/retrain/<space>.yaml)
    "retrain.trainer.max_epochs": integer(1, null=_RECIPE),
    "retrain.batch_size": integer(1, null=_RECIPE),
    "retrain.cutout": Rule("0..1, the side of the Cutout square as a fraction of the image side (DARTS' 16 px on "
                           "32 px images: 0.5); 0 = off", lambda v: v is None or (_is_number(v) and 0 <= v <= 1)),
    "retrain.val_split": number(0, null=_RECIPE),  # a fraction or a count; the data bounds the count
    "retrain.grad_clip": Rule(">= 0 (0 = off), or null (the space's retraining recipe)",
                              lambda v: v is None or (_is_number(v) and v >= 0)),
    "retrain.drop_path_prob": number(0, 1, open_high=True, null=_RECIPE),
    "retrain.auxiliary_weight": number(0, null=_RECIPE),
    "retrain.lr_min": number(0, null=_RECIPE),
    "space.supernet.C": integer(1),
    "space.supernet.N": integer(1),
    "space.supernet.layers": integer(1),
    "space.supernet.partial_channels": integer(1),
    "space.network.C": integer(1),
    "space.network.N": integer(1),
    "space.network.layers": integer(1),
    "network.C": integer(1, null="the space's default"),
    "network.N": integer(1, null="the space's default"),
    "network.layers": integer(1, null="the space's default"),
    "strategy.order": choice(1, 2),
    "strategy.grad_clip": number(0),  # 0 = off; torch clips a negative norm by flipping signs
    "strategy.warmup_epochs": integer(0),
    "strategy.w_lr_min": number(0),
    "strategy.controller_every": integer(1),
    "strategy.controller_steps_per_batch": integer(1),
    "strategy.derive_samples": integer(0),  # 0 = the most likely architecture
    "strategy.derive_batches": integer(1),
    "warmstart.keep": integer(1),
    **{f"strategy.{k}": r for k, r in _PRUNE.items()},
    **{f"warmstart.{k}": r for k, r in _PRUNE.items()},
    **{f"{opt}.{k}": number(0, null=_RECIPE if opt == "retrain.optimizer" else None)
       for opt in ("strategy.w_optimizer", "strategy.a_optimizer", "strategy.c_optimizer", "retrain.optimizer")
       for k in ("lr", "momentum", "weight_decay")},  # fmt: skip
}

# Issue 16: GDAS, DrNAS, the collapse guards (conf/strategy/{gdas,drnas}.yaml, darts.yaml).
RULES.update({
    "strategy.regularizer": Rule("null (off), beta or auxiliary_skip", lambda v: v in (None, "beta", "auxiliary_skip")),
    "strategy.regularizer_weight": number(0, null="the paper's: beta 50, auxiliary_skip 1"),
    "strategy.tau_max": number(0, open_low=True),
    "strategy.tau_min": number(0, open_low=True),
    "strategy.kl_weight": number(0),  # 0 = no KL term
    "strategy.prior": number(0, open_low=True),  # a Dirichlet concentration
    "strategy.search": choice("evolution", "random"),
    "strategy.population": integer(1),
    "strategy.generations": integer(1),
    "strategy.top_k": integer(1),
    "strategy.n_mutation": integer(0),
    "strategy.n_crossover": integer(0),
    "strategy.mutation_prob": number(0, 1),
    "strategy.recalibration_batches": integer(1),
    "strategy.eval_batches": integer(1),
})


# Issue 18: the metrics the prune ranks by (warmstart=proxies, warmstart=tenas, strategy=tenas).
_METRIC_NAMES = ("naswot", "synflow", "snip", "grasp", "fisher", "grad_norm", "jacob_cov", "zen",
                 "params", "flops", "ntk", "regions")  # fmt: skip
_METRICS = Rule(
    "a non-empty list of distinct names from " + ", ".join(_METRIC_NAMES),
    lambda v: isinstance(v, list | ListConfig) and len(v) > 0 and len(set(v)) == len(v)
    and all(m in _METRIC_NAMES for m in v),
)  # fmt: skip
RULES.update({"warmstart.metrics": _METRICS, "strategy.metrics": _METRICS})
# Issue 18: benchmark tables logged during the search (conf/benchmark/).
RULES.update({"benchmark.name": choice("none", "nb201")})

# issue 17 (A): cost measurement (conf/cost/) and budgets (conf/budget/); oneshot/cost/.
def _cuda_ok(v) -> bool:
    if v == "cpu":
        return True
    if v != "cuda":
        return False
    import torch  # only when cuda is asked for

    return torch.cuda.is_available()


RULES.update({
    "cost.device": Rule("cpu, or cuda on a machine with a CUDA GPU (torch.cuda.is_available() is False here)",
                        _cuda_ok),
    "cost.batch_size": integer(1),
    "cost.threads": integer(1, null="torch's current thread count"),
    "cost.warmup": integer(0),
    "cost.repeats": integer(1),
    "cost.table": Rule("a path to a latency-*.json table, or null (measure here)",
                       lambda v: v is None or (isinstance(v, str) and bool(v))),
    "cost.cache_dir": Rule("a directory, or null ($XDG_CACHE_HOME/oneshot/cost)",
                           lambda v: v is None or (isinstance(v, str) and bool(v))),
    "cost.progress": Rule("true or false", lambda v: isinstance(v, bool)),
    "cost.calibrate": integer(0),
    "budget.metric": choice("latency", "flops", "params"),
    "budget.max": number(0, open_low=True, null="no budget"),
    "budget.loss": choice("hinge", "proxyless", "fbnet"),
    "budget.reward": choice("hard", "tunas"),
    "budget.dual_lr": number(0),
    "budget.multiplier": number(0),
})  # fmt: skip


def check_cost_table(cfg: DictConfig) -> None:
    """``cost.table=`` must be a latency table of this space and of ``cost.device``'s kind (its
    shapes and sizes are compared when the supernet exists, still before any training)."""
    import json

    table = OmegaConf.select(cfg, "cost.table", default=None)
    if not table:
        return
    path = Path(str(table)).expanduser()
    if not path.is_file():
        raise ConfigError(f"cost.table={table}: no such file; valid: a latency-*.json table (a search's cost cache)")
    try:
        meta = json.loads(path.read_text())["meta"]
        space, device = meta["space"], meta.get("device")
    except (ValueError, KeyError, TypeError, OSError):
        raise ConfigError(f"cost.table={table} is not a oneshot latency table (latency-*.json of a search's cost cache)") from None
    name = OmegaConf.select(cfg, "space.name", default=None)
    want = "model" if OmegaConf.select(cfg, "space.model", default=None) is not None else name
    if space != want:
        raise ConfigError(f"cost.table={table} was measured for space {space}; valid: a table measured for space {want}")
    wanted_device = OmegaConf.select(cfg, "cost.device", default="cpu")
    if device != wanted_device:
        raise ConfigError(f"cost.table={table} was measured on {device} ({meta.get('device_name')}); "
                          f"valid: a table measured with cost.device={wanted_device}")  # fmt: skip


# issue 17 (B): the retraining's deployable files (conf/retrain/default.yaml `export`; oneshot/export.py).
_EXPORT_FORMATS = ("onnx", "torchscript")
RULES.update({
    "retrain.export": Rule(
        "a list of distinct formats from " + ", ".join(_EXPORT_FORMATS) + ", [] for none",
        lambda v: isinstance(v, list | ListConfig) and len(set(v)) == len(v) and all(f in _EXPORT_FORMATS for f in v),
    ),
    # ENAS under a budget (conf/strategy/enas.yaml): the reward form (budget.reward) and TuNAS' beta
    "strategy.budget_reward": choice("hard", "tunas"),
    "strategy.tunas_beta": number(high=0, open_high=True),
})  # fmt: skip


def _select(cfg: DictConfig, key: str):
    """``(found, value)``; a value that cannot be resolved is a ConfigError naming the key."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return False, None
    if OmegaConf.is_missing(node, leaf):
        return True, "???"
    try:
        value = node[leaf]
    except Exception as e:  # an interpolation that fails: ${space.presets.${size}...} for a bad size
        raise ConfigError(f"{key} cannot be resolved: {str(e).splitlines()[0]}") from None
    return True, value


# Rules that depend on the space (``space.name``): DARTS' reduction cells sit at layers//3 and
# 2*layers//3, so fewer than 3 layers leave no normal cell to search; a DARTS warm start to one op
# per edge would drop TE-NAS' choice of two inputs per node (strategy=tenas is that search).
SPACE_RULES: dict[str, dict[str, Rule]] = {
    "darts": {
        "space.supernet.layers": Rule("an integer, layers >= 3 (the reduction cells at layers//3 and 2*layers//3 "
                                      "leave no normal cell to search below 3)", lambda v: _is_int(v) and v >= 3),
        "warmstart.keep": Rule("2..7 (ops per edge to keep; for one op per edge and two inputs per node "
                               "run TE-NAS itself: strategy=tenas space=darts)", lambda v: _is_int(v) and 2 <= v <= 7),
    },
    "nb201": {"warmstart.keep": Rule("1..4 (ops per edge to keep)", lambda v: _is_int(v) and 1 <= v <= 4)},
}


def check_values(cfg: DictConfig) -> None:
    space = OmegaConf.select(cfg, "space.name", default=None)
    presets = OmegaConf.select(cfg, "space.presets", default=None)
    if isinstance(presets, DictConfig) and cfg.get("size") not in presets:  # before ${space.presets.${size}} fails
        raise ConfigError(f"size={cfg.get('size')} is not a preset of space {space}; valid: {', '.join(presets)}")
    for key, rule in [*RULES.items(), *SPACE_RULES.get(space, {}).items()]:
        found, value = _select(cfg, key)
        if found and not rule.ok(value):
            raise ConfigError(f"{key}={value} is out of range; valid: {rule.valid}")


def check_data(cfg: DictConfig, datasets=()) -> None:
    """The dataset's name (one of ``datasets``, when given) and, for your own files, that
    ``data.path`` is given and exists; NB201's two reductions need a side divisible by 4."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig):
        return
    name = data.get("name")
    if datasets and name not in datasets:
        raise ConfigError(f"data.name={name} is not a dataset; valid: {', '.join(datasets)}")
    size, space = data.get("image_size"), OmegaConf.select(cfg, "space.name", default=None)
    if space == "nb201" and _is_int(size) and size % 4:
        raise ConfigError(
            f"data.image_size={size} is out of range; valid for space=nb201: a multiple of 4 (two "
            "reductions halve it exactly)"
        )
    needs = {"npz": ("a file", "<file.npz>"), "imagefolder": ("a directory", "<folder of class folders>")}
    if name in needs:
        kind, example = needs[name]
        if OmegaConf.is_missing(data, "path") or data.get("path") is None:
            raise ConfigError(f"data.path is required for data.name={name}: add data.path={example}")
        for key in ("path", "test_path"):
            value = data.get(key)
            if value is None:
                continue
            path = Path(str(value)).expanduser()
            if not (path.is_file() if name == "npz" else path.is_dir()):
                raise ConfigError(f"data.{key}={value}: no such {kind.split()[1]} ({name} data needs {kind})")


def check_run_dirs(cfg: DictConfig, hydra_run_dir: str | None = None) -> None:
    """A run directory must be creatable: no file in the way, and writable."""
    for key, value in (("run_dir", cfg.get("run_dir")), ("hydra.run.dir", hydra_run_dir)):
        if not value:
            continue
        path = Path(str(value)).expanduser().absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under {existing}, which is a file"
            raise ConfigError(f"{key}={value} {where}, not a directory; give a directory ({key}=...)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={value}: no permission to write in {existing}")


def load_checkpoint(path, key: str = "ckpt_path") -> dict:
    """A checkpoint that Lightning can resume from, loaded with ``weights_only=True`` (never runs
    code) and ``mmap`` (reads no tensor data until touched, so checking a large file costs
    milliseconds), or one line saying why it cannot be. The one checkpoint reader of oneshot."""
    import zipfile

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file (give a .ckpt a run wrote, or ckpt_path=last)")
    if path.stat().st_size == 0 or not zipfile.is_zipfile(path):
        what = "is empty" if path.stat().st_size == 0 else "is truncated, corrupt or not a torch file"
        raise ConfigError(f"{key}={path} {what}: it cannot be loaded safely as a checkpoint; "
                          "give one a run wrote (RUN_DIR/checkpoints/*.ckpt)")  # fmt: skip
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated inside, or a pickle that would run code
        why = ("it holds objects other than tensors and plain containers" if "weights_only" in str(e)
               else "it is truncated or corrupt")  # fmt: skip
        raise ConfigError(f"{key}={path} cannot be loaded safely as a checkpoint ({why})") from None
    required = ("state_dict", "epoch", "global_step")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in required) or not isinstance(ckpt["state_dict"], dict):
        has = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(
            f"{key}={path} is not a oneshot checkpoint: not a Lightning checkpoint of a search or retraining "
            f"(needs {', '.join(required)}; has {has})"
        )
    return ckpt


def check_devices(cfg: DictConfig) -> None:
    """A GPU trainer needs a GPU: say so before anything starts (torch is imported only here)."""
    trainer = cfg.get("trainer")
    if not isinstance(trainer, DictConfig) or str(trainer.get("accelerator")) not in ("gpu", "cuda"):
        return
    import torch

    count, devices = torch.cuda.device_count(), trainer.get("devices")
    accelerator = f"trainer.accelerator={trainer.accelerator}"
    if count == 0:
        raise ConfigError(
            f"{accelerator} needs a CUDA GPU and this machine has none; valid here: trainer=cpu "
            "(or trainer=ddp_cpu for several processes; experiments: add trainer=cpu)"
        )
    if _is_int(devices) and devices > count:
        raise ConfigError(f"trainer.devices={devices} is out of range; valid: 1..{count} (this machine's GPUs) or -1")


def check_config(cfg: DictConfig, hydra_run_dir: str | None = None, datasets=()) -> None:
    """Everything that can be checked before a run starts; raises ConfigError (one line)."""
    check_values(cfg)
    check_data(cfg, datasets)
    check_run_dirs(cfg, hydra_run_dir)
    ckpt = cfg.get("ckpt_path")
    if ckpt and ckpt != "last":
        load_checkpoint(ckpt)
    check_devices(cfg)
    check_model_space(cfg)
    check_cost_table(cfg)  # issue 17 (A)


def check_genotype(genotype, space: str, what: str) -> None:
    """For the Python API: ``what`` builds ``space`` networks; another space's genotype or None
    is a GenotypeError naming both, not an AttributeError deep inside."""
    from oneshot.genotypes import DartsGenotype, GenotypeError, NB201Genotype

    expected = {"nb201": NB201Genotype, "darts": DartsGenotype}[space]
    if not isinstance(genotype, expected):
        got = getattr(genotype, "space", None)
        got = f"a {got} genotype" if got else f"{type(genotype).__name__} {genotype!r}"[:80]
        raise GenotypeError(
            f"{what} needs a {space} genotype, got {got}; oneshot.genotypes.resolve(...) reads a string, "
            "file or published name, and oneshot.spaces.build_network(genotype) builds any space's network"
        )


# ---- override types (the config composed without the values gives each key's default) ----

# Trainer arguments whose default is an int but which also take strings or lists.
_ANY_TYPE = {"trainer.devices"}


def check_override_types(cfg: DictConfig) -> None:
    """``seed=abc``: a value override must have its default's type (an int for an int, a number
    for a float, a bool for a bool), checked against the config composed without the values."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

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
            ok, kind = _is_int(value), "an integer"
        else:
            ok, kind = _is_number(value), "a number"
        if not ok:
            raise ConfigError(f"{key}={text}: {key} must be {kind} (its default is {default})")


def disk_error(exc: BaseException) -> ConfigError | None:
    """A full (or read-only) disk, anywhere in the run, as one line naming the file."""
    chain, e = [], exc
    while e is not None and len(chain) < 20:  # torch.save raises a RuntimeError whose context is the OSError
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
            where = f" writing {e.filename}" if e.filename else ""
            return ConfigError(
                f"{os.strerror(e.errno).lower()}{where}: free space, then continue the run with ckpt_path=last "
                "(every file is written whole or not at all)"
            )
        if isinstance(e, RuntimeError) and "file write failed" in str(e):  # torch.save's zip writer
            return ConfigError(
                "a checkpoint could not be written (disk full?): free space, then continue the run with ckpt_path=last"
            )
    return None


# ---- issue 15: a user's own model as the space (space=model, oneshot-retrain arch=...) ----


def check_model_space(cfg: DictConfig) -> None:
    """``space.model._target_`` is given and its module can be found (from the working directory
    or PYTHONPATH; found, not imported, so torch stays unloaded); ``arch=`` comes with a model."""
    import importlib.util
    import sys

    model = OmegaConf.select(cfg, "space.model", default=None)
    if isinstance(model, DictConfig):
        if OmegaConf.is_missing(model, "_target_") or not model.get("_target_"):
            raise ConfigError("space.model._target_ is required: the class of your model, e.g. "
                              "space.model._target_=mypkg.nets.MyNet")  # fmt: skip
        target = str(model._target_)
        module, _, name = target.rpartition(".")
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:  # oneshot's own spaces (space=mobilenet) are there; finding them would import torch
            found = target.startswith("oneshot.") or (bool(module and name) and importlib.util.find_spec(module) is not None)
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"space.model._target_={target} cannot be imported: no module {module or target!r}; "
                              "valid: a class importable from the working directory or PYTHONPATH, e.g. mypkg.nets.MyNet")  # fmt: skip
    if cfg.get("arch") is not None and model is None:
        raise ConfigError(f"arch={cfg.arch} needs the model it fixes: add space=model space.model._target_=mypkg.nets.MyNet "
                          "(or space=mobilenet)")  # fmt: skip
