"""Costs of architectures (issue 17): parameters, FLOPs and measured latency per candidate in its
place, the additive cost model, derivation within a budget and the budget penalty of the
differentiable strategies. See ``model.py`` (the cost model), ``probe.py`` (candidates in their
place), ``build.py`` (counting, timing, the cache), ``derive.py`` (the exact budgeted
derivation) and ``budget.py`` (the search-time penalty)."""

from oneshot.cost.build import MEASUREMENTS, METRICS, additive_error, build_cost_model, load_table
from oneshot.cost.derive import BudgetError, decision_groups, derive_within_budget, total_log_prob
from oneshot.cost.model import UNITS, CostModel, fits
from oneshot.cost.probe import network_of, probe_space

__all__ = ["MEASUREMENTS", "METRICS", "UNITS", "BudgetError", "CostModel", "additive_error", "build_cost_model",
           "decision_groups", "derive_within_budget", "fits", "load_table", "network_of", "probe_space",
           "total_log_prob"]  # fmt: skip
