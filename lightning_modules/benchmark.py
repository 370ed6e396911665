"""Benchmark accuracy of the derived cell, logged as the search goes (issue 18).

``benchmark=nb201 benchmark.path=FILE``: after every search epoch the genotype the strategy
derived (``SearchModule.genotypes``) is looked up in the table (``oneshot.benchmark``) and its
accuracies go to every logger as ``benchmark/<column>`` (CSV, W&B, ...), at the epoch's step:
NB201 papers' curve of the derived cell's accuracy, the one that shows DARTS collapsing to skip
connections. The final genotype's accuracies go into ``report.json`` under ``benchmark``.

The module appends an epoch's genotype in its own ``on_train_epoch_end``, which Lightning calls
after the callbacks' hook of that name, so the lookup happens at the next epoch's start and at
the end of training. The lookup only reads ``genotypes``: it derives nothing, so the search's
random stream is the same with or without a benchmark.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from oneshot.benchmark import BenchmarkError, BenchmarkTable

log = logging.getLogger("oneshot")


def load_benchmark(cfg: DictConfig) -> BenchmarkTable | None:
    """The configured table, or None for ``benchmark=none``; a bad one raises BenchmarkError
    before anything runs."""
    bench = cfg.get("benchmark")
    if not isinstance(bench, DictConfig) or bench.get("name", "none") == "none":
        return None
    space = OmegaConf.select(cfg, "space.name", default=None)
    if space != "nb201":
        raise BenchmarkError(f"benchmark={bench.name} holds NAS-Bench-201 cells; it needs space=nb201, not space={space}")  # fmt: skip
    if OmegaConf.is_missing(bench, "path") or not bench.get("path"):
        raise BenchmarkError(f"benchmark={bench.name} needs benchmark.path=FILE (a CSV with 'arch' and accuracy columns, the official NAS-Bench-201 .pth, or a NATS-Bench topology .pickle.pbz2 file or -simple directory)")  # fmt: skip
    columns = bench.get("columns")
    return BenchmarkTable.load(bench.path, list(columns) if columns else None)


def accuracies(table: BenchmarkTable, genotype) -> dict[str, float] | None:
    """``{column: accuracy}`` of ``genotype``, or None with one log line when the table lacks it
    (or, for a NATS-Bench directory read cell by cell, when that cell's file cannot be read
    safely: the search goes on without it)."""
    try:
        found = table.lookup(genotype)
    except BenchmarkError as e:
        log.warning("benchmark: %s; nothing logged for %s", e, genotype)
        return None
    if found is None:
        log.warning("benchmark: %s is not in %s; nothing logged for it", genotype, table.path.name)
    return found


class BenchmarkAccuracy(Callback):
    """Logs ``benchmark/<column>`` for each epoch's derived genotype (see the module docstring)."""

    def __init__(self, table: BenchmarkTable):
        self.table, self.done = table, 0

    def _log_new(self, trainer, pl_module) -> None:
        genotypes = getattr(pl_module, "genotypes", [])
        while self.done < len(genotypes):
            epoch, genotype = self.done, genotypes[self.done]
            self.done += 1
            found = accuracies(self.table, genotype) if rank_zero_only.rank == 0 else None
            if found:
                metrics = {f"benchmark/{k}": v for k, v in found.items()}
                for logger in trainer.loggers:
                    logger.log_metrics({**metrics, "epoch": epoch}, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module):
        self.done = len(getattr(pl_module, "genotypes", []))  # a resumed run logged those already

    def on_train_epoch_start(self, trainer, pl_module):
        self._log_new(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._log_new(trainer, pl_module)
