"""ENAS search (Pham, Guan, Zoph, Le, Dean, "Efficient Neural Architecture Search via Parameter
Sharing", ICML 2018).

Two players share one supernet. The controller, an LSTM policy pi(m; theta), samples an
architecture m; the shared weights w train on the sampled path only. Per training batch:

    weight step      m ~ pi (no gradient);  w <- SGD step on CE(supernet(x_train; m, w), y_train)
    controller step  m ~ pi;  R = acc(supernet(x_val; m, w), y_val)  (no gradient into w);
                     theta <- Adam step on -(R - b) log pi(m) - beta H(pi),  b a moving average of R

After the search ENAS samples architectures from the trained policy, scores each on one held-out
minibatch with the shared weights and keeps the best (``derive_genotype``).

Two deliberate differences from the authors' code (github.com/melodyguan/enas): it alternates
whole phases (an epoch of weight steps, then 300 controller steps); here the two steps interleave
per batch, as DARTS-style bilevel search does (``controller_every`` / ``controller_steps_per_batch``
change the ratio). And its L2 term sits in the loss, so *every* shared weight decays each step;
here only the sampled path's weights get a gradient, and torch's SGD skips parameters whose
``grad is None`` (no decay, no momentum), so an op's weights change only when it is sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.base import SearchModule, all_reduce_mean, epoch_summary, info
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics.functional.classification import multiclass_accuracy

from oneshot.controller import Controller, Reinforce
from oneshot.spaces.darts import cell_edges

# Streams of random draws, so a weight sample never reuses a controller sample's randomness.
_WEIGHT_STREAM, _CONTROLLER_STREAM, _DERIVE_STREAM = 0, 1, 2


@contextmanager
def batch_statistics(module: nn.Module):
    """Score architectures with BatchNorm on the batch's own statistics, leaving the running ones
    untouched. ENAS does this (``build_valid_rl`` runs the child with ``is_training=True``): the
    running statistics average over every architecture sampled so far and fit none of them.
    Leaving them untouched keeps scoring a pure read of the supernet."""
    bns = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    was_training = module.training
    module.train()
    for bn in bns:  # in train mode without tracking, BN normalises by the batch and updates nothing
        bn.track_running_stats = False
    try:
        with torch.no_grad():
            yield
    finally:
        for bn in bns:
            bn.track_running_stats = True
        module.train(was_training)


class EnasSearch(SearchModule):
    """ENAS on any supernet ``Controller.for_supernet`` knows (NB201, DARTS). The controller and
    the REINFORCE baseline are submodules: checkpoints hold them, DDP syncs the controller.

    ``seed`` (the run's seed in the config) seeds every architecture draw together with the
    global step, so all DDP ranks draw the same architecture and a resumed run redraws the same.
    ``derive_samples=0`` derives the controller's most likely architecture instead of the best of
    sampled ones."""

    def __init__(
        self,
        supernet: nn.Module,
        w_optimizer: Callable = None,
        c_optimizer: Callable = None,
        controller_kwargs: dict | None = None,
        reinforce_kwargs: dict | None = None,
        w_lr_min: float = 5e-4,
        grad_clip: float = 5.0,
        warmup_epochs: int = 0,
        controller_every: int = 1,
        controller_steps_per_batch: int = 1,
        derive_samples: int = 100,
        derive_batches: int = 1,
        seed: int = 0,
        budget_reward: str = "hard",
        tunas_beta: float = -0.07,
    ):
        super().__init__(supernet)
        if budget_reward not in ("hard", "tunas") or not tunas_beta < 0:
            raise ValueError(f"budget.reward={budget_reward} / strategy.tunas_beta={tunas_beta}: valid: hard or tunas, "
                             "and a beta < 0 (TuNAS: -0.07)")  # fmt: skip
        self.budget_reward, self.tunas_beta = budget_reward, tunas_beta
        if controller_every < 1 or controller_steps_per_batch < 1:
            raise ValueError(
                f"strategy.controller_every ({controller_every}) and strategy.controller_steps_per_batch "
                f"({controller_steps_per_batch}) must be >= 1; freeze the controller with warmup_epochs"
            )
        # Checked here, not after the whole search where derive_genotype would meet them.
        if derive_samples < 0 or derive_batches < 1:
            key, value = ("derive_samples", derive_samples) if derive_samples < 0 else ("derive_batches", derive_batches)
            valid = "an integer >= 0 (0 = the most likely architecture)" if key == "derive_samples" else "an integer >= 1"
            raise ValueError(f"strategy.{key}={value} is out of range; valid: {valid}")
        if grad_clip is None or grad_clip < 0:
            raise ValueError(f"strategy.grad_clip={grad_clip} is out of range; valid: a number >= 0 (0 = off)")
        self.controller = Controller.for_supernet(supernet, **(controller_kwargs or {}))
        self.reinforce = Reinforce(**(reinforce_kwargs or {}))
        self.w_lr_min, self.grad_clip, self.warmup_epochs = w_lr_min, grad_clip, warmup_epochs
        self.controller_every = controller_every
        self.controller_steps_per_batch = controller_steps_per_batch
        self.derive_samples, self.derive_batches, self.seed = derive_samples, derive_batches, seed
        # ENAS' shared weights: Nesterov SGD, lr 0.05 -> 5e-4 cosine, wd 1e-4; controller: Adam lr
        # 3.5e-4 (the paper), beta1 = 0 and eps 1e-3 (the authors' src/utils.py).
        self.w_optimizer = w_optimizer or (
            lambda params: torch.optim.SGD(
                params, 0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
            )
        )
        self.c_optimizer = c_optimizer or (
            lambda params: torch.optim.Adam(params, 3.5e-4, betas=(0.0, 0.999), eps=1e-3)
        )
        self.derived: dict = {}
        self._last_sampled = None

    def configure_optimizers(self):
        w_opt = self.w_optimizer(params=self.supernet.weight_parameters())
        c_opt = self.c_optimizer(params=list(self.controller.parameters()))
        # One cosine over the search, stepped per epoch, as darts.py (ENAS restarts it: SGDR 10, x2).
        epochs = max(1, self.trainer.max_epochs or 1) if self._trainer is not None else 1
        return [w_opt, c_opt], [CosineAnnealingLR(w_opt, T_max=epochs, eta_min=self.w_lr_min)]

    def generator(self, *stream: int) -> torch.Generator:
        """A CPU generator for one draw, seeded by (run seed, *stream): equal on every rank."""
        state = np.random.SeedSequence([self.seed % 2**63, *stream]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def weight_step(self, batch, weights: dict, w_opt) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on the shared weights of the architecture ``weights`` selects; returns the
        loss and the logits. Only the
        chosen ops run, so only their parameters get a gradient; ``zero_grad`` leaves the rest at
        ``None`` and SGD skips them. Under DDP every rank ran the same path, so the unused
        parameters are unused on all ranks and DDP leaves their ``grad`` at ``None`` too."""
        x, y = batch
        w_opt.zero_grad()  # set_to_none: last step's path must not leak momentum or decay into this one
        logits = self.supernet(x, weights)
        loss = F.cross_entropy(logits, y)
        self.check_finite(loss, "training loss")
        self.manual_backward(loss)  # DDP averages the path's gradients over ranks here
        w_opt.step()  # clips to grad_clip first (on_before_optimizer_step, base.py)
        return loss.detach(), logits.detach()

    def batch_accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One batch's top-1 accuracy (a fraction): the reward. A function of the batch, not an
        epoch metric, so torchmetrics' functional form (no state to accumulate or reset)."""
        return multiclass_accuracy(logits, y, self.num_classes, average="micro", validate_args=False)

    def controller_step(self, batch, c_opt, generator: torch.Generator):
        """One REINFORCE step on a validation batch; returns the sample and its reward. No
        gradient reaches the supernet, and BN uses batch statistics (see ``batch_statistics``)."""
        x, y = batch
        sample = self.controller.sample(generator)
        with batch_statistics(self.supernet):
            reward = self.batch_accuracy(self.supernet(x, sample.weights), y)
        # Each rank scored its own shard of the validation batch: the mean is the whole batch's
        # reward, and the same number on every rank, so all ranks move the baseline alike and the
        # loss (same sample, same reward) is identical everywhere.
        (reward,) = all_reduce_mean([reward])
        reward = self.budgeted_reward(reward, sample.genotype)  # issue 17: the same on every rank
        loss = self.reinforce.loss(sample, reward)
        c_opt.zero_grad()
        # manual_backward, not loss.backward(): under DDP each backward must be announced to its
        # reducer (Lightning's prepare_for_backward). The supernet's parameters are unused in this
        # graph (find_unused_parameters=True in runs.py), so their grads stay as they are; the
        # controller's gradients are averaged, a no-op as every rank computed the same ones.
        self.manual_backward(loss)
        # Through the strategy (which unscales 16-mixed gradients) but not LightningOptimizer.step,
        # which advances global_step: trainer.max_steps then counts search steps, not controller steps.
        if hasattr(c_opt, "optimizer") and self._trainer is not None:
            self.trainer.strategy.optimizer_step(c_opt.optimizer, closure=lambda: None)
        else:
            c_opt.step()
        return sample, reward

    def budgeted_reward(self, reward: torch.Tensor, genotype) -> torch.Tensor:
        """Issue 17: the reward of a sample under the budget (``self.budget``, set by the
        pipeline; none: unchanged). ``hard``: an over-budget sample earns 0, the reward of a
        network that classifies nothing, so the controller learns to avoid the region; the
        baseline, a moving average of rewards, falls while the policy samples there, so the
        first feasible samples get large advantages. A sample within budget keeps its accuracy,
        so a budget the policy never exceeds changes nothing. ``tunas``: TuNAS' absolute reward
        (Bender et al., CVPR 2020), ``acc + beta * |cost / budget - 1|`` with ``beta < 0``: it
        pulls the cost to the budget from both sides, so it acts under any budget."""
        if self.budget is None:
            return reward
        cost = self.budget.cost.of_genotype(genotype)
        self._sample_cost = cost
        if self.budget_reward == "tunas":
            return reward + self.tunas_beta * abs(cost / self.budget.max - 1.0)
        return reward if self.budget.fits(genotype) else torch.zeros_like(reward)

    def training_step(self, batch, batch_idx):
        w_opt, c_opt = self.optimizers()
        # The step is the same on every rank and restored on resume: it seeds this batch's draws.
        step = self.global_step

        # 1. Weight step on the training batch, along one architecture from the current policy.
        with torch.no_grad():
            sample = self.controller.sample(self.generator(_WEIGHT_STREAM, step))
        loss, logits = self.weight_step(batch["train"], sample.weights, w_opt)
        self._last_sampled = sample.genotype
        self.log_train_step(loss, logits, batch["train"][1])

        # 2. Controller step(s) on the validation batch. During warm-up the policy stays frozen at
        #    its initialisation, every choice within ~5% of uniform (temperature 5, U(-0.1, 0.1)).
        if self.current_epoch < self.warmup_epochs or batch_idx % self.controller_every:
            return
        for k in range(self.controller_steps_per_batch):
            sample, reward = self.controller_step(
                batch["val"], c_opt, self.generator(_CONTROLLER_STREAM, step, k)
            )
        self.log("enas/reward", reward, prog_bar=True)
        self.log("enas/epoch_reward", reward, on_step=False, on_epoch=True)
        self.log("enas/baseline", self.reinforce.baseline.clone())
        self.log("enas/entropy", sample.entropy.detach())
        if self.budget is not None:
            self.log("budget/sample_cost", float(self._sample_cost))

    def on_validation_epoch_start(self):
        self._val_arch = self.controller.most_likely()

    def validation_step(self, batch, batch_idx):
        """``val/acc``: the policy's most likely architecture on the held-out architecture split
        (the base class would run the supernet's unused alphas)."""
        x, y = batch
        with batch_statistics(self.supernet):
            logits = self.supernet(x, self._val_arch.weights)
        self.log_val_step(logits, y)

    def on_train_epoch_end(self):
        self.lr_schedulers().step()
        self.log("search/w_lr", self.optimizers()[0].param_groups[0]["lr"])
        self.log_architecture()

    def log_architecture(self) -> None:
        """The policy's greedy path: ``prob/<decision>`` (the probability of its choice), the mean
        entropy per decision (``arch/entropy``), and its genotype appended to ``genotypes``."""
        greedy = self.controller.most_likely()
        for d in greedy.decisions:
            self.log(f"prob/{d.name}", float(torch.softmax(d.logits, -1)[d.choice]))
        for t, rows in self.architecture_probs(greedy).items():  # the heatmaps' source (plots.py)
            for row, probs in rows:
                for op, p in probs.items():
                    self.log(f"policy/{t}/{row}/{op}", p)
        self.log("arch/entropy", float(greedy.entropy) / len(greedy.decisions))
        self.genotypes.append(str(greedy.genotype))
        summary = epoch_summary(self)
        info(f"epoch {self.current_epoch}: {summary + ', ' if summary else ''}most likely genotype "
             f"{greedy.genotype}, last sampled {self._last_sampled}")  # fmt: skip

    def architecture_probs(self, greedy=None) -> dict[str, list[tuple[str, dict[str, float]]]]:
        """The policy's most likely path, per op decision (NB201: an edge, ``2<-1``; DARTS: a
        node's first or second op, ``3/op0``, on the input the path chose): each candidate op's
        probability. ENAS' counterpart of the softmaxed alphas, drawn as the same heatmap."""
        greedy = greedy or self.controller.most_likely()
        out: dict[str, list] = {}
        inputs, edges = {}, cell_edges(self.controller.steps) if self.controller.space == "darts" else None
        for d in greedy.decisions:
            t, rest = d.name.split("/", 1)
            if edges is None:  # NB201: one op decision per edge, in the supernet's edge order
                e, row = len(out.get(t, [])), rest.removesuffix("/op")
            else:
                node, slot = rest.split("/")
                if slot.startswith("input"):
                    inputs[(t, node, slot[5:])] = d.choice
                    continue
                e, row = edges.index((int(node), inputs[(t, node, slot[2:])])), rest
            probs = torch.softmax(d.logits.detach().float(), -1).cpu().tolist()
            out.setdefault(t, []).append((row, dict(zip(self.supernet.candidates[t][e], probs))))
        return out

    def arch_probs(self) -> dict[str, torch.Tensor]:
        """Per cell type, ``[n_edges, n_ops]`` op probabilities along the policy's most likely path:
        what a budgeted derivation ranks architectures by when no sampled one fits (the supernet's
        own alphas are never trained by ENAS). An edge that path does not use (DARTS: inputs not
        chosen) gets the uniform row, so a budget can still reach it, behind the chosen ones."""
        greedy = self.controller.most_likely()
        probs = {
            t: torch.full((len(c), len(c[0])), 1.0 / len(c[0])) for t, c in self.supernet.candidates.items()
        }
        inputs, edges = {}, cell_edges(self.controller.steps) if self.controller.space == "darts" else None
        seen: dict[str, int] = {}
        for d in greedy.decisions:
            t, rest = d.name.rsplit("/", 1) if self.controller.space == "model" else d.name.split("/", 1)
            if edges is None:  # NB201 and model spaces: one op decision per edge, in edge order
                e = seen[t] = seen.get(t, -1) + 1
            else:
                node, slot = rest.split("/")
                if slot.startswith("input"):
                    inputs[(t, node, slot[5:])] = d.choice
                    continue
                e = edges.index((int(node), inputs[(t, node, slot[2:])]))
            probs[t][e] = torch.softmax(d.logits.detach().double().cpu(), -1).to(probs[t].dtype)
        return probs

    def current_genotype(self):
        return self.controller.most_likely().genotype

    def score(self, weights: dict, batches) -> float:
        """Accuracy of the architecture ``weights`` over ``batches`` with the shared weights."""
        with batch_statistics(self.supernet):
            hits = sum(int((self.supernet(x, weights).argmax(-1) == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)

    def derive_genotype(self, batches=None):
        """ENAS' derivation: draw ``derive_samples`` architectures from the policy, score each
        (each distinct one once) on the same ``derive_batches`` held-out batches (the datamodule's
        ``val_dataloader``, not shuffled), keep the best; ties go to the more probable. Seeded and
        run on identical data, so every DDP rank derives the same genotype. Without a trainer
        (or batches), or with ``derive_samples=0``: the most likely architecture."""
        most_likely = self.controller.most_likely()
        if batches is None and self._trainer is not None and self.trainer.datamodule is not None:
            batches = list(islice(self.trainer.datamodule.val_dataloader(), self.derive_batches))
        self.derived = {
            "most_likely": str(most_likely.genotype),
            "best_sampled": None,
            "scores": {},
        }
        info(f"ENAS most likely genotype: {most_likely.genotype}")
        if not batches or not self.derive_samples:
            return most_likely.genotype
        device = next(self.supernet.parameters()).device
        batches = [(x.to(device), y.to(device)) for x, y in batches]
        generator = self.generator(_DERIVE_STREAM)
        with torch.no_grad():
            samples = [self.controller.sample(generator) for _ in range(self.derive_samples)]
        candidates = {str(s.genotype): s for s in samples}  # each distinct genotype once
        if self.budget is not None:  # issue 17: only samples within budget (none: the pipeline re-derives)
            fitting = {g: s for g, s in candidates.items() if self.budget.fits(s.genotype)}
            self.derived["over_budget"] = len(candidates) - len(fitting)
            candidates = fitting or candidates
        scores = {g: self.score(s.weights, batches) for g, s in candidates.items()}
        best = max(candidates, key=lambda g: (scores[g], float(candidates[g].log_prob)))
        self.derived.update(best_sampled=best, scores=scores)
        n, distinct = self.derive_samples, len(candidates)
        info(
            f"ENAS best of {n} samples ({distinct} distinct): {best}, acc {scores[best]:.4f}"
        )
        return candidates[best].genotype
