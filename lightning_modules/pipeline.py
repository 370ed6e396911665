"""The pipeline behind ``oneshot-search`` and ``oneshot-retrain`` (and ``oneshot.search(cfg)`` /
``oneshot.retrain(cfg)``): instantiate from the config, fit, derive, retrain, write the run
directory. Each stage reads only files an earlier one wrote.

Run directory::

    config.yaml                 resolved config
    checkpoints/last.ckpt ...   search checkpoints (resume with ckpt_path=last); none for strategy=tenas
    warmstart.json, .csv        TE-NAS prune history (warmstart=tenas; tenas.json/.csv for strategy=tenas)
    metrics.csv                 search metrics (+ wandb/ with logger=wandb)
    genotype.txt, genotype.json the derived architecture
    retrain/                    checkpoints, metrics.csv, network.pt, report.json of the retraining
    report.json                 genotype, timings, test accuracy
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from oneshot.lightning_modules.base import check_ranks_agree
from oneshot.lightning_modules.checkpoint_hparams import record_hparams
from oneshot.lightning_modules.pictures import finish_pictures
from oneshot.lightning_modules.retrain import Retrain
from oneshot.lightning_modules.retrain_recipes import network_size, resolve_recipe
from oneshot.lightning_modules.run_safety import (
    checkpoint_stage,
    last_checkpoint,
    progress,
    read_checkpoint,
)
from oneshot.lightning_modules.runs import (
    atomic_write_json,
    atomic_write_text,
    make_callbacks,
    make_loggers,
    make_trainer,
    pictures_enabled,
    resolve_run_dir,
    validates,
)
from pytorch_lightning.utilities import rank_zero_only

from oneshot.data import RetrainDataModule, SearchDataModule
from oneshot.genotypes import parse as parse_genotype
from oneshot.genotypes import resolve as resolve_genotype
from oneshot.spaces import build_network

log = logging.getLogger("oneshot")


def _data_kwargs(cfg_data: DictConfig, drop=(), **overrides) -> dict:
    kwargs = OmegaConf.to_container(cfg_data, resolve=True)
    for key in drop:
        kwargs.pop(key, None)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def supernet_config(cfg: DictConfig, info, candidates=None) -> dict:
    """The supernet's ``_target_`` and constructor arguments, the data's shape included: what
    builds it here and, kept in checkpoints, in ``load_from_checkpoint``."""
    extra = {"candidates": candidates} if candidates is not None else {}
    return {**OmegaConf.to_container(cfg.space.supernet, resolve=True), "num_classes": info.num_classes,
            "in_channels": info.in_channels, "image_size": info.image_size, **extra}  # fmt: skip


def build_supernet(cfg: DictConfig, info, candidates=None):
    return instantiate(supernet_config(cfg, info, candidates), _convert_="all")


def search(cfg: DictConfig) -> dict:
    """Search, derive and (unless ``retrain.enabled=false``) retrain; returns the report."""
    if cfg.retrain.enabled:  # a bad retraining value stops the run now, not after the search
        resolve_recipe(cfg, cfg.space.get("name"))
    _check_ckpt_path(cfg, ("search", "retrain"))  # a bad checkpoint stops here, before the run directory
    from oneshot.lightning_modules.benchmark import BenchmarkAccuracy, accuracies, load_benchmark

    benchmark = load_benchmark(cfg)  # issue 18: a bad benchmark table stops the run before it starts
    run_dir = resolve_run_dir(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = SearchDataModule(**_data_kwargs(cfg.data, seed=cfg.seed))
    info = datamodule.info
    candidates, warmstart_report = None, None
    start = time.perf_counter()  # search time counts the warm start's prune too
    if cfg.get("warmstart") and cfg.warmstart.get("enabled"):
        from oneshot.lightning_modules.warmstart import run_warmstart

        candidates, warmstart_report = run_warmstart(cfg, datamodule, run_dir)
    supernet = build_supernet(cfg, info, candidates)
    module = instantiate(cfg.strategy, supernet=supernet, _convert_="partial")
    from oneshot.cost.budget import budget_from_cfg
    from oneshot.cost.derive import nb201_connected

    module.budget = budget_from_cfg(cfg, supernet, info)  # issue 17: None without budget.max; a budget none meets stops here
    strategy_cfg = OmegaConf.to_container(cfg.strategy, resolve=True)
    strategy_cfg.pop("_target_")
    record_hparams(module, **strategy_cfg, supernet=supernet_config(cfg, info, candidates))  # DartsSearch.load_from_checkpoint(...)
    module.search_seconds_before = time.perf_counter() - start  # a resume replaces it by the checkpoint's
    loggers = make_loggers(cfg, run_dir, stage="search")
    draw = pictures_enabled(cfg)
    search_from = _ckpt(cfg, run_dir, "search")
    resumed_at = progress(read_checkpoint(search_from)) if search_from else None  # before fit moves it on
    try:
        callbacks = make_callbacks(cfg, run_dir, validates(OmegaConf.to_container(cfg.trainer, resolve=True)))
        callbacks += [BenchmarkAccuracy(benchmark)] if benchmark is not None else []  # issue 18
        trainer = make_trainer(cfg.trainer, run_dir, loggers, callbacks=callbacks)
        if getattr(module, "training_free", False):  # TE-NAS: the search is a prune; no fit, no checkpoints
            module.search_without_training(datamodule, run_dir)
        else:
            trainer.fit(module, datamodule=datamodule, ckpt_path=search_from)
        # Derived first: a search that runs after training (SPOS' evolution, ENAS' scoring) is search time.
        genotype = module.derive_genotype()
        budget_report = None
        if module.budget is not None:  # issue 17: the written architecture is always within budget
            genotype, budget_report = module.budget.enforce(module, genotype)
        elif genotype.space == "nb201" and not nb201_connected(genotype.edge_ops):
            log.warning("the derived cell %s has no path of non-'none' ops from its input to its output: the "
                        "network computes a constant (chance accuracy); search longer, or with budget.* set "
                        "the derivation keeps the most probable connected cell", genotype)  # fmt: skip
        # The whole search: warm start and training, summed over a killed run and its resumes.
        training_free = getattr(module, "training_free", False)
        search_seconds = time.perf_counter() - start if training_free else module.search_seconds()
        ranks = check_ranks_agree(module, genotype)  # DDP: every rank derived the same
        report = {
            "genotype": str(genotype),
            "space": genotype.space,
            "strategy": type(module).__name__,
            "search_seconds": round(search_seconds, 1),
            "supernet_weight_parameters": supernet.num_weight_parameters(),
            "genotypes_per_epoch": list(module.genotypes),
            "warmstart": warmstart_report,
            **({"benchmark": accuracies(benchmark, genotype)} if benchmark is not None else {}),  # issue 18
            **({"budget": budget_report} if budget_report is not None else {}),  # issue 17
            **({"ddp": ranks} if ranks else {}),
        }
        if trainer.is_global_zero:
            atomic_write_text(run_dir / "genotype.txt", str(genotype) + "\n")
            atomic_write_json(run_dir / "genotype.json", genotype.to_json())
            if genotype.space == "model":  # issue 15: a model space's {label: value}, what retrain arch= reads
                atomic_write_json(run_dir / "arch.json", genotype.to_json())
            atomic_write_json(run_dir / "report.json", report)
        log.info("derived genotype: %s", genotype)
        finish_pictures(loggers, run_dir, report, draw=draw, stage="search")
    except BaseException:
        _finish(loggers, exit_code=1)
        raise
    # The search's loggers end here: the retraining logs into its own (W&B: a second run in the
    # search's group), so each run's summary and step axis belong to one stage.
    search_run = _finish(loggers)
    if cfg.retrain.enabled:
        network_kwargs = OmegaConf.to_container(cfg.space.network, resolve=True)
        retrain_dir = run_dir / "retrain"  # a resumed search resumes its retraining too
        ckpt = _ckpt(cfg, retrain_dir, "retrain", search=(run_dir, resumed_at))
        retrain_loggers = make_loggers(cfg, retrain_dir, stage="retrain", search_run=search_run)
        try:
            report["retrain"] = retrain_genotype(genotype, cfg, retrain_dir, network_kwargs, retrain_loggers, ckpt)
            if trainer.is_global_zero:
                atomic_write_json(run_dir / "report.json", report)
            finish_pictures(retrain_loggers, run_dir, report, draw=draw, stage="retrain")
        except BaseException:
            _finish(retrain_loggers, exit_code=1)
            raise
        _finish(retrain_loggers)
    if trainer.is_global_zero:  # issue 17: what the result costs, against the budget
        report["cost"] = _result_cost(cfg, module, genotype, info, report.get("retrain"))
        atomic_write_json(run_dir / "report.json", report)
    _print_summary(report, run_dir)
    return report


def _result_cost(cfg, module, genotype, info, retrained: dict | None) -> dict:
    """Issue 17: the retrained network's cost (else the derived network's at ``space.network``'s
    sizes, which cost the same untrained), with the budget's verdict when there is a budget."""
    from oneshot.result_cost import against_budget, result_cost

    cost = (retrained or {}).get("cost")
    if cost is None:
        network_kwargs = OmegaConf.to_container(cfg.space.network, resolve=True)
        network = build_network(genotype, num_classes=info.num_classes, in_channels=info.in_channels,
                                image_size=info.image_size, **network_kwargs)  # fmt: skip
        cost = result_cost(network, (info.in_channels, info.image_size, info.image_size), cfg)
    budget = getattr(module, "budget", None)
    return against_budget(cost, budget, genotype) if budget is not None else cost


def retrain(cfg: DictConfig) -> dict:
    """Retrain ``cfg.genotype`` (a file, a published name or a string) from scratch, at the
    ``size`` preset of its space and with its space's recipe unless ``retrain=`` names one.
    ``space=model arch=arch.json`` (issue 15): the fixed network of a model space instead."""
    if cfg.get("arch") is not None:
        genotype, network_kwargs = _model_arch(cfg)
    else:
        genotype = resolve_genotype(cfg.genotype)
        network_kwargs = network_size(genotype.space, cfg.get("size", "paper"), cfg.network)
    _check_network_kwargs(genotype, network_kwargs)
    resolve_recipe(cfg, genotype.space)  # bad values stop here, before the run directory is made
    _check_ckpt_path(cfg, ("retrain",))
    run_dir = resolve_run_dir(cfg)
    loggers = make_loggers(cfg, run_dir, stage="retrain")
    try:
        report = {"genotype": str(genotype), "space": genotype.space}
        report["retrain"] = retrain_genotype(genotype, cfg, run_dir, network_kwargs, loggers, _ckpt(cfg, run_dir, "retrain"))
        if report["retrain"].get("cost") is not None:  # issue 17
            report["cost"] = report["retrain"]["cost"]
        finish_pictures(loggers, run_dir, report, draw=pictures_enabled(cfg))
    except BaseException:
        _finish(loggers, exit_code=1)
        raise
    _finish(loggers)
    _print_summary(report, run_dir)
    return report


def retrain_genotype(genotype, cfg, out_dir: Path, network_kwargs: dict, loggers=None, ckpt_path=None) -> dict:
    """Train ``genotype``'s network from scratch with the recipe of its space (conf/retrain/), on the
    training set less a validation part; the test set is used once, after training. ``loggers``
    write into ``out_dir`` (``make_loggers(cfg, out_dir, stage="retrain")``)."""
    rcfg = resolve_recipe(cfg, genotype.space)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule = RetrainDataModule(
        **_data_kwargs(cfg.data, drop=("split",), batch_size=rcfg.batch_size, seed=cfg.seed),
        val_split=rcfg.val_split, cutout=rcfg.cutout,
    )  # fmt: skip
    info = datamodule.info
    _check_network_kwargs(genotype, network_kwargs)
    network = build_network(
        genotype, num_classes=info.num_classes, in_channels=info.in_channels, image_size=info.image_size,
        **network_kwargs,
    )  # fmt: skip
    module = Retrain(
        network, optimizer=instantiate(rcfg.optimizer), lr_min=rcfg.lr_min,
        auxiliary_weight=rcfg.auxiliary_weight, drop_path_prob=rcfg.drop_path_prob,
    )  # fmt: skip
    network_cfg = {"_target_": "oneshot.spaces.build_network",
                   "genotype": {"_target_": "oneshot.genotypes.parse", "text": str(genotype)},
                   "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": info.image_size,
                   **network_kwargs}  # fmt: skip
    if genotype.space == "model":  # the user's model config is built by fixed_network, not by Hydra
        network_cfg = {**network_cfg, "_target_": "oneshot.spaces.model.fixed_network", "_recursive_": False,
                       "arch": str(network_cfg.pop("genotype")["text"])}  # fmt: skip
    record_hparams(module, network=network_cfg, optimizer=OmegaConf.to_container(rcfg.optimizer, resolve=True),
                   lr_min=rcfg.lr_min, auxiliary_weight=rcfg.auxiliary_weight, drop_path_prob=rcfg.drop_path_prob)  # fmt: skip
    # Not struct: retrain.trainer may set Trainer arguments that the search's trainer leaves out.
    trainer_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.trainer, resolve=True), rcfg.trainer)
    no_val = {"limit_val_batches": 0} if not rcfg.val_split else {}  # val_split=0: no validation loop
    callbacks = make_callbacks(cfg, out_dir, validates({**OmegaConf.to_container(trainer_cfg, resolve=True), **no_val}))
    trainer = make_trainer(trainer_cfg, out_dir, loggers or [], callbacks=callbacks,
                           gradient_clip_val=rcfg.grad_clip or None, **no_val)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    val_acc = trainer.callback_metrics.get("val/acc")  # the last epoch's, on the held-out training images
    tested = trainer.test(module, datamodule=datamodule, verbose=False)  # the one use of the test set
    params = sum(p.numel() for n, p in network.named_parameters() if "auxiliary" not in n)
    result = {
        "test_acc": round(float(tested[0]["test/acc"]), 4) if tested else None,
        "val_acc": round(float(val_acc), 4) if val_acc is not None else None,
        "images": {"train": len(datamodule.train_set), "val": len(datamodule.val_set or ()),
                   "test": len(datamodule.splits.y_test)},  # fmt: skip
        "recipe": OmegaConf.to_container(rcfg, resolve=True),
        "retrain_seconds": round(seconds, 1),
        "parameters": params,
        "network": network_kwargs,
        "epochs": trainer.current_epoch,
    }
    if trainer.is_global_zero:
        export = {"genotype": str(genotype), "network_kwargs": {**network_kwargs, "num_classes": info.num_classes,
                  "in_channels": info.in_channels, "image_size": info.image_size}, "state_dict": network.state_dict()}  # fmt: skip
        from oneshot.lightning_modules.runs import atomic_save

        atomic_save(export, out_dir / "network.pt")
        atomic_write_json(out_dir / "report.json", result)
        # Issue 17: deployable files (ONNX, TorchScript) with their parity and latency, once the weights are safe.
        from oneshot.lightning_modules.retrain import export_retrained

        exported = export_retrained(network, out_dir, cfg, rcfg.get("export", ["onnx", "torchscript"]),
                                    (info.in_channels, info.image_size, info.image_size), trainer.fast_dev_run)  # fmt: skip
        if exported is not None:
            result["export"] = exported
        from oneshot.result_cost import result_cost

        result["cost"] = result_cost(network, (info.in_channels, info.image_size, info.image_size), cfg, exported)
        atomic_write_json(out_dir / "report.json", result)
    return result


def _model_arch(cfg) -> tuple:
    """``oneshot-retrain space=model arch=...`` (issue 15): the ``Arch`` and the network's kwargs
    (the model config), checked against the model before anything is written."""
    from oneshot.arch import load_arch
    from oneshot.spaces.model import fixed_network

    model = OmegaConf.select(cfg, "space.model", default=None)
    if model is None:
        raise ValueError(f"arch={cfg.arch} needs the model it fixes: add space=model space.model._target_=mypkg.nets.MyNet "
                         "(or space=mobilenet)")  # fmt: skip
    model = OmegaConf.to_container(model, resolve=True)
    arch = load_arch(str(cfg.arch))
    with torch.device("meta"):  # the structure only: a missing or unknown label stops here
        fixed_network(arch, model)
    return arch, {"model": model}


def _check_network_kwargs(genotype, network_kwargs: dict) -> None:
    """``network.layers=8`` for an NB201 genotype is a mistake to name, not a TypeError."""
    import inspect

    from oneshot.spaces import space_of

    params = inspect.signature(space_of(genotype).build_network).parameters
    valid = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD
             and n not in ("genotype", "num_classes", "in_channels", "image_size")]  # fmt: skip
    for key, value in network_kwargs.items():
        if key not in valid:
            raise ValueError(
                f"network.{key}={value} does not apply to a {genotype.space} genotype; "
                f"{genotype.space} networks take: {', '.join(f'network.{n}' for n in valid)}"
            )


def load_network(path) -> torch.nn.Module:
    """Rebuild an exported network (``retrain/network.pt``) with its trained weights.

    The file is read with ``weights_only=True``: an export holds a genotype string, a dict of
    sizes and tensors, and a downloaded file that would run code when unpickled is refused."""
    not_ours = f"{path} is not a oneshot export (retrain/network.pt: a genotype string, network sizes and weights)"
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{path}: no such file (an export is RUN_DIR/retrain/network.pt)") from None
    except Exception as e:
        unsafe = "weights_only" in str(e)
        raise ValueError(f"{not_ours}: it cannot be loaded safely" if unsafe else f"{not_ours}: it cannot be read") from None
    kwargs = bundle.get("network_kwargs") if isinstance(bundle, dict) else None
    if isinstance(kwargs, dict) and isinstance(kwargs.get("model"), dict):  # issue 15: a model space's network
        raise ValueError(f"{path} holds a network of your own model class, which a file is not trusted to name: rebuild it "
                         f"with oneshot.fix(<your space.model config>, {bundle.get('genotype')!r:.200}) and load its "
                         "'state_dict' (torch.load(path, weights_only=True))")  # fmt: skip
    ok = (isinstance(kwargs, dict) and isinstance(bundle.get("genotype"), str) and isinstance(bundle.get("state_dict"), dict)
          and all(isinstance(k, str) and isinstance(v, int | float | bool | None) for k, v in kwargs.items()))  # fmt: skip
    if not ok:
        raise ValueError(not_ours)
    try:  # parse, not resolve: a string inside a downloaded file never names a file to read
        network = build_network(parse_genotype(bundle["genotype"]), **kwargs)
        network.load_state_dict(bundle["state_dict"])
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: the export does not rebuild ({str(e).splitlines()[0][:200]})") from None
    return network.eval()


def _check_ckpt_path(cfg, stages: tuple[str, ...]) -> None:
    """An explicit ``ckpt_path`` must be a checkpoint of one of ``stages``, read safely; checked
    before anything is written (``ckpt_path=last`` is resolved per stage by ``_ckpt``)."""
    spec = cfg.get("ckpt_path")
    if not spec or spec == "last":
        return
    kind = checkpoint_stage(read_checkpoint(spec))
    if kind is None:
        raise ValueError(f"ckpt_path={spec} is not a oneshot checkpoint: its weights are neither a search's supernet "
                         "nor a retrained network")  # fmt: skip
    if kind not in stages:
        raise ValueError(f"ckpt_path={spec} is a search checkpoint (a supernet); oneshot-retrain resumes a retraining: "
                         "give RUN_DIR/checkpoints/last.ckpt of an oneshot-retrain run, or ckpt_path=last")  # fmt: skip


def _ckpt(cfg, stage_dir: Path, stage: str, search: tuple | None = None):
    """The checkpoint that ``stage`` ("search" or "retrain", writing into ``stage_dir``) resumes
    from: ``ckpt_path=last`` means the stage's own latest one, an explicit file applies to the
    stage it belongs to (told by its contents), and the other stage continues from its own.

    A search's retraining (``search=(search_dir, (epoch, step) the search resumed from)``)
    continues only if the search did not train past that point; otherwise the genotype may
    have changed and the retraining starts over."""
    spec = cfg.get("ckpt_path")
    if not spec:
        return None
    own_last = last_checkpoint(stage_dir / "checkpoints")
    explicit = None if spec == "last" else read_checkpoint(spec)
    if explicit is not None and checkpoint_stage(explicit) == stage:
        chosen = str(Path(spec).expanduser())
    elif explicit is not None and stage == "search" and own_last is None:
        raise ValueError(f"ckpt_path={spec} is a retraining checkpoint, but {stage_dir} holds no search checkpoint to "
                         "continue first; resume the retraining alone with oneshot-retrain, or give a search checkpoint")  # fmt: skip
    else:
        chosen = str(own_last) if own_last else None
    if stage == "retrain" and search is not None and (explicit is None or checkpoint_stage(explicit) != stage):
        search_dir, resumed_at = search
        search_last = last_checkpoint(search_dir / "checkpoints")
        moved_on = search_last is not None and progress(read_checkpoint(search_last)) != resumed_at
        return None if moved_on else chosen
    return chosen


def _finish(loggers, exit_code: int = 0):
    """End the stage's W&B run, marked failed (``exit_code=1``) when the stage raised; an offline
    run says how to upload it. Returns the run's name, id and group (the retraining is named
    after the search), or None without W&B."""
    ended = None
    for lg in loggers or []:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            run = lg._experiment  # None if nothing was logged: then there is no run to end
            if run is not None:
                ended = SimpleNamespace(name=run.name, id=run.id, group=run.group)
            offline = run is not None and getattr(run.settings, "mode", "") == "offline"
            wandb.finish(exit_code=exit_code)
            if offline and rank_zero_only.rank == 0:
                log.info("W&B run saved offline; upload it with: wandb sync %s", Path(run.dir).parent)
    return ended


def _print_summary(report: dict, run_dir: Path) -> None:
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    lines = [f"genotype: {report['genotype']}"]
    if "search_seconds" in report:
        lines.append(f"search time: {report['search_seconds']} s")
    if "retrain" in report:
        r = report["retrain"]
        lines.append(f"retrain time: {r['retrain_seconds']} s ({r['parameters']:,} parameters)")
        lines.append(f"test accuracy: {r['test_acc']}")
    from oneshot.export import summary_lines
    from oneshot.result_cost import cost_lines

    if isinstance(report.get("cost"), dict):  # issue 17
        lines += cost_lines(report["cost"])
    exported = (report.get("retrain") or {}).get("export") or {}
    if "pytorch" in exported:
        lines += [line for line in summary_lines(exported, run_dir if "search_seconds" not in report else run_dir / "retrain")
                  if not line.startswith("pytorch:")]  # fmt: skip
    lines.append(f"run directory: {run_dir}")
    log.info("\n".join(lines))
