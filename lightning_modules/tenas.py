"""TE-NAS as a standalone, training-free search (Chen, Gong, Wang, "Neural Architecture Search on
ImageNet in Four GPU Hours: A Theoretically Inspired Perspective", ICLR 2021).

The search is a prune: starting from every op on every edge of the configured supernet, remove
the ops whose removal lowers the NTK condition number most and costs fewest linear regions,
round by round, until one op per edge is left (in the DARTS space each node then keeps its two
most important inputs); that is the genotype, retrained as after any other search. No weight
is trained while searching, so the pipeline calls ``search_without_training`` instead of
``Trainer.fit`` (``training_free``) and the run has no search checkpoints. The prune writes
``tenas.json`` and ``tenas.csv`` (both metrics per op per round) into the run directory.
Every DDP rank prunes and derives the same genotype: see ``lightning_modules/warmstart.py``.
"""

from __future__ import annotations

from pathlib import Path

from oneshot.lightning_modules.base import SearchModule
from oneshot.lightning_modules.warmstart import PruneOptions, run_prune


class TenasSearch(SearchModule):
    """``options``: those of ``PruneOptions`` (``conf/strategy/tenas.yaml``). The supernet only
    tells the prune the space's structure and candidates; its weights are never used."""

    training_free = True

    def __init__(self, supernet, **options):
        super().__init__(supernet)
        self.options = PruneOptions.from_config(options, "strategy")
        self.result, self.report = None, None

    def search_without_training(self, datamodule, run_dir: Path) -> dict:
        # Issue 17: with a budget (set by the pipeline) no prune leaves a supernet whose cheapest
        # architecture is over it, so the one architecture left at the end is within budget.
        budget = (self.budget.cost, self.budget.max) if self.budget is not None else None
        self.result, self.report = run_prune(
            self.supernet, datamodule, 1, self.options, run_dir, "tenas", "strategy", budget=budget
        )
        return self.report

    def derive_genotype(self):
        if self.result is None:
            raise RuntimeError(
                "TenasSearch derives its genotype in search_without_training(); run it first"
            )
        return self.result.genotype

    def training_step(self, batch, batch_idx):
        raise RuntimeError("TE-NAS trains nothing while searching; the pipeline does not fit it")
