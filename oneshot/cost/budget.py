"""The budget of a differentiable search: ``E`` = the expected cost under the current
architecture distribution (``CostModel.expected``), ``B`` = ``budget.max``, ``r = E / B``, and a
multiplier ``lambda >= 0`` adapted by projected dual ascent after every architecture step,

    lambda <- max(0, lambda + dual_lr * (r - 1)),

so it grows while the search is over budget and decays back to 0 below it: the search is pushed
down to the budget, not far below it. ``lambda`` starts at ``budget.multiplier`` (0: no push until
the cost has been over budget). The term added to the architecture loss (``budget.loss``):

* ``hinge``: ``lambda * max(0, r - 1)`` - active only while over budget;
* ``proxyless``: ``lambda * r``, ProxylessNAS' linear expected-latency loss (Cai et al., ICLR
  2019, ``add#linear`` in their code); it acts while ``lambda > 0``, i.e. after the cost has been
  over budget and until the multiplier has decayed, so it ends a little below the budget;
* ``fbnet``: the multiplicative form of FBNet (Wu et al., CVPR 2019) and ProxylessNAS'
  ``mul#log``: ``CE * r ** lambda`` instead of ``CE`` while over budget, ``r`` in place of
  ``log E / log B`` so that any unit works (a budget below 1 ms or 1 M params has a negative log).

With ``lambda = 0`` or a cost under budget no term is computed at all, so a loose budget leaves the
search exactly as it is without one (same alphas, bit for bit).
"""

from __future__ import annotations

import logging

import torch

from oneshot.cost.derive import BudgetError, derive_within_budget, nb201_connected
from oneshot.cost.model import CostModel, fits

log = logging.getLogger("oneshot")
LOSSES = ("hinge", "proxyless", "fbnet")


class BudgetPenalty:
    def __init__(self, cost: CostModel, max: float, loss: str = "hinge", dual_lr: float = 0.1,
                 multiplier: float = 0.0):  # fmt: skip
        if loss not in LOSSES:
            raise ValueError(
                f"budget.loss={loss} is not a penalty form; valid: {', '.join(LOSSES)}"
            )
        if not max > 0:
            raise ValueError(f"budget.max={max} is out of range; valid: a number > 0 ({cost.unit})")
        cheapest = cost.cheapest()
        if not fits(cheapest, max):
            raise BudgetError(f"budget.max={max:g} {cost.unit} is below the cheapest architecture, "
                              f"{cheapest:.6g} {cost.unit}")  # fmt: skip
        self.cost, self.max, self.loss, self.dual_lr = cost, float(max), loss, float(dual_lr)
        self.multiplier = float(multiplier)
        self.metric = cost.metric

    def expected(self, module) -> torch.Tensor:
        """The expected cost under ``module``'s architecture distribution (differentiable)."""
        supernet = module.supernet
        edge = supernet.edge_weights() if getattr(supernet, "betas", None) else None
        probs = module.budget_probs() if hasattr(module, "budget_probs") else module.arch_probs()
        return self.cost.expected(probs, edge)

    def terms(self, expected: torch.Tensor, task_loss: torch.Tensor):
        """``(factor, extra)``: the architecture gradient is ``factor * grad(task loss) +
        grad(extra)`` (``factor`` None: 1); ``(None, None)`` while the term is inactive."""
        ratio = expected / self.max
        over = float(ratio.detach()) > 1.0
        lam = self.multiplier
        if lam == 0.0 or (self.loss != "proxyless" and not over):
            return None, None
        if self.loss == "hinge":
            return None, lam * (ratio - 1)
        if self.loss == "proxyless":
            return None, lam * ratio
        scale = ratio**lam  # fbnet: d(CE * s) = s dCE + CE ds
        return scale.detach(), task_loss.detach() * scale

    def step(self, expected) -> float:
        """Dual ascent on the multiplier after an architecture step (same on every DDP rank: the
        expected cost depends on the architecture parameters only)."""
        self.multiplier = max(
            0.0, self.multiplier + self.dual_lr * (float(expected) / self.max - 1.0)
        )
        return self.multiplier

    def sync_ranks(self) -> None:
        """DDP: every rank uses rank 0's cost table (each process measured its own, and timings
        differ), so every rank computes the same penalty and derives the same architecture."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            table = [self.cost.to_json()]
            dist.broadcast_object_list(table, src=0)
            self.cost = CostModel.from_json(table[0])

    def state_dict(self) -> dict:
        return {"multiplier": self.multiplier}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier = float(state["multiplier"])

    def fits(self, genotype) -> bool:
        """Whether the architecture's cost (the additive model) is within ``budget.max``."""
        return fits(self.cost.of_genotype(genotype), self.max)

    def acceptable(self, genotype) -> bool:
        """Within budget, and (NB201) a cell that connects its input to its output: the hinge
        pulls the alphas towards ``none``, the op that costs nothing, and a cell of ``none`` paths
        makes the whole network a constant."""
        if not self.fits(genotype):
            return False
        return self.cost.space != "nb201" or nb201_connected(genotype.edge_ops)

    def within_budget(self, module, genotype):
        """``genotype`` if it is acceptable, else the most probable architecture that is (exact)."""
        if self.acceptable(genotype):
            return genotype
        logits = {
            t: p.detach().double().clamp_min(1e-300).log() for t, p in module.arch_probs().items()
        }
        betas = getattr(module.supernet, "betas", None)
        edge_logits = {t: b.detach() for t, b in betas.items()} if betas else None
        return derive_within_budget(logits, self.cost, self.max, edge_logits=edge_logits)

    def enforce(self, module, genotype) -> tuple:
        """The final architecture within budget, and what ``report.json["budget"]`` says of it."""
        argmax_cost = self.cost.of_genotype(genotype)
        final = self.within_budget(module, genotype)
        report = {
            "metric": self.metric, "unit": self.cost.unit, "max": self.max, "loss": self.loss,
            "argmax_genotype": str(genotype), "argmax_cost": argmax_cost,
            "cost": self.cost.of_genotype(final), "rederived": final != genotype,
            "cheapest": self.cost.cheapest(), "multiplier": self.multiplier,
            "table": {k: self.cost.meta.get(k) for k in ("cache", "cache_file", "device_name", "batch_size")
                      if k in self.cost.meta},
        }  # fmt: skip
        if final != genotype and not fits(argmax_cost, self.max):
            report["reason"] = "over budget"
            log.info("the argmax architecture costs %.4g %s > budget.max=%g: derived within budget instead "
                     "(%.4g %s)", argmax_cost, self.cost.unit, self.max, report["cost"], self.cost.unit)  # fmt: skip
        elif final != genotype:
            report["reason"] = "no path from input to output"
            log.info("the argmax cell %s has no path of non-'none' ops from its input to its output (the "
                     "network would be a constant): derived the most probable connected cell within budget "
                     "instead, %s (%.4g %s)", genotype, final, report["cost"], self.cost.unit)  # fmt: skip
        return final, report


def cost_model_from_cfg(cfg, supernet, info, metric: str | None = None) -> CostModel:
    """The cost model a run's config asks for (``cost.*``, ``space.network``, the data's shape)."""
    from omegaconf import OmegaConf

    from oneshot.cost.build import build_cost_model

    cost = OmegaConf.to_container(cfg.cost, resolve=True) if cfg.get("cost") is not None else {}
    network = (
        OmegaConf.to_container(cfg.space.network, resolve=True) if "network" in cfg.space else {}
    )
    return build_cost_model(
        supernet, metric or cfg.budget.metric, input_shape=(info.in_channels, info.image_size, info.image_size),
        network=network, num_classes=info.num_classes, device=cost.get("device", "cpu"),
        batch_size=cost.get("batch_size", 1), threads=cost.get("threads"), table=cost.get("table"),
        cache_dir=cost.get("cache_dir"), warmup=cost.get("warmup", 10), repeats=cost.get("repeats", 50),
        progress=bool(cost.get("progress", True)),
        calibrate=int(cost.get("calibrate", 0) or 0),
    )  # fmt: skip


def budget_from_cfg(cfg, supernet, info) -> BudgetPenalty | None:
    """``None`` without a budget (``budget.max: null``); else the penalty, its cost model built
    (a budget no architecture meets is refused here, before any training)."""
    budget = cfg.get("budget")
    if budget is None or budget.get("max") is None:
        return None
    cost = cost_model_from_cfg(cfg, supernet, info)
    return BudgetPenalty(cost, budget.max, loss=budget.get("loss", "hinge"), dual_lr=budget.get("dual_lr", 0.1),
                         multiplier=budget.get("multiplier", 0.0))  # fmt: skip
