"""The trained network of a run directory, for ``oneshot-export`` (issue 17): an ``oneshot-retrain``
run (``network.pt``), a search that retrained (``retrain/network.pt``), or a model-space search
without retraining (its supernet's last checkpoint fixed to ``arch.json``); and real inputs to
check an export on (the run's test images).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("oneshot")


class ExportError(ValueError):
    """A run that cannot be exported, said in one line."""


@dataclass
class RunNetwork:
    """The trained network of a run and what it was trained on."""

    network: nn.Module
    genotype: str
    source: Path  # the file the weights came from
    out_dir: Path  # where the exports go by default: beside network.pt
    data: dict  # the run's ``data`` config (for real inputs); {} when unknown
    input_shape: tuple[int, int, int]  # channels, height, width


# ---- the network of a run ------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict:
    import yaml

    for d in (run_dir, run_dir.parent):  # a search's retrain/ has its config one level up
        path = d / "config.yaml"
        if path.is_file():
            try:
                config = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                config = None
            return config if isinstance(config, dict) else {}
    return {}


def _trusted_model(model: dict, trust: str | None, where: Path) -> None:
    """A run's files name the class of a model space's network; only oneshot's own classes and
    the one the user names with ``--trust`` are imported and called (as checkpoints are read)."""
    target = str(model.get("_target_", ""))
    if target.startswith("oneshot.") or target == trust:
        return
    raise ExportError(
        f"{where} holds a network of the class {target}, which a run's files are not trusted to name: "
        f"if you wrote it, run again with --trust {target}"
    )


def _model_space_network(bundle: dict, trust, where: Path) -> nn.Module:
    from oneshot.spaces.model import fixed_network

    kwargs = dict(bundle["network_kwargs"])
    model = kwargs.pop("model")
    _trusted_model(model, trust, where)
    return fixed_network(bundle["genotype"], model, **kwargs)


def load_run_network(run_dir, trust: str | None = None) -> RunNetwork:
    """The trained network of ``run_dir``: an ``oneshot-retrain`` run (``network.pt``), a search
    run that retrained (``retrain/network.pt``), or a model-space search without retraining (its
    supernet's last checkpoint, fixed to ``arch.json``: the searched weights). A cell-space
    search without retraining has no weights of its network: that is an ExportError."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ExportError(
            f"{run_dir}: no such run directory (give a directory oneshot-retrain or oneshot-search wrote)"
        )
    config = _read_config(run_dir)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    for path in (run_dir / "network.pt", run_dir / "retrain" / "network.pt"):
        if path.is_file():
            return _from_network_file(path, data, trust)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "arch.json").is_file() and ckpt.is_file():
        return _from_search_checkpoint(run_dir, ckpt, data, trust)
    what = (
        "a cell-space search without retraining"
        if (run_dir / "genotype.txt").is_file()
        else "no run's output"
    )
    raise ExportError(
        f"{run_dir} holds no trained weights of a network ({what}: no network.pt, retrain/network.pt, or "
        "arch.json with checkpoints/last.ckpt); retrain it first: oneshot-retrain genotype=RUN_DIR"
    )


def _from_network_file(path: Path, data: dict, trust) -> RunNetwork:
    from oneshot.lightning_modules.pipeline import load_network

    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise ExportError(
            f"{path} cannot be loaded safely as a oneshot export (truncated, or not one)"
        ) from None
    kwargs = bundle.get("network_kwargs") if isinstance(bundle, dict) else None
    if isinstance(kwargs, dict) and isinstance(
        kwargs.get("model"), dict
    ):  # issue 15: a model space's network
        try:
            network = _model_space_network(bundle, trust, path)
            network.load_state_dict(bundle["state_dict"])
        except ExportError:
            raise
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            raise ExportError(
                f"{path}: the network does not rebuild ({str(e).splitlines()[0][:200]})"
            ) from None
        network.eval()
    else:
        network = load_network(path)
    shape = (int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"]))
    return RunNetwork(network, str(bundle["genotype"]), path, path.parent, data, shape)


def _from_search_checkpoint(run_dir: Path, ckpt_path: Path, data: dict, trust) -> RunNetwork:
    from oneshot.arch import load_arch
    from oneshot.validate import ConfigError, load_checkpoint

    try:
        ckpt = load_checkpoint(ckpt_path, key="checkpoint")
    except ConfigError as e:
        raise ExportError(str(e)) from None
    supernet_cfg = (ckpt.get("hyper_parameters") or {}).get("supernet")
    if not isinstance(supernet_cfg, dict) or not isinstance(supernet_cfg.get("model"), dict):
        raise ExportError(
            f"{ckpt_path} is not a checkpoint of a model-space search (no supernet config in it)"
        )
    _trusted_model(supernet_cfg["model"], trust, ckpt_path)
    from oneshot.spaces.model import ModelSpace

    kwargs = {
        k: v for k, v in supernet_cfg.items() if not k.startswith("_")
    }  # _target_, _recursive_
    space = ModelSpace(**kwargs, check_shapes=False)
    prefix = "supernet."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        space.load_state_dict(state)
        network = space.fix(load_arch(run_dir / "arch.json")).eval()
    except (ValueError, RuntimeError) as e:
        raise ExportError(
            f"{ckpt_path}: the searched network does not rebuild ({str(e).splitlines()[0][:200]})"
        ) from None
    shape = (int(kwargs["in_channels"]), int(kwargs["image_size"]), int(kwargs["image_size"]))
    genotype = (run_dir / "arch.json").read_text().strip()
    return RunNetwork(network, genotype, ckpt_path, run_dir, data, shape)


def real_inputs(data: dict, n: int, shape) -> tuple[torch.Tensor, str]:
    """``n`` of the run's test images, normalised as in training; random normal images of the
    network's input shape when the run's data cannot be read here (said in the description)."""
    from oneshot.data import DatasetUnavailableError, load_splits, sample_batch

    name = data.get("name")
    if name:
        options = {
            k: data.get(k)
            for k in ("root", "path", "test_path", "image_size")
            if data.get(k) is not None
        }
        try:
            n = min(n, len(load_splits(name, download=False, **options).y_test))
            x, _ = sample_batch(name, n, train=False, download=False, **options)
            if tuple(x.shape[1:]) == tuple(shape):
                return x, f"{n} test images of {name}"
            why = f"its images are {tuple(x.shape[1:])}, the network takes {tuple(shape)}"
        except (DatasetUnavailableError, ValueError, OSError) as e:
            why = str(e).splitlines()[0][:160]
        log.warning(
            "parity on random inputs: the run's data (%s) cannot be used here: %s", name, why
        )
        generator = torch.Generator().manual_seed(0)
        return torch.randn(
            n, *shape, generator=generator
        ), f"{n} random normal images ({name}: {why})"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(
        n, *shape, generator=generator
    ), f"{n} random normal images (the run names no data)"
