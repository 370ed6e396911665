"""DARTS bilevel search (Liu, Simonyan, Yang, "DARTS: Differentiable Architecture Search", ICLR 2019).

    min_alpha  L_val(w*(alpha), alpha)   s.t.   w*(alpha) = argmin_w L_train(w, alpha)

Each step: an architecture step on a validation batch, then a weight step on a training batch.
First order (``order=1``) takes grad_alpha L_val(w, alpha) at the current weights. Second order
(``order=2``) differentiates through one virtual SGD step w' = w - xi * grad_w L_train(w, alpha):

    grad_alpha L_val(w', alpha) - xi * grad^2_{alpha,w} L_train(w, alpha) . grad_w' L_val(w', alpha)

with the Hessian-vector product by central finite differences (eq. 8 of the paper), epsilon =
0.01 / ||grad_w' L_val||. Defaults are the paper's (CIFAR-10 search).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from oneshot.lightning_modules.base import SearchModule, all_reduce_mean
from torch.optim.lr_scheduler import CosineAnnealingLR

from oneshot.regularizers import make_regularizer


def _set_(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


@contextmanager
def frozen(params):
    """Parameters that take no gradient inside the block: autograd then skips every product
    that only they would need (in the weight step, one full-size multiply-and-sum per op)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def unrolled_arch_gradient(model, arch_params, weight_params, train_batch, val_batch, xi, momentum=0.0,
                           weight_decay=0.0, momentum_buffers=None, all_reduce=all_reduce_mean,
                           radius=0.01):  # fmt: skip
    """The second-order DARTS hypergradient for ``arch_params``, and the validation loss at w'.

    Weights are changed in place for the virtual step and the finite differences and restored
    bit-exactly from a copy at the end. ``all_reduce`` averages every gradient taken here across
    DDP ranks, so N processes with batch B/N follow the same path as one process with batch B.
    """
    (x_t, y_t), (x_v, y_v) = train_batch, val_batch
    backup = [w.detach().clone() for w in weight_params]

    # 1. Virtual step, exactly the weight optimiser's SGD update: w' = w - xi (m*buf + g + wd*w).
    g_train = all_reduce(torch.autograd.grad(F.cross_entropy(model(x_t), y_t), weight_params))
    with torch.no_grad():
        for k, (w, g) in enumerate(zip(weight_params, g_train)):
            step = g + weight_decay * w
            if momentum and momentum_buffers is not None and momentum_buffers[k] is not None:
                step = step + momentum * momentum_buffers[k]
            w.sub_(xi * step)

    # 2. grad_alpha L_val(w', alpha) and v = grad_w' L_val(w', alpha).
    loss_val = F.cross_entropy(model(x_v), y_v)
    grads = all_reduce(torch.autograd.grad(loss_val, list(arch_params) + list(weight_params)))
    d_alpha, v = grads[: len(arch_params)], grads[len(arch_params) :]

    # 3. Hessian-vector product grad^2_{alpha,w} L_train(w, alpha) . v by central differences
    #    around the original w (not w'), as in the paper.
    #    ``radius``: the perturbation's norm, the paper's 0.01 (tests shrink it below ReLU kinks).
    eps = radius / torch.cat([t.reshape(-1) for t in v]).norm()
    hvp_terms = []
    for sign in (1.0, -1.0):
        _set_(weight_params, [b + sign * eps * t for b, t in zip(backup, v)])
        loss = F.cross_entropy(model(x_t), y_t)
        hvp_terms.append(all_reduce(torch.autograd.grad(loss, arch_params)))
    _set_(weight_params, backup)
    hypergrad = [da - xi * (gp - gn) / (2 * eps) for da, gp, gn in zip(d_alpha, *hvp_terms)]
    return hypergrad, loss_val.detach()


class DartsSearch(SearchModule):
    def __init__(
        self,
        supernet: torch.nn.Module,
        w_optimizer: Callable = None,
        a_optimizer: Callable = None,
        order: int = 1,
        w_lr_min: float = 0.001,
        grad_clip: float = 5.0,
        warmup_epochs: int = 0,
        regularizer: str | None = None,
        regularizer_weight: float | None = None,
    ):
        super().__init__(supernet)
        if order not in (1, 2):
            raise ValueError(f"strategy.order must be 1 or 2, got {order!r}")
        if grad_clip is None or grad_clip < 0:  # torch clips by a negative norm by flipping every gradient's sign
            raise ValueError(f"strategy.grad_clip={grad_clip} is out of range; valid: a number >= 0 (0 = off)")
        self.order, self.w_lr_min, self.grad_clip, self.warmup_epochs = order, w_lr_min, grad_clip, warmup_epochs
        # A collapse guard (oneshot/regularizers.py), None when off: then every step below is DARTS' own.
        self.regularizer = make_regularizer(regularizer, regularizer_weight)
        if self.regularizer is not None and self.regularizer.name == "auxiliary_skip" and getattr(supernet, "betas", None):
            raise ValueError("strategy.regularizer=auxiliary_skip does not combine with PC-DARTS' edge normalisation "
                             "(space.supernet.partial_channels > 1); valid: space.supernet.edge_normalization=false")  # fmt: skip
        self.w_optimizer = w_optimizer or (lambda params: torch.optim.SGD(params, 0.025, 0.9, weight_decay=3e-4))
        self.a_optimizer = a_optimizer or (
            lambda params: torch.optim.Adam(params, 3e-4, betas=(0.5, 0.999), weight_decay=1e-3)
        )

    def configure_optimizers(self):
        w_opt = self.w_optimizer(params=self.supernet.weight_parameters())
        a_opt = self.a_optimizer(params=self.supernet.arch_parameters())
        # Cosine over the whole search, stepped per epoch; T_max from the trainer as DARTS does.
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        return [w_opt, a_opt], [CosineAnnealingLR(w_opt, T_max=epochs, eta_min=self.w_lr_min)]

    def sample_weights(self):
        """The per-edge weights of one supernet forward; ``None``: the supernet's own softmax of
        the alphas (DARTS). GDAS and DrNAS draw a sample here."""
        return None

    def mixing_weights(self):
        """``sample_weights``, with the auxiliary skip added when that regulariser is on."""
        weights = self.sample_weights()
        if self.regularizer is not None:
            weights = self.regularizer.mix(self.supernet, weights, self.current_epoch, self._max_epochs())
        return weights

    def arch_penalty(self):
        """What the architecture loss adds to the validation loss (``None``: nothing, DARTS)."""
        if self.regularizer is None:
            return None
        return self.regularizer.penalty(self.supernet.arch_parameters(), self.current_epoch, self._max_epochs())

    def _max_epochs(self):
        return self.trainer.max_epochs if self._trainer is not None else None

    def arch_step(self, train_batch, val_batch, w_opt, a_opt):
        a_opt.zero_grad()
        penalty = self.arch_penalty()
        if self.order == 1:
            x_v, y_v = val_batch
            loss_val = F.cross_entropy(self.supernet(x_v, self.mixing_weights()), y_v)
            # Only the alphas' gradient: autograd.grad skips every conv's weight gradient (a third
            # of this backward). It bypasses DDP's hooks, so the average over ranks is explicit.
            # The penalty depends on the alphas only, the same on every rank: added after the mean.
            arch = self.supernet.arch_parameters()
            grads = all_reduce_mean(torch.autograd.grad(loss_val, arch))
            if penalty is not None:
                grads = [g + p for g, p in zip(grads, torch.autograd.grad(penalty, arch, allow_unused=True,
                                                                          materialize_grads=True))]  # fmt: skip
            grads = self.budget_gradients(grads, loss_val)
            for a, g in zip(arch, grads):
                a.grad = g
        else:
            group = w_opt.param_groups[0]
            weights = self.supernet.weight_parameters()
            buffers = [w_opt.state.get(w, {}).get("momentum_buffer") for w in weights]
            mixing = self.regularizer is not None and self.regularizer.name == "auxiliary_skip"
            hypergrad, loss_val = unrolled_arch_gradient(
                (lambda x: self.supernet(x, self.mixing_weights())) if mixing else self.supernet,
                self.supernet.arch_parameters(), weights, train_batch, val_batch,
                xi=group["lr"], momentum=group.get("momentum", 0.0), weight_decay=group.get("weight_decay", 0.0),
                momentum_buffers=buffers,
            )  # fmt: skip
            if penalty is not None:
                arch = self.supernet.arch_parameters()
                extra = torch.autograd.grad(penalty, arch, allow_unused=True, materialize_grads=True)
                hypergrad = [g + p for g, p in zip(hypergrad, extra)]
            hypergrad = self.budget_gradients(hypergrad, loss_val)
            for a, g in zip(self.supernet.arch_parameters(), hypergrad):
                a.grad = g
        self.check_finite(loss_val, "validation loss of the architecture step")
        # The torch optimizer's own step, not LightningOptimizer's: that one advances global_step,
        # so trainer.max_steps would count both steps of a search step. (These gradients come from
        # autograd.grad, never loss-scaled, so skipping the precision plugin's unscale is right.)
        getattr(a_opt, "optimizer", a_opt).step()
        if self.budget is not None:  # dual ascent on the multiplier, from the cost before this step
            self.log("budget/expected", float(self._budget_expected))
            self.log("budget/multiplier", self.budget.step(self._budget_expected))
        return loss_val

    def budget_probs(self) -> dict:
        """The architecture distribution the budget's expected cost is taken under, with its
        gradient (DrNAS: its Dirichlet means)."""
        return self.arch_probs()

    def budget_gradients(self, grads, loss_val):
        """Issue 17: ``grads`` (of the validation loss) with the budget term's share added
        (oneshot/cost/budget.py); unchanged without a budget or while the term is inactive."""
        if self.budget is None:
            return grads
        expected = self.budget.expected(self)
        self._budget_expected = expected.detach()
        if self.budget.loss == "fbnet":  # its gradient carries the loss's value: the same on every DDP rank
            loss_val = all_reduce_mean([loss_val.detach().reshape(1)])[0].reshape(())
        factor, extra = self.budget.terms(expected, loss_val)
        if factor is not None:  # fbnet: CE * s differentiates to s dCE + CE ds
            grads = [factor * g for g in grads]
        if extra is not None:
            arch = self.supernet.arch_parameters()
            extra = torch.autograd.grad(extra, arch, allow_unused=True, materialize_grads=True)
            grads = [g + e for g, e in zip(grads, extra)]
        return grads

    def weight_step(self, train_batch, w_opt):
        x, y = train_batch
        w_opt.zero_grad()
        with frozen(self.supernet.arch_parameters()):  # this step needs no alpha gradient
            logits = self.supernet(x, self.mixing_weights())
        loss = F.cross_entropy(logits, y)
        self.check_finite(loss, "training loss")
        self.manual_backward(loss)
        w_opt.step()  # clips to grad_clip first (on_before_optimizer_step, base.py)
        return loss, logits

    def training_step(self, batch, batch_idx):
        w_opt, a_opt = self.optimizers()
        train_batch, val_batch = batch["train"], batch["val"]

        # 1. Architecture step on the validation batch (alphas frozen during warm-up).
        if self.current_epoch >= self.warmup_epochs:
            loss_val = self.arch_step(train_batch, val_batch, w_opt, a_opt)
            self.log("search/arch_loss", loss_val)

        # 2. Weight step on the training batch; gradients of the arch step are discarded.
        loss, logits = self.weight_step(train_batch, w_opt)
        self.log_train_step(loss, logits, train_batch[1])

    def on_train_epoch_end(self):
        self.lr_schedulers().step()
        self.log("search/w_lr", self.optimizers()[0].param_groups[0]["lr"])
        if self.budget is not None:  # the cost of what would be derived now, within budget
            self.log("budget/derived", self.budget.cost.of_genotype(self.budget.within_budget(self, self.derive_genotype())))
        self.log_architecture()
