"""GDAS (Dong & Yang, "Searching for A Robust Neural Architecture in Four GPU Hours", CVPR 2019).

DARTS' bilevel search, but every forward runs one op per edge, drawn by Gumbel-max from the
alphas, instead of the weighted sum of all of them:

    h_e = softmax((log_softmax(alpha_e) + g_e) / tau),   g_e ~ Gumbel(0, 1)
    k_e = argmax h_e,    hardwts_e = one_hot(k_e) - h_e.detach() + h_e
    edge_e(x) = hardwts_e[k_e] * op_{k_e}(x)

``hardwts_e[k_e]`` is 1 in value, so the forward is the sampled op alone (and only it is
computed: ``MixedOp``'s ``(index, weight)`` form), while its gradient is the softmax's: the
straight-through estimator, d edge / d alpha = op_k(x) * d h_k / d alpha. The temperature
anneals linearly per epoch from ``tau_max`` = 10 to ``tau_min`` = 0.1, as in the authors' code
(github.com/D-X-Y/AutoDL-Projects, ``exps/NAS-Bench-201-algos/GDAS.py``,
``xautodl/models/cell_searchs/search_model_gdas.py``); there a step trains the weights on a
training batch, then the alphas on a validation batch, each with a fresh sample. Derivation is
DARTS' (the argmax of the alphas).

The authors' NAS-Bench-201 cell (``forward_gdas``) also adds the other ops' ``hardwts`` (zero in
value) to each edge as scalars; that changes no output, only sends every op's softmax gradient
the sum of the node's output gradient. This is their variant ``forward_gdas_v1`` (issue #119
there), the paper's equation: only the sampled op, in value and in gradient.

Draws are seeded by (run seed, step, stream): every DDP rank samples the same ops (ranks differ
only in their data shard, as DDP needs), and a resumed run redraws what the killed one drew.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.darts import DartsSearch

# Streams of random draws: the weight step's and the architecture step's samples differ.
_WEIGHT_STREAM, _ARCH_STREAM = 0, 1


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by ``key`` (run seed, stream, step, ...): the same on every rank."""
    state = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def temperature(epoch: int, max_epochs: int | None, tau_max: float, tau_min: float) -> float:
    """GDAS' schedule: ``tau_max - (tau_max - tau_min) * epoch / (epochs - 1)``, per epoch."""
    if not max_epochs or max_epochs <= 1:
        return tau_max
    return tau_max - (tau_max - tau_min) * min(epoch, max_epochs - 1) / (max_epochs - 1)


def gumbel_hard_sample(alphas: torch.Tensor, tau: float, generator: torch.Generator):
    """``(index, hardwts, probs)`` per row of ``alphas``: the Gumbel-max op, the straight-through
    one-hot and the relaxed probabilities. The noise is drawn on the CPU (same on every device)."""
    u = torch.rand(alphas.shape, generator=generator, dtype=torch.float64)
    # -log(Exp(1)) is Gumbel(0, 1); clamp so a draw of exactly 0 cannot give inf (the authors redraw).
    gumbels = -(-torch.log(u.clamp_min(1e-20))).log()
    gumbels = gumbels.to(device=alphas.device, dtype=alphas.dtype)
    probs = torch.softmax((alphas.log_softmax(dim=-1) + gumbels) / tau, dim=-1)
    index = probs.argmax(dim=-1)
    one_hot = F.one_hot(index, alphas.shape[-1]).to(probs.dtype)
    return index, one_hot - probs.detach() + probs, probs


class GdasSearch(DartsSearch):
    """GDAS on any supernet of the protocol (``oneshot/spaces/base.py``). First order only (the
    authors' search is); ``regularizer=beta`` applies, ``auxiliary_skip`` does not (it would
    run a second op per edge)."""

    def __init__(
        self,
        supernet: torch.nn.Module,
        w_optimizer: Callable = None,
        a_optimizer: Callable = None,
        tau_max: float = 10.0,
        tau_min: float = 0.1,
        w_lr_min: float = 0.001,
        grad_clip: float = 5.0,
        warmup_epochs: int = 0,
        regularizer: str | None = None,
        regularizer_weight: float | None = None,
        seed: int = 0,
    ):
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"strategy.tau_min={tau_min}, strategy.tau_max={tau_max}: valid: 0 < tau_min <= tau_max")
        if regularizer == "auxiliary_skip":
            raise ValueError("strategy.regularizer=auxiliary_skip does not apply to GDAS (one op per edge); valid: null, beta")
        super().__init__(supernet, w_optimizer, a_optimizer, 1, w_lr_min, grad_clip, warmup_epochs,
                         regularizer, regularizer_weight)  # fmt: skip
        self.tau_max, self.tau_min, self.seed = tau_max, tau_min, seed
        self._stream = _WEIGHT_STREAM
        # GDAS' weights: Nesterov SGD lr 0.025, wd 5e-4 (configs/nas-benchmark/algos/GDAS.config).
        self.w_optimizer = w_optimizer or (
            lambda params: torch.optim.SGD(params, 0.025, momentum=0.9, nesterov=True, weight_decay=5e-4)
        )

    def tau(self) -> float:
        return temperature(self.current_epoch, self._max_epochs(), self.tau_max, self.tau_min)

    def sample_weights(self) -> dict:
        """One Gumbel-max draw per edge: ``{cell type: [(op index, straight-through weight), ...]}``."""
        tau, out = self.tau(), {}
        for k, (t, alphas) in enumerate(self.supernet.alphas.items()):
            generator = seeded_generator(self.seed, self._stream, self.global_step, k)
            index, hardwts, _ = gumbel_hard_sample(alphas, tau, generator)
            out[t] = [(int(i), hardwts[e, i]) for e, i in enumerate(index.tolist())]
        return out

    def training_step(self, batch, batch_idx):
        w_opt, a_opt = self.optimizers()
        train_batch, val_batch = batch["train"], batch["val"]

        # 1. Weight step on the training batch, along one sampled op per edge (alphas frozen).
        self._stream = _WEIGHT_STREAM
        loss, logits = self.weight_step(train_batch, w_opt)
        self.log_train_step(loss, logits, train_batch[1])

        # 2. Architecture step on the validation batch, a fresh sample; the straight-through
        #    weights carry the loss's gradient to the alphas (alphas frozen during warm-up).
        if self.current_epoch >= self.warmup_epochs:
            self._stream = _ARCH_STREAM
            loss_val = self.arch_step(train_batch, val_batch, w_opt, a_opt)
            self.log("search/arch_loss", loss_val)

    def on_validation_epoch_start(self):
        self._val_weights = self.supernet.weights_for(self.supernet.genotype())

    def validation_step(self, batch, batch_idx):
        """``val/acc`` of the derived architecture (the argmax op per edge), the network GDAS'
        weights were trained as: one op per edge, never the softmax mixture of all of them."""
        x, y = batch
        self.log_val_step(self.supernet(x, self._val_weights), y)

    def on_train_epoch_end(self):
        self.log("gdas/tau", self.tau())
        super().on_train_epoch_end()
