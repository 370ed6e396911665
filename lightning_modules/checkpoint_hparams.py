"""``DartsSearch.load_from_checkpoint(path)`` (and every module's) as Lightning users expect.

The modules take objects (a supernet or network, optimizer factories), which a checkpoint read
with ``weights_only=True`` cannot hold. So the pipeline records what builds them instead: the
supernet's config (``_target_`` + constructor arguments, the data's classes/channels/size and the
warm start's candidates included), the retrained network's genotype string and sizes, and the
strategy's config with its ``_partial_`` optimizers, all plain types. ``load_from_checkpoint``
rebuilds those objects from the configs, then Lightning makes the module and loads the weights.

A checkpoint is untrusted input: its ``_target_`` names are callables we would call, so only
optimizers (``torch.optim.*``), this project's code and the registered spaces' classes pass.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

TRUSTED_PREFIXES = ("torch.optim.", "oneshot.")


def record_hparams(module, **hparams) -> None:
    """Keep ``hparams`` (plain types, configs with ``_target_``) in the module's checkpoints.
    ``logger=False``: the loggers' config is the run's resolved Hydra config, not these."""
    module.save_hyperparameters(hparams, logger=False)


def _targets(node):
    if isinstance(node, dict):
        if "_target_" in node:
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _targets(value)


def _trusted(target) -> bool:
    from oneshot.spaces import SPACES

    spaces = {f"{s.supernet.__module__}.{s.supernet.__qualname__}" for s in SPACES.values()}
    return isinstance(target, str) and (target.startswith(TRUSTED_PREFIXES) or target in spaces)


def build_from_config(name: str, config: dict, path) -> object:
    untrusted = [t for t in _targets(config) if not _trusted(t)]
    if untrusted:
        raise ValueError(f"{path}: hyper-parameter {name!r} names {untrusted[0]!r}, which is not an optimizer, "
                         "oneshot code or a registered space; it is not called")  # fmt: skip
    return instantiate(config, _convert_="all" if "_partial_" not in config else "partial")


class RebuildFromConfig:
    """Mixin for a LightningModule whose constructor takes objects recorded as configs."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool = True, **kwargs):  # fmt: skip
        """Lightning's ``load_from_checkpoint``, read with ``weights_only=True`` by default, after
        building the objects the checkpoint's hyper-parameters describe (``kwargs`` win)."""
        if not isinstance(checkpoint_path, str | Path):
            raise TypeError("give the checkpoint's path: its hyper-parameters are read before the weights")
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        hparams = dict(ckpt.get("hyper_parameters") or {})
        built = {k: build_from_config(k, v, checkpoint_path) for k, v in hparams.items()
                 if k not in kwargs and isinstance(v, dict) and "_target_" in v}  # fmt: skip
        module = super().load_from_checkpoint(
            checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
            weights_only=weights_only, **built, **kwargs,
        )  # fmt: skip
        record_hparams(module, **hparams)  # saved again, it rebuilds again
        return module
