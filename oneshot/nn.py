"""Choices inside any ``nn.Module``: write a search space as an ordinary PyTorch model.

``LayerChoice([...])`` picks one of several modules, ``InputChoice(n, n_chosen)`` picks inputs
to sum, ``Repeat(factory, depth=(lo, hi))`` picks a depth (the first ``d`` blocks run; the
elastic depth of ProxylessNAS / OFA). The same ``label`` on several choices makes them one
decision. The API follows NNI's (``nni.nas.nn.pytorch``); the machinery does not wrap anything:

* In a search, ``oneshot.spaces.model.ModelSpace`` finds the choices in the model and, on every
  forward, hands each the entry of its decision in the forms ``MixedOp`` understands (a softmax
  row: weighted sum; an ``int``: that candidate alone; ``(index, weight)``: that candidate times
  a 0-dim weight, GDAS' straight-through sample; a tuple of ints: the plain sum of a mask, or
  their mean while ``average_masks`` is on, as TE-NAS' prune measures it).
* Built under ``fixed_arch(arch)``, each choice constructor returns the chosen thing itself (the
  candidate module, an ``nn.Sequential`` of ``d`` blocks, a ``ChosenInputs``): the model is the
  plain network of that architecture, parameter for parameter what one would write by hand.

Every decision is one categorical over its candidate names: a LayerChoice's names, a Repeat's
depths (``"2"``), an InputChoice's sets of ``n_chosen`` inputs (``"0"``, or ``"0+2"`` when two
are chosen). So every strategy treats every kind alike (DARTS: a softmax over the names; ENAS:
one controller step; TE-NAS: prune names), and the derived value of an InputChoice is always a
valid set of ``n_chosen`` inputs.

A LayerChoice whose candidates keep the channel count may give them as *factories*
(``channels -> module``: a function, a lambda, a ``functools.partial``) with ``channels=C``: a
plain search and a fixed network build them at ``C``; a PC-DARTS search (``partial_channels(K)``,
``ModelSpace(..., partial_channels=K)``; Xu et al., ICLR 2020) builds them at ``C/K`` and runs
them on the first ``C/K`` channels, the rest bypass the choice, then a channel shuffle, exactly
as ``oneshot.mixed.MixedOp(partial=K)`` does on the cell spaces' edges.

Unlabelled choices are numbered in construction order (``layerchoice_1``, ``inputchoice_1``,
``repeat_1``) from where a ``ModelSpace`` or ``fixed_arch`` starts building the model; give
labels when you build the model yourself and mean to fix it later.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from oneshot.arch import ArchError
from oneshot.mixed import channel_shuffle

_FIXED: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "oneshot_fixed_arch", default=None
)
# Unlabelled choices' counters per kind; outside every scope one process-wide dict.
_GLOBAL_COUNTS: dict[str, int] = {}
_COUNTS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "oneshot_label_counts", default=None
)
_USED: contextvars.ContextVar[set | None] = contextvars.ContextVar(
    "oneshot_used_labels", default=None
)
_LABEL = re.compile(r"[A-Za-z0-9_.\-]+")
# PC-DARTS' K for LayerChoices of factories built in a `partial_channels` block; 1 elsewhere.
_PARTIAL: contextvars.ContextVar[int] = contextvars.ContextVar("oneshot_partial_channels", default=1)


@contextlib.contextmanager
def partial_channels(k: int):
    """PC-DARTS: a LayerChoice of candidate factories built in this block builds them at 1/``k``
    of its ``channels`` and sends only that share of the channels through them."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"partial_channels={k!r}; valid: an integer >= 1 (1 = every channel)")
    token = _PARTIAL.set(k)
    try:
        yield
    finally:
        _PARTIAL.reset(token)


@contextlib.contextmanager
def label_scope():
    """Number unlabelled choices from 1 inside the block (a model built twice gets equal labels)."""
    token = _COUNTS.set({})
    try:
        yield
    finally:
        _COUNTS.reset(token)


def _label(kind: str, label) -> str:
    if label is None:
        counts = _COUNTS.get()
        counts = _GLOBAL_COUNTS if counts is None else counts
        counts[kind] = counts.get(kind, 0) + 1
        return f"{kind}_{counts[kind]}"
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ValueError(
            f"choice label {label!r} is not valid; valid: a non-empty name of letters, digits, '_', '.', '-'"
        )
    return label


def _fixed_value(kind: str, label):
    """``(label, value)``: the value of ``label`` in the active ``fixed_arch``, or None outside one."""
    label = _label(kind, label)
    arch = _FIXED.get()
    if arch is None:
        return label, None
    if label not in arch:
        raise ArchError(
            f"arch misses label {label!r}: the model has a choice {label!r}; give it a value"
        )
    _USED.get().add(label)
    return label, arch[label]


@contextlib.contextmanager
def fixed_arch(arch: Mapping):
    """Build a model under this context and every choice in it is replaced by its chosen value
    (``{label: candidate name | list of inputs | depth}``, a dict, an ``Arch`` or a path to an
    ``arch.json``). A label the model never asked for is an error when the block ends."""
    from oneshot.arch import load_arch

    arch = load_arch(arch)
    tokens = (_FIXED.set(dict(arch)), _COUNTS.set({}), _USED.set(set()))
    try:
        yield arch
        unknown = sorted(set(arch) - _USED.get())
        if unknown:
            raise ArchError(f"arch label {unknown[0]!r} is not a choice of this model; its labels: "
                             f"{', '.join(sorted(_USED.get())) or 'none'}")  # fmt: skip
    finally:
        for var, token in zip((_FIXED, _COUNTS, _USED), tokens):
            var.reset(token)


class ChoiceState:
    """What a ``ModelSpace`` shares with its choices: the entries of the current forward."""

    def __init__(self):
        self.weights: dict | None = None  # label -> entry
        self.average_masks = False  # TE-NAS: a mask of k candidates computes their mean
        self.check_shapes = False  # the space's dry run: every candidate runs, shapes compared


class Choice(nn.Module):
    """What the three choices share: a label, candidate names, and the entry of this forward."""

    kind = "choice"
    label: str
    names: tuple[str, ...]

    def _entry(self):
        state = getattr(self, "_state", None)
        if state is None or state.weights is None:
            # outside a space: the uniform mixture
            return torch.full((len(self.names),), 1.0 / len(self.names))
        if self.label not in state.weights:
            raise ValueError(f"no weights given for choice {self.label!r}")
        return state.weights[self.label]

    def _combine(self, entry, outputs: Callable[[int], torch.Tensor]):
        """The candidates' outputs combined as ``entry`` says (see the module docstring)."""
        if isinstance(entry, int):
            return outputs(entry)
        if isinstance(entry, torch.Tensor):
            if getattr(getattr(self, "_state", None), "check_shapes", False):
                self._check_shapes([outputs(i) for i in range(len(self.names))])
            out = entry[0] * outputs(0)
            for i in range(1, len(self.names)):
                out = out + entry[i] * outputs(i)
            return out
        if _is_pair(entry):  # (index, weight): GDAS' sample times its straight-through weight
            return entry[1] * outputs(entry[0])
        chosen = tuple(entry)
        if not chosen:
            raise ValueError(f"choice {self.label!r} got an empty mask")
        out = outputs(chosen[0])
        for i in chosen[1:]:
            out = out + outputs(i)
        state = getattr(self, "_state", None)
        return (
            out / len(chosen)
            if state is not None and state.average_masks and len(chosen) > 1
            else out
        )

    def _check_shapes(self, outs: list[torch.Tensor]) -> None:
        shapes = [tuple(o.shape) for o in outs]
        if len(set(shapes)) > 1:
            listed = ", ".join(f"{n}: {list(s)}" for n, s in zip(self.names, shapes))
            raise ValueError(f"the candidates of choice {self.label!r} give different output shapes ({listed}); "
                             "every candidate must give its siblings' shape")  # fmt: skip

    def value_of(self, name: str):
        """The architecture value of candidate ``name``."""
        return name

    def name_of(self, value) -> str:
        return value

    def restrict(self, names: Iterable[str]) -> None:
        """Keep only the candidates ``names`` (a warm start's survivors), in this order."""
        self.names = tuple(names)

    def extra_repr(self) -> str:
        return f"label={self.label!r}, candidates={list(self.names)}"


class LayerChoice(Choice):
    """One of ``candidates`` (a list: names ``"0"``, ``"1"``, ...; or an ordered dict name -> module).
    Candidates that keep the channel count may be factories ``channels -> module`` (all of them,
    with ``channels=C``): then PC-DARTS can build them at ``C/K`` (see the module docstring)."""

    kind = "layerchoice"

    def __new__(cls, *args, **kwargs):
        if not args and not kwargs:  # copy.deepcopy / unpickling
            return super().__new__(cls)
        return cls._build(*args, **kwargs)

    @classmethod
    def _build(cls, candidates, label=None, channels=None):
        label, value = _fixed_value(cls.kind, label)
        named = _named_candidates(candidates, label)
        factories = _factories(named, label, channels)
        if value is not None:
            if value not in named:
                raise ArchError(
                    f"arch[{label!r}]={value!r} is not a candidate of {label}; valid: {', '.join(named)}"
                )
            return named[value](channels) if factories else named[value]
        k = _PARTIAL.get() if factories else 1
        if channels is not None and channels % k:
            raise ValueError(f"LayerChoice {label!r}: channels={channels} is not divisible by partial_channels={k}; "
                             "valid: a K that divides every factory choice's channels")  # fmt: skip
        obj = nn.Module.__new__(cls)
        object.__setattr__(obj, "_pending", (label, named, factories, channels, k))
        return obj

    def __init__(self, candidates, label=None, channels=None):
        super().__init__()
        self.label, named, factories, self.channels, self.partial = self.__dict__.pop("_pending")
        self.names = tuple(named)
        # the factories themselves (plain attribute): fix() of a PC-DARTS supernet builds at `channels`
        self.factories = named if factories else None
        for name, candidate in named.items():
            self.add_module(name, candidate(self.channels // self.partial) if factories else candidate)

    def restrict(self, names):
        super().restrict(names)
        for name in list(self._modules):
            if name not in self.names:
                del self._modules[name]  # pruned: no parameters, no compute

    def forward(self, *args, **kwargs):
        if self.partial == 1:
            return self._combine(self._entry(), lambda i: self._modules[self.names[i]](*args, **kwargs))
        # PC-DARTS, as MixedOp(partial=K): the first C/K channels through the candidates, the rest
        # bypass them (max-pooled where the candidates halve the resolution), then a channel shuffle
        (x,) = args
        if x.shape[1] != self.channels:
            raise ValueError(
                f"LayerChoice {self.label!r} got {x.shape[1]} channels; it was built for channels={self.channels}"
            )
        k = self.channels // self.partial
        head, bypass = x[:, :k], x[:, k:]
        out = self._combine(self._entry(), lambda i: self._modules[self.names[i]](head))
        if out.shape[-1] != x.shape[-1]:
            bypass = F.max_pool2d(bypass, 2, 2, ceil_mode=True)
        return channel_shuffle(torch.cat([out, bypass], dim=1), self.partial)


def _factories(named, label, channels) -> bool:
    """True when every candidate is a factory ``channels -> module`` (then ``channels`` is needed);
    False when every one is a module."""
    modules = [isinstance(c, nn.Module) for c in named.values()]
    if all(modules):
        if channels is not None:
            raise ValueError(f"LayerChoice {label!r}: channels={channels} is for candidate factories; "
                             "these candidates are modules (leave channels out)")  # fmt: skip
        return False
    if any(modules) or not all(callable(c) for c in named.values()):
        raise ValueError(f"LayerChoice {label!r}: give every candidate as an nn.Module, or every one as a factory "
                         "channels -> module (with channels=C); not a mix")  # fmt: skip
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"LayerChoice {label!r}: candidate factories need channels=C, the channel count they "
                         f"keep (an integer >= 1); got channels={channels!r}")  # fmt: skip
    return True


def _named_candidates(candidates, label) -> OrderedDict:
    if isinstance(candidates, Mapping):
        named = OrderedDict((str(k), v) for k, v in candidates.items())
    elif isinstance(candidates, Iterable):
        named = OrderedDict((str(i), m) for i, m in enumerate(candidates))
    else:
        raise ValueError(f"LayerChoice {label!r}: candidates must be a list or a dict of modules")
    if not named:
        raise ValueError(f"LayerChoice {label!r} has no candidates")
    for name, module in named.items():
        if not callable(module) or not _LABEL.fullmatch(name) or "." in name:
            raise ValueError(f"LayerChoice {label!r}: candidate {name!r} must be an nn.Module (or a factory "
                             "channels -> module) with a name of letters, digits, '_' and '-'")  # fmt: skip
    return named


def _sum(inputs, chosen):
    out = inputs[chosen[0]]
    for i in chosen[1:]:
        out = out + inputs[i]
    return out


class ChosenInputs(nn.Module):
    """A fixed InputChoice: the sum of the chosen inputs."""

    def __init__(self, chosen):
        super().__init__()
        self.chosen = [int(i) for i in chosen]

    def forward(self, inputs):
        return _sum(inputs, self.chosen)

    def extra_repr(self) -> str:
        return f"chosen={self.chosen}"


class InputChoice(Choice):
    """``forward(list_of_tensors)``: the sum of ``n_chosen`` of the ``n_candidates`` inputs."""

    kind = "inputchoice"

    def __new__(cls, *args, **kwargs):
        if not args and not kwargs:  # copy.deepcopy / unpickling
            return super().__new__(cls)
        return cls._build(*args, **kwargs)

    @classmethod
    def _build(cls, n_candidates: int, n_chosen: int = 1, label=None):
        label, value = _fixed_value(cls.kind, label)
        if isinstance(n_candidates, bool) or not isinstance(n_candidates, int) or n_candidates < 1:
            raise ValueError(
                f"InputChoice {label!r}: n_candidates={n_candidates!r}; valid: an integer >= 1"
            )
        if (
            isinstance(n_chosen, bool)
            or not isinstance(n_chosen, int)
            or not 1 <= n_chosen <= n_candidates
        ):
            raise ValueError(
                f"InputChoice {label!r}: n_chosen={n_chosen!r}; valid: 1..{n_candidates}"
            )
        if value is not None:
            return ChosenInputs(check_inputs(label, value, n_candidates, n_chosen))
        obj = nn.Module.__new__(cls)
        object.__setattr__(obj, "_pending", label)
        return obj

    def __init__(self, n_candidates: int, n_chosen: int = 1, label=None):
        super().__init__()
        self.label = self.__dict__.pop("_pending")
        self.n_candidates, self.n_chosen = n_candidates, n_chosen
        self.names = tuple(
            "+".join(map(str, c)) for c in itertools.combinations(range(n_candidates), n_chosen)
        )

    def value_of(self, name: str) -> list[int]:
        return [int(i) for i in name.split("+")]

    def name_of(self, value) -> str:
        return "+".join(map(str, check_inputs(self.label, value, self.n_candidates, self.n_chosen)))

    def forward(self, inputs):
        if len(inputs) != self.n_candidates:
            raise ValueError(
                f"InputChoice {self.label!r} expects {self.n_candidates} inputs, got {len(inputs)}"
            )
        sets = [self.value_of(n) for n in self.names]
        entry = self._entry()
        if isinstance(entry, torch.Tensor) and not getattr(
            getattr(self, "_state", None), "check_shapes", False
        ):
            # sum_c w_c sum_{i in c} x_i = sum_i (sum_{c containing i} w_c) x_i: each input read once.
            coef = [
                sum(entry[c] for c, s in enumerate(sets) if i in s)
                for i in range(self.n_candidates)
            ]
            used = [i for i in range(self.n_candidates) if any(i in s for s in sets)]
            out = coef[used[0]] * inputs[used[0]]
            for i in used[1:]:
                out = out + coef[i] * inputs[i]
            return out
        return self._combine(entry, lambda c: _sum(inputs, sets[c]))


def check_inputs(label: str, value, n_candidates: int, n_chosen: int) -> list[int]:
    ok = isinstance(value, list | tuple) and len(value) == n_chosen and all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_candidates for i in value
    ) and len(set(value)) == n_chosen  # fmt: skip
    if not ok:
        raise ArchError(f"arch[{label!r}]={value!r} is not a valid input choice; valid: a list of {n_chosen} "
                         f"distinct input indices in 0..{n_candidates - 1}")  # fmt: skip
    return sorted(value)


class Repeat(Choice):
    """The first ``d`` of ``max`` blocks, ``d`` in ``depth=(min, max)`` (an int: a fixed depth).
    ``block_factory``: a callable ``index -> module`` or a module (deep-copied per block)."""

    kind = "repeat"

    def __new__(cls, *args, **kwargs):
        if not args and not kwargs:  # copy.deepcopy / unpickling
            return super().__new__(cls)
        return cls._build(*args, **kwargs)

    @classmethod
    def _build(cls, block_factory, depth, label=None):
        if isinstance(depth, int) and not isinstance(depth, bool):
            return nn.Sequential(*_blocks(block_factory, depth))  # no decision
        label, value = _fixed_value(cls.kind, label)
        lo, hi = _depth_range(depth, label)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ArchError(
                    f"arch[{label!r}]={value!r} is not a depth of {label}; valid: {lo}..{hi}"
                )
            return nn.Sequential(*_blocks(block_factory, value))
        obj = nn.Module.__new__(cls)
        object.__setattr__(obj, "_pending", (label, lo, hi))
        return obj

    def __init__(self, block_factory, depth, label=None):
        super().__init__()
        self.label, lo, hi = self.__dict__.pop("_pending")
        self.names = tuple(str(d) for d in range(lo, hi + 1))
        for i, block in enumerate(_blocks(block_factory, hi)):
            # keys as nn.Sequential's: a fixed net's state_dict matches
            self.add_module(str(i), block)

    def value_of(self, name: str) -> int:
        return int(name)

    def name_of(self, value) -> str:
        if str(value) not in self.names or isinstance(value, bool) or not isinstance(value, int):
            raise ArchError(f"arch[{self.label!r}]={value!r} is not a depth of {self.label}; valid: "
                             f"{', '.join(self.names)}")  # fmt: skip
        return str(value)

    def restrict(self, names):
        super().restrict(names)
        deepest = max(int(n) for n in self.names)
        for i in list(self._modules):
            if int(i) >= deepest:
                del self._modules[i]

    def forward(self, x):
        depths = [int(n) for n in self.names]
        entry = self._entry()
        if isinstance(entry, int) or _is_pair(entry):
            needed = {depths[entry if isinstance(entry, int) else entry[0]]}
        elif isinstance(entry, torch.Tensor):
            needed = set(depths)
        else:
            needed = {depths[i] for i in entry}
        outs = {0: x}
        for d in range(1, max(needed) + 1):
            x = self._modules[str(d - 1)](x)
            outs[d] = x
        return self._combine(entry, lambda i: outs[depths[i]])


def _is_pair(entry) -> bool:
    return isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor)


def _depth_range(depth, label) -> tuple[int, int]:
    ok = isinstance(depth, tuple | list) and len(depth) == 2 and all(
        isinstance(d, int) and not isinstance(d, bool) for d in depth
    ) and 0 <= depth[0] < depth[1]  # fmt: skip
    if not ok:
        raise ValueError(
            f"Repeat {label!r}: depth={depth!r}; valid: (min, max) with 0 <= min < max, or an int"
        )
    return int(depth[0]), int(depth[1])


def _blocks(factory, n: int) -> list[nn.Module]:
    if isinstance(factory, nn.Module):
        return [copy.deepcopy(factory) for _ in range(n)]
    if not callable(factory):
        raise ValueError("Repeat: block_factory must be a module or a callable index -> module")
    return [factory(i) for i in range(n)]


def choices_of(model: nn.Module) -> list[tuple[str, Choice]]:
    """``(path, choice)`` of every choice in ``model``, in module order."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, Choice)]


__all__ = [
    "ChosenInputs",
    "InputChoice",
    "LayerChoice",
    "Repeat",
    "choices_of",
    "fixed_arch",
    "label_scope",
    "partial_channels",
]
