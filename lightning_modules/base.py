"""What every search strategy shares: accuracy, alpha logging, the derived genotype per epoch,
and the explicit all-reduce for gradients computed outside DDP's autograd hooks.

Deliberately thin: a strategy's ``training_step`` holds its whole algorithm; nothing here wraps
the user's supernet or forwards hooks.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=-1) == y).float().mean()


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


class SearchModule(pl.LightningModule):
    """Base of the search strategies. Subclasses implement ``training_step``."""

    def __init__(self, supernet: torch.nn.Module):
        super().__init__()
        self.supernet = supernet
        self.automatic_optimization = False
        self.genotypes: list[str] = []  # derived genotype after every epoch (all ranks agree)

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

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.supernet(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val/acc", accuracy(logits, y), prog_bar=True, sync_dist=True)

    def log_architecture(self) -> None:
        """``alpha/<cell>/<edge>/<op>`` softmax weights, ``arch/entropy``, and the genotype."""
        entropies = []
        for cell_type, probs in self.supernet.arch_weights().items():
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
        rank_zero_info(f"epoch {self.current_epoch}: genotype {genotype}")

    def derive_genotype(self):
        return self.supernet.genotype()

    def architecture_probs(self) -> dict[str, list[tuple[str, dict[str, float]]]]:
        """Per cell type, per edge: each candidate op's softmaxed alpha (what the pictures show)."""
        out = {}
        for t, probs in self.supernet.arch_weights().items():
            names, cands = self.supernet.edge_names(t), self.supernet.candidates[t]
            rows = probs.detach().float().cpu().tolist()
            out[t] = [(names[e], dict(zip(cands[e], row))) for e, row in enumerate(rows)]
        return out

    def current_genotype(self):
        """The genotype the current architecture parameters give; cheap, for per-epoch pictures
        (``derive_genotype`` may be expensive in a subclass, e.g. ENAS' scored samples)."""
        return self.supernet.genotype()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["genotypes"] = list(self.genotypes)

    def on_load_checkpoint(self, checkpoint):
        self.genotypes = list(checkpoint.get("genotypes", []))
