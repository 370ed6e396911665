"""A user's own model as a search space: the supernet protocol over ``oneshot.nn`` choices.

``ModelSpace(model)`` finds every ``LayerChoice``, ``InputChoice`` and ``Repeat`` in ``model``
(an ``nn.Module``, or a config ``{"_target_": "mypkg.nets.MyNet", ...}`` it builds) and presents
them through the protocol of ``oneshot/spaces/base.py``, so every strategy runs on it through the
code path it runs on the cell spaces:

* each decision label is a *cell type* with one *edge* (named by its kind: ``layerchoice``,
  ``inputchoice``, ``repeat``) whose ops are the decision's candidate names; ``alphas[label]``
  is ``[1, n_candidates]``;
* ``forward(x, weights)``: ``weights[label]`` is ``[entry]`` in the forms ``MixedOp`` takes (a
  softmax row, an ``int``, a tuple mask); the entries reach the choices through a shared
  ``ChoiceState`` and the user's own ``forward`` runs unchanged;
* ``genotype()`` is an ``Arch`` (``oneshot.arch``): the argmax candidate of each decision as its
  value; ``weights_for(arch)`` the indices that make the supernet compute exactly that network;
* ``candidates=`` (a warm start's survivors) keeps only those candidates: pruned modules are
  dropped, so they cost neither parameters nor compute;
* ``partial_channels=K`` (``space.supernet.partial_channels``): PC-DARTS - every LayerChoice
  whose candidates are factories (``channels -> module``, ``oneshot.nn``) is built at ``C/K``
  and runs on ``C/K`` of the channels; choices of modules run at full width. No edge
  normalisation: a model has no cell nodes whose incoming edges it would weigh.

``fix(model_or_config, arch)`` (also ``oneshot.fix``) gives the plain network of ``arch``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Mapping

import torch
from torch import nn

from oneshot.arch import Arch, ArchError, check_arch, load_arch
from oneshot.nn import (
    Choice,
    ChoiceState,
    ChosenInputs,
    InputChoice,
    LayerChoice,
    choices_of,
    fixed_arch,
    label_scope,
)
from oneshot.nn import partial_channels as _partial
from oneshot.spaces.base import SupernetBase

DATA_KWARGS = ("num_classes", "in_channels", "image_size")


def import_target(target: str):
    """The class or function ``target`` (``mypkg.nets.MyNet``) names, from the working directory
    or PYTHONPATH; one ValueError naming it when it cannot be imported."""
    import sys
    from pathlib import Path

    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the working directory, as `python -m` would have it
    module_name, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"space.model._target_={target} cannot be imported ({type(e).__name__}: {e}); "
                         "valid: a class importable from the working directory or PYTHONPATH, "
                         "e.g. mypkg.nets.MyNet") from None  # fmt: skip


def build_model(model, **data) -> nn.Module:
    """``model`` itself, or built from its config: the data's ``num_classes``/``in_channels``/
    ``image_size`` go to the constructor where it names them (and the config does not)."""
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, Mapping) or "_target_" not in model:
        raise ValueError(
            "space.model needs a _target_: the class of your model, e.g. space.model._target_=mypkg.nets.MyNet"
        )
    kwargs = {k: v for k, v in model.items() if not str(k).startswith("_")}
    cls = import_target(model["_target_"])
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in data.items():
        if value is not None and key not in kwargs and (key in params or takes_any):
            kwargs[key] = value
    built = cls(**kwargs)
    if not isinstance(built, nn.Module):
        raise ValueError(
            f"space.model._target_={model['_target_']} built a {type(built).__name__}, not an nn.Module"
        )
    return built


def group_choices(model: nn.Module) -> dict[str, list[Choice]]:
    """label -> the choices carrying it; one label must mean one decision (same kind, candidates)."""
    groups: dict[str, list[Choice]] = {}
    for _, choice in choices_of(model):
        groups.setdefault(choice.label, []).append(choice)
    for label, group in groups.items():
        first = group[0]
        for other in group[1:]:
            if type(other) is not type(first) or other.names != first.names:
                raise ValueError(
                    f"choices labelled {label!r} differ: a {first.kind} of {len(first.names)} candidates "
                    f"({', '.join(first.names)}) and a {other.kind} of {len(other.names)} ({', '.join(other.names)}); "
                    "one label is one decision: give equal candidates, or different labels"
                )
    return groups


class ModelSpace(SupernetBase):
    """The supernet of a model with choices (see the module docstring)."""

    def __init__(self, model, num_classes: int | None = None, in_channels: int | None = None,
                 image_size: int | None = None, candidates: dict | None = None, check_shapes: bool = True,
                 partial_channels: int = 1):  # fmt: skip
        super().__init__()
        self.model_config = None if isinstance(model, nn.Module) else dict(model)
        with label_scope(), _partial(partial_channels):
            self.model = build_model(
                model, num_classes=num_classes, in_channels=in_channels, image_size=image_size
            )
        self.partial_channels = partial_channels
        if partial_channels > 1 and not any(
            getattr(c, "partial", 1) == partial_channels for _, c in choices_of(self.model)
        ):
            raise ValueError(f"space.supernet.partial_channels={partial_channels}: no LayerChoice of "
                             f"{type(self.model).__name__} takes 1/K of the channels: none has candidate "
                             "factories (channels -> module, with channels=C), or the model was built before "
                             "(give its config or class, or build it under oneshot.nn.partial_channels(K)); "
                             "valid: 1, or channel-keeping choices as factories")  # fmt: skip
        self.in_channels, self.image_size = in_channels, image_size
        groups = group_choices(self.model)
        if not groups:
            raise ValueError(f"{type(self.model).__name__} has no LayerChoice, InputChoice or Repeat: nothing to "
                             "search (put the choices in the model, from oneshot.nn)")  # fmt: skip
        self._state = ChoiceState()
        for group in groups.values():
            for choice in group:
                choice._state = self._state
        if candidates:
            self._restrict(groups, candidates)
        # label -> its first choice; a plain dict, not registered again as submodules
        self.choices = {label: group[0] for label, group in groups.items()}
        self.cell_types = tuple(groups)
        self.candidates = {label: [c.names] for label, c in self.choices.items()}
        self._init_alphas()
        if check_shapes and in_channels and image_size:
            self.check_shapes(torch.zeros(2, in_channels, image_size, image_size))

    def __setattr__(self, name, value):
        # `choices` maps labels to modules already in the tree: kept out of it (no second registration)
        if name == "choices":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _restrict(self, groups, candidates) -> None:
        for label, kept in candidates.items():
            if label not in groups:
                raise ValueError(
                    f"candidates for {label!r}, which is not a choice of this model; valid: {', '.join(groups)}"
                )
            kept = tuple(kept[0]) if kept and isinstance(kept[0], list | tuple) else tuple(kept)
            names = groups[label][0].names
            if not kept or any(k not in names for k in kept):
                raise ValueError(
                    f"candidates {list(kept)} for {label!r}; valid: a non-empty subset of {', '.join(names)}"
                )
            for choice in groups[label]:
                choice.restrict(kept)

    def edge_names(self, cell_type: str) -> list[str]:
        return [self.choices[cell_type].kind]

    def forward(self, x, weights=None):
        if weights is None:
            weights = self.arch_weights()
        entries = {}
        for label in self.cell_types:
            if label not in weights:
                raise ValueError(f"no weights for choice {label!r}")
            entry = weights[label]
            entries[label] = (
                entry[0]
                if isinstance(entry, list | tuple)
                or (isinstance(entry, torch.Tensor) and entry.dim() == 2)
                else entry
            )
        self._state.weights = entries
        try:
            return self.model(x)
        finally:
            self._state.weights = None

    @torch.no_grad()
    def check_shapes(self, x: torch.Tensor) -> None:
        """A dry run in eval mode where every candidate runs: siblings must agree on the shape."""
        was_training = self.training
        self.eval()
        self._state.check_shapes = True
        try:
            self(x.to(self.alphas[self.cell_types[0]].device))
        finally:
            self._state.check_shapes = False
            self.train(was_training)

    def genotype(self) -> Arch:
        return Arch({
            label: choice.value_of(choice.names[int(self.alphas[label][0].argmax())])
            for label, choice in self.choices.items()
        })  # fmt: skip

    def weights_for(self, arch) -> dict:
        """Candidate indices that make this supernet compute exactly ``arch``."""
        arch = check_arch(arch, self.choices)
        return {label: [c.names.index(c.name_of(arch[label]))] for label, c in self.choices.items()}

    def fix(self, arch) -> nn.Module:
        """The plain network of ``arch`` with this supernet's weights (a copy)."""
        return fix(self.model, check_arch(arch, self.choices))


def _replace_choices(module: nn.Module, arch: Arch) -> nn.Module:
    if isinstance(module, Choice):
        value = arch[module.label]
        if isinstance(module, LayerChoice) and module.partial > 1:
            # PC-DARTS searched it at C/K: the fixed network's candidate is built anew at C
            return _replace_choices(module.factories[value](module.channels), arch)
        if isinstance(module, LayerChoice):
            return _replace_choices(module._modules[module.name_of(value)], arch)
        if isinstance(module, InputChoice):
            return ChosenInputs(value)
        return nn.Sequential(
            *[_replace_choices(module._modules[str(i)], arch) for i in range(value)]
        )
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _replace_choices(child, arch)
    return module


def fix(model_or_config, arch) -> nn.Module:
    """The plain ``nn.Module`` of ``arch``: only the chosen candidates, no alphas, no mixed ops.

    ``model_or_config``: a model with choices (or a ``ModelSpace``) - its chosen modules are
    copied, weights included (a PC-DARTS supernet's factory choices, searched at ``C/K``, are
    built anew at ``C``); or a config ``{"_target_": ..., **kwargs}`` (or a class) - built
    anew under ``fixed_arch(arch)``, exactly the network one would write by hand. Both give the
    same module tree, so their ``state_dict``s load into each other."""
    arch = load_arch(arch)
    if isinstance(model_or_config, ModelSpace):
        return model_or_config.fix(arch)
    if isinstance(model_or_config, nn.Module):
        groups = group_choices(model_or_config)
        check_arch(arch, {label: g[0] for label, g in groups.items()})
        fixed = _replace_choices(copy.deepcopy(model_or_config), arch)
        for m in fixed.modules():
            m.__dict__.pop("_state", None)
        return fixed
    if isinstance(model_or_config, type):
        model_or_config = {
            "_target_": f"{model_or_config.__module__}.{model_or_config.__qualname__}"
        }
    return fixed_network(arch, model_or_config)


def fixed_network(arch, model: Mapping, num_classes: int | None = None, in_channels: int | None = None,
                  image_size: int | None = None) -> nn.Module:  # fmt: skip
    """``model`` (a config) built under ``fixed_arch(arch)``: the retraining's network."""
    arch = load_arch(arch)
    try:
        with fixed_arch(arch):
            return build_model(
                dict(model), num_classes=num_classes, in_channels=in_channels, image_size=image_size
            )
    except ArchError:
        raise
    except ValueError as e:
        if str(e).startswith(("arch", "space.model")):
            raise ArchError(str(e)) from None
        raise


__all__ = ["ModelSpace", "build_model", "fix", "fixed_network", "import_target"]


def tenas_space(
    space: ModelSpace,
    num_classes: int,
    in_channels: int,
    ntk_batch: int = 32,
    ops_per_round: int = 1,
):
    """TE-NAS' view of a model space (``oneshot.prune``): both metrics on the user's model itself,
    rebuilt from its config (a supernet built on the meta device has no weights to measure), the
    linear regions on whole training images; one candidate per decision per round."""
    from functools import partial

    from oneshot.prune import TenasSpace

    if space.model_config is None:
        build = partial(copy.deepcopy, space)  # a space built from a module: measure a copy
    else:
        build = partial(ModelSpace, space.model_config, num_classes=num_classes, in_channels=in_channels,
                        image_size=space.image_size, candidates=space.candidates, check_shapes=False)  # fmt: skip
    choices = dict(space.choices)
    return TenasSpace(
        {label: list(c) for label, c in space.candidates.items()},
        build,
        build,
        ["choice"],
        genotype=lambda ops: Arch(
            {label: choices[label].value_of(ops[label][0]) for label in choices}
        ),
        ops_per_round=ops_per_round,
        ntk_batch=ntk_batch,
        regions_on_images=True,
    )
