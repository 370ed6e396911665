"""Single-path one-shot (SPOS: Guo, Zhang, Mu, Heng, Liu, Wei, Sun, "Single Path One-Shot Neural
Architecture Search with Uniform Sampling", ECCV 2020).

Two stages in one run. (1) The supernet's weights train along one uniformly sampled path per
step, no architecture parameters involved. (2) After training (``derive_genotype``), a search
over the trained supernet: ``strategy.search=evolution`` (SPOS' evolutionary loop,
``oneshot/evolution.py``) or ``random`` (as many distinct architectures as evolution evaluates).
A candidate's fitness is its accuracy on held-out batches (the architecture split) after its
BatchNorm statistics are recalibrated on training batches: the running statistics of the
supernet average over every path trained and fit none of them (the paper's fix).

Architectures are written as random keys: a ``[n_edges, n_ops]`` array per cell type, decoded
by the space's own derivation (``supernet.genotype()`` with the keys as alphas). Independent
uniform keys give uniformly random architectures (the argmax of i.i.d. keys is uniform: on
NAS-Bench-201 every op of every edge; on DARTS' space every non-``none`` op and every pair of
inputs per node), a mutation redraws an edge's row, a crossover takes each row from either
parent. This touches only the supernet protocol, so it works on every space.

Outputs: ``spos/*`` metrics per generation, ``RUN_DIR/spos.json`` (history, every fitness) and
``RUN_DIR/plots/spos_fitness.png`` (best and mean fitness per generation). Draws are seeded by
(run seed, stream, step): DDP ranks sample the same paths, a resume the same as the killed run,
and every rank scores the same candidates on the same (unsharded) batches.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from oneshot.lightning_modules.base import SearchModule, epoch_summary, info
from oneshot.lightning_modules.drnas import alphas_replaced
from oneshot.lightning_modules.enas import batch_statistics
from oneshot.lightning_modules.gdas import seeded_generator
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from oneshot.evolution import evolution_search, random_search

_PATH_STREAM, _VAL_STREAM = 0, 1


def recalibrate_bn(model: nn.Module, forward: Callable, batches) -> None:
    """Recompute every tracked BatchNorm's running statistics as the plain average over
    ``batches`` of ``forward(x)`` in training mode (momentum None: a cumulative mean), with no
    gradient. Changes those buffers and nothing else."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        with torch.no_grad():
            for x in batches:
                forward(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)


class SposSearch(SearchModule):
    def __init__(
        self,
        supernet: nn.Module,
        w_optimizer: Callable = None,
        w_lr_min: float = 0.0,
        grad_clip: float = 5.0,
        search: str = "evolution",
        population: int = 50,
        generations: int = 20,
        top_k: int = 10,
        n_mutation: int = 25,
        n_crossover: int = 25,
        mutation_prob: float = 0.1,
        recalibration_batches: int = 20,
        eval_batches: int = 10,
        seed: int = 0,
    ):
        super().__init__(supernet)
        if search not in ("evolution", "random"):
            raise ValueError(f"strategy.search={search!r} is not known; valid: evolution, random")
        if min(population, generations, top_k, recalibration_batches, eval_batches) < 1:
            raise ValueError("strategy.population, generations, top_k, recalibration_batches, eval_batches must be >= 1")
        if n_mutation + n_crossover > population:
            raise ValueError(f"strategy.n_mutation + strategy.n_crossover = {n_mutation + n_crossover} exceeds "
                             f"strategy.population={population}; valid: at most the population")  # fmt: skip
        if getattr(supernet, "betas", None):
            raise ValueError("strategy=spos samples single paths and does not use PC-DARTS' edge normalisation; "
                             "valid: space.supernet.edge_normalization=false")  # fmt: skip
        if grad_clip is None or grad_clip < 0:
            raise ValueError(f"strategy.grad_clip={grad_clip} is out of range; valid: a number >= 0 (0 = off)")
        self.w_lr_min, self.grad_clip, self.search, self.seed = w_lr_min, grad_clip, search, seed
        self.evolution = {"population": population, "generations": generations, "top_k": top_k,
                          "n_mutation": n_mutation, "n_crossover": n_crossover, "mutation_prob": mutation_prob}  # fmt: skip
        self.recalibration_batches, self.eval_batches = recalibration_batches, eval_batches
        # The paper's CIFAR-sized recipe is DARTS' (SGD 0.025 momentum 0.9, wd 3e-4, cosine).
        self.w_optimizer = w_optimizer or (lambda params: torch.optim.SGD(params, 0.025, 0.9, weight_decay=3e-4))
        self.result, self._last_path = None, None

    # --- architectures as random keys -------------------------------------------------------
    def random_keys(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {t: torch.rand(a.shape, generator=generator, dtype=torch.float64) for t, a in self.supernet.alphas.items()}

    def genotype_of(self, keys: dict):
        device = next(iter(self.supernet.alphas.values())).device
        with alphas_replaced(self.supernet, {t: k.to(device) for t, k in keys.items()}):
            return self.supernet.genotype()

    def weights_of(self, keys: dict) -> dict:
        return self.supernet.weights_for(self.genotype_of(keys))

    def configure_optimizers(self):
        w_opt = self.w_optimizer(params=self.supernet.weight_parameters())
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        return [w_opt], [CosineAnnealingLR(w_opt, T_max=epochs, eta_min=self.w_lr_min)]

    def path_step(self, train_batch, w_opt):
        """One weight step along one uniformly sampled path; returns the loss and the logits."""
        keys = self.random_keys(seeded_generator(self.seed, _PATH_STREAM, self.global_step))
        self._last_path = self.genotype_of(keys)
        x, y = train_batch
        w_opt.zero_grad()  # set_to_none: the last path's gradients must not leak into this one
        logits = self.supernet(x, self.supernet.weights_for(self._last_path))
        loss = F.cross_entropy(logits, y)
        self.check_finite(loss, "training loss")
        self.manual_backward(loss)  # only the path's ops get gradients; SGD skips the others
        w_opt.step()  # clips to grad_clip first (on_before_optimizer_step, base.py)
        return loss.detach(), logits.detach()

    def training_step(self, batch, batch_idx):
        """Stage 1, the supernet's training: the training half only (the held-out half is the
        search's, stage 2)."""
        loss, logits = self.path_step(batch["train"], self.optimizers())
        self.log_train_step(loss, logits, batch["train"][1])

    def on_validation_epoch_start(self):
        keys = self.random_keys(seeded_generator(self.seed, _VAL_STREAM, self.current_epoch))
        self._val_weights = self.weights_of(keys)

    def validation_step(self, batch, batch_idx):
        """``val/acc``: one random path per epoch, BatchNorm on batch statistics (a health signal
        of the shared weights; the search's fitness recalibrates instead)."""
        x, y = batch
        with batch_statistics(self.supernet):
            logits = self.supernet(x, self._val_weights)
        self.log_val_step(logits, y)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()
        self.log("search/w_lr", self.optimizers().param_groups[0]["lr"])
        summary = epoch_summary(self)
        info(f"epoch {self.current_epoch}: {summary + ', ' if summary else ''}last sampled path {self._last_path}")

    def architecture_probs(self) -> dict:
        return {}  # no architecture distribution to draw: paths are uniform; see spos_fitness.png

    def current_genotype(self):
        if self.result is not None:
            return self.result.best
        return self._last_path or self.genotype_of(self.random_keys(seeded_generator(self.seed, _VAL_STREAM)))

    # --- the search over the trained supernet ------------------------------------------------
    def fitness(self, genotype, recalibration, evaluation) -> float:
        """Accuracy of ``genotype`` on ``evaluation`` after recalibrating BN on ``recalibration``."""
        weights = self.supernet.weights_for(genotype)
        recalibrate_bn(self.supernet, lambda x: self.supernet(x, weights), [x for x, _ in recalibration])
        was_training = self.supernet.training
        self.supernet.eval()
        with torch.no_grad():
            hits = sum(int((self.supernet(x, weights).argmax(-1) == y).sum()) for x, y in evaluation)
        self.supernet.train(was_training)
        return hits / sum(len(y) for _, y in evaluation)

    def search_settings(self) -> dict:
        """The evolution's sizes; ``trainer.fast_dev_run`` (Lightning's smoke test) shrinks them
        to 2 generations of 4, one batch each, so the whole run stays a smoke test."""
        sizes = dict(self.evolution, recalibration_batches=self.recalibration_batches, eval_batches=self.eval_batches)
        if self._trainer is not None and self.trainer.fast_dev_run:
            sizes.update(population=4, generations=2, top_k=2, n_mutation=1, n_crossover=1,
                         recalibration_batches=1, eval_batches=1)  # fmt: skip
        return sizes

    def derive_genotype(self, recalibration=None, evaluation=None):
        """Run the search (once; later calls return its result). Batches default to the
        datamodule's: recalibration on the weight split (no augmentation, not shuffled, not
        sharded), evaluation on the architecture split, the same on every DDP rank."""
        if self.result is not None:
            return self.result.best
        s = self.search_settings()
        dm = self.trainer.datamodule if self._trainer is not None else None
        if recalibration is None and dm is not None:
            recalibration = list(islice(dm._loader(dm.weight_set, train=False), s["recalibration_batches"]))
        if evaluation is None and dm is not None:
            evaluation = list(islice(dm.val_dataloader(), s["eval_batches"]))
        if not recalibration or not evaluation:
            raise RuntimeError("SposSearch.derive_genotype needs training and held-out batches (fit it with a datamodule, "
                               "or pass recalibration= and evaluation=)")  # fmt: skip
        device = next(self.supernet.parameters()).device
        recalibration = [(x.to(device), y.to(device)) for x, y in recalibration]
        evaluation = [(x.to(device), y.to(device)) for x, y in evaluation]
        saved = {k: v.clone() for k, v in self.supernet.state_dict().items() if "running_" in k or "num_batches" in k}
        cache: dict[str, tuple] = {}

        def genotype(keys):  # decoded once per distinct keys object
            if id(keys) not in cache:
                cache[id(keys)] = (keys, self.genotype_of(keys))
            return cache[id(keys)][1]

        def sample(rng):
            return self.random_keys(torch.Generator().manual_seed(rng.getrandbits(63)))

        def mutate(keys, prob, rng):
            fresh = sample(rng)
            return {t: torch.where(torch.tensor([rng.random() < prob for _ in k])[:, None], fresh[t], k)
                    for t, k in keys.items()}  # fmt: skip

        def crossover(a, b, rng):
            return {t: torch.where(torch.tensor([rng.random() < 0.5 for _ in a[t]])[:, None], a[t], b[t]) for t in a}

        key = lambda keys: str(genotype(keys))  # noqa: E731
        fit = lambda keys: self.fitness(genotype(keys), recalibration, evaluation)  # noqa: E731
        evaluations = s["population"] * s["generations"]
        info(f"SPOS {self.search} search: {evaluations} evaluations, BN recalibrated on {len(recalibration)} batches")
        log_row = lambda row: info(f"SPOS generation {row['generation']}: best fitness {row['best_fitness']:.4f}, "  # noqa: E731
                                   f"mean {row['mean_fitness']:.4f}, {row['total_evaluated']} evaluated, best {row['best']}")
        try:
            if self.search == "evolution":
                sizes = {k: s[k] for k in self.evolution}
                result = evolution_search(sample, mutate, crossover, key, fit, **sizes, seed=self.seed, on_generation=log_row)
            else:
                result = random_search(sample, key, fit, evaluations, s["population"], seed=self.seed, on_generation=log_row)
        finally:
            self.supernet.load_state_dict({**self.supernet.state_dict(), **saved})  # the trained statistics back
        result.best = genotype(result.best)
        self.result = result
        self._record(result)
        return result.best

    def _record(self, result) -> None:
        """``spos/*`` metrics per generation to the loggers; spos.json and the fitness picture."""
        trainer = self.trainer if self._trainer is not None else None
        step = self.global_step
        for lg in trainer.loggers if trainer is not None else []:
            for row in result.history:
                lg.log_metrics({"spos/generation": row["generation"], "spos/best_fitness": row["best_fitness"],
                                "spos/mean_fitness": row["mean_fitness"]}, step=step + row["generation"])  # fmt: skip
            lg.save()
        if trainer is None or not trainer.is_global_zero or not trainer.default_root_dir:
            return
        from oneshot.lightning_modules.runs import atomic_write_json

        from oneshot import plots

        run_dir = Path(trainer.default_root_dir)
        atomic_write_json(run_dir / "spos.json", {"search": self.search, "settings": self.search_settings(),
                                                  "best": str(result.best), "best_fitness": result.best_fitness,
                                                  "history": result.history, "fitness": result.evaluated})  # fmt: skip
        png = plots.write_bytes(run_dir / "plots" / "spos_fitness.png", plots.png_bytes(fitness_figure(result.history, self.search)))
        from oneshot.lightning_modules.pictures import wandb_loggers

        for lg in wandb_loggers(trainer.loggers):
            lg.log_image("pictures/spos_fitness", [str(png)], step=step + len(result.history))


def fitness_figure(history: list[dict], search: str):
    """Best-so-far and mean fitness per generation."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    gens = [r["generation"] for r in history]
    ax.plot(gens, [r["best_fitness"] for r in history], marker="o", label="best so far")
    ax.plot(gens, [r["mean_fitness"] for r in history], marker=".", linestyle="--", label="generation mean")
    ax.set_xlabel("generation")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("fitness (held-out accuracy)")
    ax.set_title(f"SPOS {search} search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
