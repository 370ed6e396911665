"""What every search strategy shares: the epoch metrics (torchmetrics), gradient clipping of the
weight step, alpha logging, the derived genotype and a plain summary line per epoch, and the
explicit all-reduce for gradients computed outside DDP's autograd hooks.

Deliberately thin: a strategy's ``training_step`` holds its whole algorithm; nothing here wraps
the user's supernet or forwards hooks.
"""

from __future__ import annotations

import logging
import math
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from oneshot.lightning_modules.checkpoint_hparams import RebuildFromConfig
from pytorch_lightning.utilities import rank_zero_only
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

log = logging.getLogger("oneshot")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


@rank_zero_only
def info(message: str) -> None:
    """A console line from rank 0, through the ``oneshot`` logger (Lightning's are quieted)."""
    log.info(message)


def num_classes_of(network: torch.nn.Module) -> int:
    """The classes a network predicts: its ``classifier``'s outputs (every space names its head
    so), else the last ``nn.Linear``'s."""
    head = getattr(network, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        head = next((m for m in reversed(list(network.modules())) if isinstance(m, torch.nn.Linear)), None)
    if head is None:
        raise ValueError(f"{type(network).__name__} has no classifier (nn.Linear) to count its classes from")
    return head.out_features


def accuracy_metric(num_classes: int) -> MulticlassAccuracy:
    """Top-1 accuracy as a fraction (0..1), summed over an epoch's batches (an uneven last batch
    weighs by its size) and over DDP ranks when computed. ``validate_args=False``: the checks are
    a host-device sync per batch, and the same labels already went through ``cross_entropy``."""
    return MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)


def epoch_summary(module: pl.LightningModule) -> str:
    """``train loss 0.4123 acc 0.8750, val loss ... acc ...``: the epoch's numbers in the plain
    line a piped run shows instead of a progress bar. Training ones from the module's
    ``train_loss``/``train_acc`` metrics (synced over DDP ranks, so every rank must call this);
    validation ones only if validation ran this epoch (``_validated_epoch``)."""
    stages = {}
    if module.train_acc.update_called:
        stages["train"] = {"loss": module.train_loss.compute(), "acc": module.train_acc.compute()}
    metrics = module.trainer.callback_metrics if module._trainer is not None else {}
    if getattr(module, "_validated_epoch", -1) == module.current_epoch:
        stages["val"] = {k: metrics[f"val/{k}"] for k in ("loss", "acc") if f"val/{k}" in metrics}
    return ", ".join(f"{s} " + " ".join(f"{k} {float(v):.4f}" for k, v in m.items()) for s, m in stages.items() if m)


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average tensors over DDP ranks in one flat all-reduce (identity in a single process).

    DDP averages ``.grad`` during ``backward()``; gradients taken with ``torch.autograd.grad``
    (the unrolled DARTS step) never pass its hooks, so they are averaged here, explicitly.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, k = [], 0
    for t in tensors:
        out.append(flat[k : k + t.numel()].view_as(t))
        k += t.numel()
    return out


def check_ranks_agree(module: torch.nn.Module, genotype) -> dict | None:
    """After a DDP search, prove the ranks ended alike: every parameter (alphas, controller,
    weights) against rank 0's, and every rank's derived genotype. Raises if they differ, since
    a rank-dependent result would be silently wrong; returns what was measured (None in one
    process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    genotypes = [None] * dist.get_world_size()
    dist.all_gather_object(genotypes, str(genotype))
    if len(set(genotypes)) > 1 or float(diff) > 1e-5:
        raise RuntimeError(
            f"DDP ranks disagree: parameters differ by up to {float(diff):.3g} from rank 0's, "
            f"genotypes per rank: {genotypes}"
        )
    return {"world_size": dist.get_world_size(), "max_parameter_diff_across_ranks": float(diff)}


class SearchModule(RebuildFromConfig, pl.LightningModule):
    """Base of the search strategies. Subclasses implement ``training_step``."""

    def __init__(self, supernet: torch.nn.Module):
        super().__init__()
        self.supernet = supernet
        self.automatic_optimization = False
        self.genotypes: list[str] = []  # derived genotype after every epoch (all ranks agree)
        # torchmetrics objects, so epoch values count every sample on every rank. Their states are
        # not in checkpoints (torchmetrics' default): they hold one epoch, and a resumed run
        # starts an epoch afresh.
        self.num_classes = num_classes_of(supernet)
        self.train_acc, self.val_acc = accuracy_metric(self.num_classes), accuracy_metric(self.num_classes)
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self._validated_epoch = -1  # the summary line shows val numbers only of this epoch's validation

    #: Clip the weight step's gradient to this norm (0: off); see ``on_before_optimizer_step``.
    grad_clip: float = 0.0
    #: Issue 17: the run's ``oneshot.cost.budget.BudgetPenalty`` (set by the pipeline), or None.
    budget = None

    def forward(self, x, weights=None):
        return self.supernet(x, weights)

    #: Check the loss for NaN/inf on every N-th call. A check is a host-device sync: free on CPU,
    #: a pipeline stall per step on a GPU. ``None``: every call on CPU, every 20th on accelerators.
    finite_check_every: int | None = None

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        every = self.finite_check_every or (1 if loss.device.type == "cpu" else 20)
        self._finite_calls = getattr(self, "_finite_calls", -1) + 1
        if self._finite_calls % every:
            return
        # The price of stopping before NaN reaches the weights. Averaged over DDP ranks (NaN and
        # inf survive the mean), so all ranks stop at the same step and none is left waiting in a
        # collective for a rank that stopped (every rank counts its calls alike).
        (value,) = all_reduce_mean([loss.detach().float().reshape(1)])
        if not math.isfinite(float(value)):
            raise NonFiniteLossError(
                f"{what} is {float(value)} at epoch {self.current_epoch}, step {self.global_step}; "
                "stopping (lower the learning rate or enable gradient clipping); the last good checkpoint is kept"
            )

    def on_before_optimizer_step(self, optimizer):
        """Clip the weight optimizer's gradients (the first optimizer in every strategy).

        Here, not after ``manual_backward``: Lightning calls this hook inside ``opt.step()``,
        after 16-bit mixed precision's GradScaler unscaled the gradients, so the norm is the true
        one; clipped in the training step, the gradients would still carry the loss scale."""
        if self.grad_clip and optimizer is self.trainer.optimizers[0]:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def log_train_step(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """``train/loss`` and ``train/acc`` of this batch (per step, as before); the metrics also
        accumulate the epoch's values for the summary line."""
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc(logits.detach(), y), prog_bar=True)

    def log_val_step(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """``val/loss`` and ``val/acc`` over the whole validation epoch: the metric objects are
        logged, so Lightning computes them once at the epoch's end over all batches and ranks."""
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))
        self.val_acc.update(logits, y)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log_val_step(self.supernet(x), y)

    def on_train_epoch_start(self):
        self.train_loss.reset()
        self.train_acc.reset()

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._validated_epoch = self.current_epoch

    def log_architecture(self) -> None:
        """``alpha/<cell>/<edge>/<op>`` softmax weights, ``arch/entropy``, and the genotype."""
        entropies = []
        for cell_type, probs in self.arch_probs().items():
            probs = probs.detach().float().cpu()
            entropies.append(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
            names = self.supernet.edge_names(cell_type)
            for e, row in enumerate(probs):
                for op, p in zip(self.supernet.candidates[cell_type][e], row):
                    self.log(f"alpha/{cell_type}/{names[e]}/{op}", float(p), sync_dist=False)
        if entropies:
            self.log("arch/entropy", float(torch.stack(entropies).mean()))
        genotype = str(self.derive_genotype())
        self.genotypes.append(genotype)
        summary = epoch_summary(self)
        info(f"epoch {self.current_epoch}: {summary + ', ' if summary else ''}genotype {genotype}")

    def derive_genotype(self):
        return self.supernet.genotype()

    def arch_probs(self) -> dict[str, torch.Tensor]:
        """Per cell type, ``[n_edges, n_ops]`` op probabilities: the softmaxed alphas (DrNAS: its
        Dirichlet means). What ``alpha/...`` logs and the heatmaps show."""
        return self.supernet.arch_weights()

    def architecture_probs(self) -> dict[str, list[tuple[str, dict[str, float]]]]:
        """Per cell type, per edge: each candidate op's softmaxed alpha (what the pictures show)."""
        out = {}
        for t, probs in self.arch_probs().items():
            names, cands = self.supernet.edge_names(t), self.supernet.candidates[t]
            rows = probs.detach().float().cpu().tolist()
            out[t] = [(names[e], dict(zip(cands[e], row))) for e, row in enumerate(rows)]
        return out

    def current_genotype(self):
        """The genotype the current architecture parameters give; cheap, for per-epoch pictures
        (``derive_genotype`` may be expensive in a subclass, e.g. ENAS' scored samples)."""
        return self.supernet.genotype()

    #: Seconds the search took before this process's fit: the warm start's prune (set by the
    #: pipeline), or, on resume, everything the checkpoint's run had spent (warm start included).
    search_seconds_before: float = 0.0

    def on_fit_start(self):
        self._fit_clock = time.perf_counter()
        if self.budget is not None:  # issue 17: one cost table for all DDP ranks (rank 0's)
            self.budget.sync_ranks()

    def search_seconds(self) -> float:
        """Wall seconds of the whole search so far, across every process that resumed it."""
        clock = getattr(self, "_fit_clock", None)
        return self.search_seconds_before + (time.perf_counter() - clock if clock is not None else 0.0)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["genotypes"] = list(self.genotypes)
        checkpoint["search_seconds"] = self.search_seconds()
        if self.budget is not None:  # issue 17: the budget's multiplier, so a resume continues it exactly
            checkpoint["budget"] = self.budget.state_dict()

    def on_load_checkpoint(self, checkpoint):
        self.genotypes = list(checkpoint.get("genotypes", []))
        self.search_seconds_before = float(checkpoint.get("search_seconds", 0.0))
        if self.budget is not None and "budget" in checkpoint:
            self.budget.load_state_dict(checkpoint["budget"])
