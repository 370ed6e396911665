"""DrNAS (Chen, Wang, Cheng, Tang, Hsieh, "DrNAS: Dirichlet Neural Architecture Search", ICLR 2021).

The mixing weights of an edge are a random variable, ``w_e ~ Dirichlet(beta_e)`` with the
concentration ``beta_e = elu(alpha_e) + 1`` (> 0 for any alpha). Every forward draws a fresh
sample by the reparameterised (pathwise) gradient, ``Dirichlet.rsample``, so the validation loss
differentiates into the alphas through the sample. The architecture loss adds a KL term to a
Dirichlet prior, as the paper's regularised objective:

    L_arch = CE(supernet(x_val; w), y_val) + lambda * sum_e KL(Dir(beta_e) || Dir(prior * 1))

The architecture is derived from the concentration's mean, ``beta_e / sum(beta_e)``: argmax per
edge on NAS-Bench-201; DARTS' two strongest inputs per node on its space.

Defaults are the authors' NAS-Bench-201 search (github.com/xiangning-chen/DrNAS,
``201-space/train_search.py`` and ``search_model.py``): weights SGD lr 0.025 -> 0.001 cosine,
momentum 0.9, wd 3e-4, grad clip 5; alphas Adam lr 3e-4, betas (0.5, 0.999), first order;
``reg_type=kl`` with ``reg_scale`` 1e-3 against the anchor ``Dirichlet(1)``, and then no Adam
weight decay on the alphas (the authors' ``architect.py``). Not here: their progressive
scheme (``train_search_progressive.py``: partial channels widened and candidates pruned in
stages), which is a memory device for large spaces, not part of the Dirichlet search.

Draws are seeded by (run seed, stream, step) so DDP ranks use one sample and a resume redraws it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.darts import DartsSearch
from torch.distributions import Dirichlet, kl_divergence

_WEIGHT_STREAM, _ARCH_STREAM = 0, 1


def concentration(alphas: torch.Tensor) -> torch.Tensor:
    """DrNAS' map from unconstrained alphas to a Dirichlet concentration: ``elu(alpha) + 1``."""
    return F.elu(alphas) + 1


def dirichlet_kl(alphas: torch.Tensor, prior: float) -> torch.Tensor:
    """``sum_e KL(Dir(concentration(alpha_e)) || Dir(prior))`` over the edges (rows)."""
    conc = concentration(alphas)
    return kl_divergence(Dirichlet(conc), Dirichlet(torch.full_like(conc, prior))).sum()


@contextmanager
def seeded_cpu_rng(*key: int):
    """Run the block with the CPU generator seeded by ``key``, restoring its state after."""
    state = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1, np.uint64)[0]
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(state))
        yield


@contextmanager
def alphas_replaced(supernet, logits: dict):
    """The supernet with its alphas set to ``logits`` inside the block (restored after): derive
    a genotype through the space's own ``genotype()`` from other probabilities (softmax of
    log-probabilities gives them back)."""
    saved = {t: a.detach().clone() for t, a in supernet.alphas.items()}
    try:
        with torch.no_grad():
            for t, a in supernet.alphas.items():
                a.copy_(logits[t])
        yield supernet
    finally:
        with torch.no_grad():
            for t, a in supernet.alphas.items():
                a.copy_(saved[t])


class DrnasSearch(DartsSearch):
    """DrNAS on any supernet of the protocol. First order (the authors' default)."""

    def __init__(
        self,
        supernet: torch.nn.Module,
        w_optimizer: Callable = None,
        a_optimizer: Callable = None,
        kl_weight: float = 1e-3,
        prior: float = 1.0,
        w_lr_min: float = 0.001,
        grad_clip: float = 5.0,
        warmup_epochs: int = 0,
        regularizer: str | None = None,
        regularizer_weight: float | None = None,
        seed: int = 0,
    ):
        if kl_weight is None or kl_weight < 0:
            raise ValueError(f"strategy.kl_weight={kl_weight} is out of range; valid: a number >= 0 (0 = no KL term)")
        if prior is None or prior <= 0:
            raise ValueError(f"strategy.prior={prior} is out of range; valid: a Dirichlet concentration > 0")
        if getattr(supernet, "betas", None):
            raise ValueError("strategy=drnas samples the op weights itself and does not use PC-DARTS' edge "
                             "normalisation; valid: space.supernet.edge_normalization=false")  # fmt: skip
        super().__init__(supernet, w_optimizer, a_optimizer, 1, w_lr_min, grad_clip, warmup_epochs,
                         regularizer, regularizer_weight)  # fmt: skip
        self.kl_weight, self.prior, self.seed = kl_weight, prior, seed
        self._stream = _WEIGHT_STREAM
        self.a_optimizer = a_optimizer or (lambda params: torch.optim.Adam(params, 3e-4, betas=(0.5, 0.999)))

    def sample_weights(self) -> dict:
        """``{cell type: [n_edges, n_ops]}``, each row a reparameterised Dirichlet sample."""
        out = {}
        for k, (t, alphas) in enumerate(self.supernet.alphas.items()):
            conc = concentration(alphas)
            # Drawn on the CPU from a seeded generator (every rank and device alike), then moved;
            # the gradient flows back through the move.
            with seeded_cpu_rng(self.seed, self._stream, self.global_step, k):
                sample = Dirichlet(conc.double().cpu()).rsample()
            out[t] = sample.to(device=alphas.device, dtype=alphas.dtype)
        return out

    def arch_penalty(self):
        """The KL term (times ``kl_weight``), plus the collapse guard's if one is on."""
        penalty = super().arch_penalty()
        if self.kl_weight:
            kl = self.kl_weight * sum(dirichlet_kl(a, self.prior) for a in self.supernet.alphas.values())
            penalty = kl if penalty is None else penalty + kl
        return penalty

    def arch_probs(self) -> dict[str, torch.Tensor]:
        """The Dirichlet means, ``beta / sum(beta)``: what DrNAS logs, draws and derives from."""
        out = {}
        for t, a in self.supernet.alphas.items():
            conc = concentration(a.detach())
            out[t] = conc / conc.sum(-1, keepdim=True)
        return out

    def budget_probs(self) -> dict[str, torch.Tensor]:
        """Issue 17: the Dirichlet means with their gradient (the budget's expected cost is under them)."""
        return {t: concentration(a) / concentration(a).sum(-1, keepdim=True) for t, a in self.supernet.alphas.items()}

    def derive_genotype(self):
        logits = {t: p.clamp_min(1e-30).log() for t, p in self.arch_probs().items()}
        with alphas_replaced(self.supernet, logits):
            return self.supernet.genotype()

    def current_genotype(self):
        return self.derive_genotype()

    def training_step(self, batch, batch_idx):
        w_opt, a_opt = self.optimizers()
        train_batch, val_batch = batch["train"], batch["val"]

        # 1. Architecture step on the validation batch: CE through a Dirichlet sample + KL term.
        if self.current_epoch >= self.warmup_epochs:
            self._stream = _ARCH_STREAM
            loss_val = self.arch_step(train_batch, val_batch, w_opt, a_opt)
            self.log("search/arch_loss", loss_val)

        # 2. Weight step on the training batch, with a fresh sample of the op weights.
        self._stream = _WEIGHT_STREAM
        loss, logits = self.weight_step(train_batch, w_opt)
        self.log_train_step(loss, logits, train_batch[1])

    def validation_step(self, batch, batch_idx):
        """``val/acc`` of the supernet mixed by the Dirichlet means (no sampling: deterministic)."""
        x, y = batch
        self.log_val_step(self.supernet(x, self.arch_probs()), y)
