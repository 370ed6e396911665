"""Keep the libraries' chatter out of a run's output, so what is left is ours and the errors.

Lightning announces the hardware it did not find (``GPU available: False``), advertises
(``💡 Tip: ... litlogger``), echoes settings back (``Trainer(limit_val_batches=1) was configured
so 1 batch will be used``, ``Seed set to 0``) and warns about what is intended here (two loader
workers on a 2-core machine, an epoch shorter than ``log_every_n_steps``, a library's own
deprecations). Dropped by message, not by silencing Lightning's loggers, so a line we did not
foresee (``Restoring states from the checkpoint path ...`` on resume) still shows.

Nothing is imported: filters on a logger's name and warnings filters on module names work
before the libraries load, and ``import pytorch_lightning`` (which resets its logger's level)
leaves them in place.
"""

from __future__ import annotations

import logging
import re
import warnings

# Lightning's INFO lines that tell a user nothing about their run.
_NOISE_LINES = re.compile(
    r"(GPU|TPU|HPU|IPU) available: "
    r"|💡 Tip: "
    r"|Seed set to "
    r"|`Trainer\(\w+=.*\)` was configured so "
    r"|`Trainer.fit` stopped: `max_epochs=\d+` reached"  # the normal end; max_steps' stop still shows
    r"|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
    r"|You are using a CUDA device .* that has Tensor Cores"
)
_LOGGERS = (  # where those lines come from (rank_zero_info logs under the rank_zero module's name)
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
    "pytorch_lightning.accelerators.cuda",
)
# Warnings raised inside these libraries about themselves (deprecations of their internals).
_LIBRARIES = r"(torch|torchvision|torchmetrics|pytorch_lightning|lightning_fabric|lightning_utilities|hydra|omegaconf|wandb)(\.|$)"
# Lightning's advice that does not apply here (its PossibleUserWarning, matched by message so
# that this module imports nothing).
_NOISE_WARNINGS = (
    r".*does not have many workers",
    r".*smaller than the logging interval",
    r".*Checkpoint directory .* exists and is not empty",  # a resumed run writes into its own
    r".*(litlogger|LitLogger)",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not _NOISE_LINES.search(record.getMessage())


_FILTER = _DropNoise()


def quiet_libraries() -> None:
    """Drop the libraries' noise lines and warnings for this process (idempotent)."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=_LIBRARIES)
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
