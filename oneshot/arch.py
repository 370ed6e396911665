"""A searched model's architecture: ``{label: candidate name | list of chosen inputs | depth}``.

``Arch`` is that dict as a frozen value with a canonical JSON form (keys sorted, no spaces), what
``str(arch)`` gives and ``arch.json`` in a run directory holds; ``parse_arch`` reads it back and
``load_arch`` also takes a dict or a path. It plays the genotype's part for ``space=model``
(``space``, ``to_json``), so the pipeline writes, logs and compares it as it does genotypes.
``check_arch`` holds it against a model's choices: a missing or unknown label, an unknown
candidate or an out-of-range value is one ``ArchError`` naming the label and the valid values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from oneshot.genotypes import GenotypeError


class ArchError(GenotypeError):
    """An architecture that cannot be read or does not fit its model."""


class Arch(Mapping):
    space = "model"

    def __init__(self, values: Mapping):
        if not isinstance(values, Mapping):
            raise ArchError(
                f"an architecture is a JSON object {{label: value}}, got {type(values).__name__}"
            )
        clean = {}
        for label, value in values.items():
            if not isinstance(label, str):
                raise ArchError(f"architecture label {label!r} is not a string")
            if isinstance(value, list | tuple):
                value = [
                    int(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value
                ]
            elif not isinstance(value, str | int) or isinstance(value, bool):
                raise ArchError(
                    f"arch[{label!r}]={value!r}: a value is a candidate name, a list of inputs or a depth"
                )
            clean[label] = value
        self._values = dict(sorted(clean.items()))

    def __getitem__(self, label):
        return self._values[label]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __eq__(self, other):
        return isinstance(other, Mapping) and self._values == dict(other)

    def __hash__(self):
        return hash(str(self))

    def __str__(self) -> str:
        return json.dumps(self._values, sort_keys=True, separators=(",", ":"))

    def __repr__(self) -> str:
        return f"Arch({self})"

    def to_json(self) -> dict:
        """What ``arch.json`` holds: the plain ``{label: value}`` dict."""
        return dict(self._values)


def parse_arch(text: str) -> Arch:
    """An ``Arch`` from its JSON text (``str(arch)`` or an ``arch.json``'s contents)."""
    try:
        values = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise ArchError(
            f"cannot read architecture {str(text)[:80]!r}: expected a JSON object {{label: value}}"
        ) from None
    return Arch(values)


def load_arch(spec) -> Arch:
    """An ``Arch`` from a mapping, its JSON text, or an ``arch.json`` (or a run directory holding one)."""
    if isinstance(spec, Arch):
        return spec
    if isinstance(spec, Mapping):
        return Arch(spec)
    text = str(spec).strip()
    if text.startswith("{"):
        return parse_arch(text)
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "arch.json"
    if not path.is_file():
        raise ArchError(
            f"arch={spec}: no such file (a search run directory holds arch.json once its search has ended)"
        )
    if path.stat().st_size > 1 << 20:
        raise ArchError(f"arch={spec}: {path} is too large to be an arch.json")
    return parse_arch(path.read_text())


def check_arch(arch, choices: Mapping) -> Arch:
    """``arch`` against ``choices`` (label -> a choice module of that label: ``names``,
    ``name_of``); returns the ``Arch``. Raises ``ArchError`` naming the label and what is valid."""
    arch = load_arch(arch)
    unknown = [label for label in arch if label not in choices]
    if unknown:
        raise ArchError(
            f"arch label {unknown[0]!r} is not a choice of this model; valid labels: {', '.join(choices)}"
        )
    for label, choice in choices.items():
        if label not in arch:
            raise ArchError(
                f"arch misses label {label!r}; valid values there: {', '.join(map(str, _values(choice)))}"
            )
        try:
            name = choice.name_of(arch[label])
        except (ValueError, TypeError):
            name = None
        if name not in choice.names:
            valid = ", ".join(json.dumps(v) for v in _values(choice))
            raise ArchError(
                f"arch[{label!r}]={json.dumps(arch[label])} is not a candidate of {label}; valid: {valid}"
            )
    return arch


def _values(choice) -> list:
    return [choice.value_of(n) for n in choice.names]


__all__ = ["Arch", "ArchError", "check_arch", "load_arch", "parse_arch"]
