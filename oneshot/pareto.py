"""The accuracy-vs-cost trade-off of a budget sweep (issue 17): ``oneshot-search -m
budget.max=a,b,c`` then ``oneshot-report MULTIRUN_DIR`` prints each run's cost and accuracy, marks
the non-dominated runs (no other run is at least as accurate at no more cost, and better in one)
and draws the front to ``pareto.png`` - also to W&B when the runs logged to W&B.

A run's cost is its ``report.json["cost"]``: parameters and FLOPs of the result, exact, and its
latency measured with the cost table's protocol (``oneshot.export.result_cost``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from matplotlib.figure import Figure

log = logging.getLogger("oneshot")

# metric -> (unit, the value in that unit from report.json's "cost")
METRICS = {
    "latency": ("ms", lambda c: c["latency"]["median_ms"]),
    "flops": ("MFLOPs", lambda c: c["flops"] / 1e6),
    "params": ("M params", lambda c: c["parameters"] / 1e6),
}


def cost_value(cost: dict | None, metric: str) -> float | None:
    """The run's cost in ``metric``'s unit; None when the run has no cost (an older run)."""
    try:
        value = METRICS[metric][1](cost)
    except (KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def non_dominated(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points (cost, accuracy) that no other point dominates: lower cost is
    better, higher accuracy is better; equal points do not dominate each other."""
    front = set()
    for i, (c, a) in enumerate(points):
        if not any(
            c2 <= c and a2 >= a and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
            if j != i
        ):
            front.add(i)
    return front


def pareto_figure(points: list[tuple[float, float]], labels: list[str], front: set[int], metric: str,
                  accuracy: str = "test accuracy") -> Figure:  # fmt: skip
    """Every run as a point, the non-dominated ones filled and joined as a step line."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot()
    others = [i for i in range(len(points)) if i not in front]
    if others:
        ax.scatter([points[i][0] for i in others], [points[i][1] for i in others], facecolors="none",
                   edgecolors="tab:gray", label="dominated")  # fmt: skip
    ordered = sorted(front, key=lambda i: points[i])
    ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], "o-", color="tab:red",
            drawstyle="steps-post", label="non-dominated")  # fmt: skip
    for i, label in enumerate(labels):
        ax.annotate(label, points[i], textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{metric} ({METRICS[metric][0]})")
    ax.set_ylabel(accuracy)
    ax.set_title(f"{accuracy} vs {metric}: {len(front)} of {len(points)} runs non-dominated")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def wandb_settings(configs: list[dict], base: Path) -> dict | None:
    """Where the runs logged to W&B (project, entity, group, mode), or None if none did. The
    group is the runs' own: ``logger.wandb.group``, else ``<name>-<sweep directory>`` as
    ``oneshot.lightning_modules.runs`` names a multirun's group."""
    for config in configs:
        entry = (
            (config.get("logger") or {}) if isinstance(config.get("logger"), dict) else {}
        ).get("wandb")
        if isinstance(entry, dict) and str(entry.get("_target_", "")).endswith("WandbLogger"):
            return {"project": entry.get("project") or "oneshot", "entity": entry.get("entity"),
                    "group": entry.get("group") or f"{config.get('name', 'search')}-{base.name}",
                    "mode": entry.get("mode") or "auto"}  # fmt: skip
    return None


def log_to_wandb(
    settings: dict, png: Path, columns: list[str], rows: list[list], out_dir: Path
) -> str:
    """A ``report`` run in the sweep's W&B group holding the figure and the table; returns its mode."""
    import wandb

    from oneshot.lightning_modules.runs import _wandb_mode

    mode, _ = _wandb_mode(settings["mode"])
    run = wandb.init(project=settings["project"], entity=settings["entity"], group=settings["group"],
                     job_type="report", name=f"{settings['group']}-pareto", mode=mode, dir=str(out_dir),
                     reinit="finish_previous")  # fmt: skip
    try:
        run.log(
            {
                "pareto/front": wandb.Image(str(png)),
                "pareto/runs": wandb.Table(columns=columns, data=rows),
            }
        )
    finally:
        run.finish()
    if mode == "offline":
        log.info("W&B run saved offline; upload it with: wandb sync %s", Path(run.dir).parent)
    return mode
