"""Ensembles of training-free metrics: the sum of per-metric ranks (TE-NAS' rule, generalised).

TE-NAS (Chen, Gong, Wang, ICLR 2021) ranks candidates by the NTK condition number and by the
number of linear regions separately and adds the two ranks; any set of metrics combines the
same way, each ranked in its own direction (``HIGHER_IS_BETTER``). Ranks are dense, as TE-NAS'
``prune_func_rank``: equal values share a rank and the next distinct value gets the next one.
Non-finite and NaN scores (a singular kernel, an undefined correlation) rank as the worst.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from oneshot.metrics.proxies import HIGHER_IS_BETTER


def _key(value: float, higher_is_better: bool) -> float:
    """Goodness: larger is better; NaN becomes the worst possible value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -math.inf
    return value if higher_is_better else -value


def dense_goodness_ranks(values: Sequence[float], higher_is_better: bool) -> list[int]:
    """Dense ranks from 0 (worst) upwards: a better value gets a larger rank, ties share one."""
    keys = [_key(v, higher_is_better) for v in values]
    distinct = sorted(set(keys))
    index = {k: i for i, k in enumerate(distinct)}
    return [index[k] for k in keys]


def direction(metric: str) -> bool:
    """Whether ``metric`` is higher-is-better; a clear error for an unknown name."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(
            f"unknown metric {metric!r}; valid: {', '.join(sorted(HIGHER_IS_BETTER))}"
        )
    return HIGHER_IS_BETTER[metric]


def rank_sum(scores: Mapping[str, Sequence[float]], metrics: Sequence[str] | None = None) -> list[int]:
    """Each candidate's sum over ``metrics`` (default: all in ``scores``) of its dense rank
    under that metric, larger = better: the ensemble's score."""
    metrics = list(metrics or scores)
    if not metrics:
        raise ValueError("an ensemble needs at least one metric")
    lengths = {len(scores[m]) for m in metrics}
    if len(lengths) != 1:
        raise ValueError(f"every metric must score the same candidates; got lengths {sorted(lengths)}")
    total = [0] * lengths.pop()
    for m in metrics:
        for i, r in enumerate(dense_goodness_ranks(scores[m], direction(m))):
            total[i] += r
    return total


def best_by_rank_sum(scores: Mapping[str, Sequence[float]], metrics: Sequence[str] | None = None) -> int:
    """The index of the candidate with the largest rank sum; ties go to the better value of the
    first metric, then to the earlier candidate."""
    metrics = list(metrics or scores)
    total = rank_sum(scores, metrics)
    first = metrics[0]
    higher = direction(first)
    return max(range(len(total)), key=lambda i: (total[i], _key(scores[first][i], higher), -i))
