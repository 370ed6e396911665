"""Command-line apps: ``oneshot-search`` and ``oneshot-retrain`` (Hydra), thin by design.

Errors a user can fix (a bad genotype, an unknown dataset, impossible sizes, missing data while
offline, a NaN loss) end the app with exit status 2 and one line naming the bad value and the
valid choices; Hydra reports bad overrides and unknown config choices the same way. Set
``ONESHOT_TRACEBACK=1`` for the full traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

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
    if isinstance(seen, MissingMandatoryValue):
        key = getattr(seen, "full_key", None) or "a value"
        return ValueError(f"{key} is required, e.g. {key}=... on the command line (see --help)")
    if isinstance(seen, GenotypeError | DatasetUnavailableError | NonFiniteLossError | ValueError | FileNotFoundError):
        return seen
    return None


def _run(fn, cfg: DictConfig):
    try:
        return fn(cfg)
    except Exception as exc:
        err = _user_error(exc)
        if err is None or os.environ.get("ONESHOT_TRACEBACK"):
            raise
        log.error("error: %s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="search")
def search_main(cfg: DictConfig) -> None:
    from oneshot import search

    _run(search, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="retrain")
def retrain_main(cfg: DictConfig) -> None:
    from oneshot import retrain

    _run(retrain, cfg)
