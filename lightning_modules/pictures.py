"""Pictures of a search as it runs, in the run directory and (``logger=wandb``) in W&B.

``ArchitecturePictures`` (a Callback): after every search epoch, the heatmap of each cell type's
softmaxed alphas (ENAS: of its policy) and the picture of each derived cell, as
``RUN_DIR/plots/epochs/epoch_XXX_{alphas,cell}_<cell>.png`` plus a latest copy
``RUN_DIR/plots/{alphas,cell}_<cell>.png`` - whatever the logger, so a CSV user sees them too.
A model space (issue 15) has no cell: its derived architecture is ``epoch_XXX_arch.png`` / ``arch.png``.
With W&B the same PNGs are logged as images (``pictures/alphas/<cell>``, ``pictures/cell/<cell>``, ``pictures/arch``)
with a table of the genotype after every epoch (``arch/genotypes``).

``finish_pictures``: at the end of a stage, everything ``oneshot-plot`` draws (curves, alpha
evolution, TE-NAS rounds) and, with W&B, those pictures, the TE-NAS table and the genotype
files and the retrained network (with its ONNX / TorchScript exports) as artifacts. Rank 0 only; every file is written atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from oneshot import plots

log = logging.getLogger("oneshot")


def wandb_loggers(loggers) -> list:
    return [lg for lg in loggers or [] if type(lg).__name__ == "WandbLogger"]


class ArchitecturePictures(Callback):
    """Heatmaps and cell pictures after every search epoch (see the module docstring)."""

    def __init__(self, run_dir, use_dot: bool = True):
        self.plots_dir = Path(run_dir) / "plots"
        self.use_dot = use_dot

    def on_train_epoch_end(self, trainer, pl_module):
        # Callbacks run before the module's own epoch-end hook (where it logs its alphas), but
        # the architecture has taken its last step of the epoch already: this is its end state.
        if not trainer.is_global_zero or not hasattr(pl_module, "architecture_probs"):
            return
        # The step this epoch's metrics are logged at: Lightning's logging step less one at an
        # epoch's end (under manual optimisation ``global_step`` counts every optimizer's steps).
        epoch, step = trainer.current_epoch, max(0, trainer.fit_loop.epoch_loop._batches_that_stepped - 1)
        kind = "policy" if hasattr(pl_module, "controller") else "alphas"
        genotype = str(pl_module.current_genotype())
        pictures = {}
        for cell, rows in pl_module.architecture_probs().items():
            title = f"{kind} after epoch {epoch}{plots.of(cell)}"
            pictures[f"alphas/{cell}"] = plots.png_bytes(plots.heatmap_figure(rows, title))
        for cell, png in plots.cell_pictures(genotype, self.use_dot).items():
            pictures[f"cell/{cell}"] = png
        # issue 15: a model space's derived architecture (it has no cell)
        arch = plots.arch_picture(genotype, f"architecture after epoch {epoch}")
        if arch is not None:
            pictures["arch"] = arch
        paths = {}
        for key, png in pictures.items():
            what, _, cell = key.partition("/")
            name = f"{what}_{cell}" if cell else what
            paths[key] = plots.write_bytes(
                self.plots_dir / "epochs" / f"epoch_{epoch:03d}_{name}.png", png
            )
            plots.write_bytes(self.plots_dir / f"{name}.png", png)
        wandb = wandb_loggers(trainer.loggers)
        if not wandb:
            return
        # The table is rebuilt whole every epoch (W&B tables are immutable once logged); earlier
        # epochs come from the module's list, which a resumed run restores from its checkpoint.
        rows = [[e, g] for e, g in enumerate(pl_module.genotypes[:epoch])] + [[epoch, genotype]]
        for lg in wandb:
            for key, path in paths.items():
                lg.log_image(f"pictures/{key}", [str(path)], step=step, caption=[f"epoch {epoch}"])
            lg.log_table("arch/genotypes", columns=["epoch", "genotype"], data=rows, step=step)


@rank_zero_only
def finish_pictures(
    loggers, run_dir, report: dict | None = None, draw: bool = True, use_dot: bool = True,
    stage: str | None = None,
) -> None:  # fmt: skip
    """Redraw a finished stage's pictures (``draw``); with W&B log them, the TE-NAS table and the
    artifacts. A picture that fails to draw is reported and skipped: it must not cost the run
    its results. ``stage`` says what goes to these loggers' run: ``"search"`` the search's
    pictures, the TE-NAS table and the genotype files; ``"retrain"`` (a search's retraining,
    ``run_dir`` the search's) the retraining's pictures and the network; None everything."""
    run_dir, written = Path(run_dir), []
    try:
        written = plots.redraw(run_dir, epochs=False, use_dot=use_dot) if draw else []
    except Exception as e:  # noqa: BLE001 - see the docstring
        log.warning(
            "could not draw the pictures of %s: %s (redraw with: oneshot-plot %s)",
            run_dir,
            e,
            run_dir,
        )
    if stage is not None:
        written = [p for p in written if p.stem.startswith("retrain") == (stage == "retrain")]
    for lg in wandb_loggers(loggers):
        run = lg.experiment
        import wandb

        for path in written:
            lg.log_image(f"plots/{path.stem}", [str(path)])
        prune = plots.prune_history(run_dir, report) if stage != "retrain" else None
        if prune:
            columns = list(prune[0])
            lg.log_table(
                "tenas/pruning", columns=columns, data=[[r.get(c) for c in columns] for r in prune]
            )
        genotype_files = [
            run_dir / n for n in ("genotype.txt", "genotype.json")
            if (run_dir / n).is_file() and stage != "retrain"
        ]  # fmt: skip
        if genotype_files:
            art = wandb.Artifact(
                f"genotype-{run.id}",
                type="genotype",
                metadata={"genotype": (report or {}).get("genotype")},
            )
            for f in genotype_files:
                art.add_file(str(f))
            run.log_artifact(art)
        for network in (run_dir / "retrain" / "network.pt", run_dir / "network.pt"):
            if network.is_file() and stage != "search":
                retrain = (report or {}).get("retrain") or {}
                meta = {k: retrain.get(k) for k in ("test_acc", "parameters", "network")}
                exported = retrain.get("export") or {}
                # issue 17: the deployable files ride along, with their parity and latency
                meta["export"] = {fmt: {k: exported[fmt].get(k) for k in ("file", "runtime", "parity_max_abs_diff")}
                                  | {"latency_ms": (exported[fmt].get("latency") or {}).get("median_ms")}
                                  for fmt in ("onnx", "torchscript") if isinstance(exported.get(fmt), dict)}  # fmt: skip
                art = wandb.Artifact(
                    f"network-{run.id}",
                    type="model",
                    metadata={**meta, "genotype": (report or {}).get("genotype")},
                )
                art.add_file(str(network))
                for f in ("model.onnx", "model.pt"):
                    if (network.parent / f).is_file():
                        art.add_file(str(network.parent / f))
                run.log_artifact(art)
