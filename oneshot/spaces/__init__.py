"""Search spaces: a registry of supernets and of the discrete networks their genotypes build.

A user space registers itself with ``register_space(name, supernet_cls, genotype_cls,
build_network)``, or is named directly by ``_target_`` in a ``conf/space/*.yaml``; see the README.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from oneshot.arch import Arch
from oneshot.genotypes import DartsGenotype, NB201Genotype
from oneshot.spaces.darts import DartsNetwork, DartsSupernet
from oneshot.spaces.model import ModelSpace, fixed_network
from oneshot.spaces.nb201 import NB201Network, nb201_network


@dataclass(frozen=True)
class Space:
    name: str
    supernet: type[nn.Module]
    genotype: type
    build_network: Callable[..., nn.Module]


SPACES: dict[str, Space] = {}


def register_space(name: str, supernet: type[nn.Module], genotype: type, build_network: Callable[..., nn.Module]):
    SPACES[name] = Space(name, supernet, genotype, build_network)


register_space("nb201", NB201Network, NB201Genotype, nb201_network)
register_space("darts", DartsSupernet, DartsGenotype, DartsNetwork)
# Issue 15: a user's own model with oneshot.nn choices; its "genotype" is an Arch {label: value}.
register_space("model", ModelSpace, Arch, fixed_network)


def get_space(name: str) -> Space:
    try:
        return SPACES[name]
    except KeyError:
        raise ValueError(f"unknown space {name!r}; valid spaces: {', '.join(SPACES)}") from None


def space_of(genotype) -> Space:
    for space in SPACES.values():
        if isinstance(genotype, space.genotype):
            return space
    raise ValueError(f"no registered space builds genotypes of type {type(genotype).__name__}")


def build_network(genotype, **kwargs) -> nn.Module:
    """The discrete network of ``genotype`` in its own space (sizes as keyword arguments)."""
    return space_of(genotype).build_network(genotype, **kwargs)


__all__ = ["SPACES", "DartsNetwork", "DartsSupernet", "ModelSpace", "NB201Network", "build_network", "get_space",
           "nb201_network", "register_space", "space_of"]
