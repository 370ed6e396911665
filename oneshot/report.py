"""``oneshot-report DIR...``: the runs under some directories (single runs, ``-m`` multirun
directories, or folders holding either) as one table, then the test accuracy's mean ± std over
the runs that differ only by their seed: how much a result depends on its seed. Runs that report a
cost (issue 17: ``oneshot-search -m budget.max=a,b,c``) get a cost-and-accuracy table too, with the
non-dominated runs marked and the front drawn to ``DIR/pareto.png`` (and to W&B, where the runs
logged to it; ``oneshot.pareto``).

Runs are compared like with like: they are grouped by every config value that differs between
them (strategy, space, data, warm start, sizes, learning rates, ...), read from each run's
``config.yaml``, not only by strategy and space. Accuracies are fractions (0..1), as the apps
print them and ``report.json`` holds them.

A run is a directory holding ``report.json`` and ``config.yaml`` (what ``oneshot-search`` and
``oneshot-retrain`` write); a search's ``retrain/`` subfolder belongs to its search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Config values that say where or how a run reports, not what it computes: never a reason to
# put two runs in different groups. (The seed is what a group's spread is taken over.)
NOT_A_SETTING = (
    "seed", "name", "run_dir", "ckpt_path", "objective", "logger", "callbacks", "hparams_search",
    "space.presets", "data.root", "data.download", "data.num_workers", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.log_every_n_steps", "warmstart.progress", "strategy.progress",
    "retrain.export", "cost.progress", "cost.cache_dir",  # issue 17: what is written or shown, not computed
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    path: Path
    seed: int | None
    strategy: str
    space: str
    genotype: str
    test_acc: float | None
    config: dict = field(default_factory=dict, compare=False)  # flattened: "data.name" -> "digits"
    data: str = "?"
    sizes: str = "?"
    benchmark: dict = field(default_factory=dict, compare=False)  # issue 18: the final cell's benchmark accuracies
    cost: dict = field(default_factory=dict, compare=False)  # issue 17: report.json "cost" (oneshot.export.result_cost)


def find_runs(dirs) -> list[Run]:
    """Every run at or under ``dirs``, in path order; a directory without any is an error."""
    runs = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise ValueError(f"{d} is not a directory")
        found = sorted(
            {p.parent for p in d.rglob("report.json") if (p.parent / "config.yaml").is_file()}
        )
        if not found:
            raise ValueError(
                f"no runs under {d}: a run directory holds report.json and config.yaml "
                "(give oneshot-search/oneshot-retrain output or multirun directories)"
            )
        runs += [read_run(p) for p in found]
    return runs


def read_mapping(path: Path, parse) -> dict:
    """A run file that must hold a mapping; anything else is a ValueError naming the file."""
    try:
        data = parse(path.read_text())
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a run file") from None
    except (ValueError, yaml.YAMLError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid {path.suffix[1:].upper()}: {str(e).splitlines()[0][:120]}") from None
    if path.suffix == ".yaml" and data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of keys to values, holds a {type(data).__name__}")
    return data


def _field(path: Path, data: dict, key: str, kinds, default=None):
    value = data.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        kind = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise ValueError(f"{path}: {key}={value!r:.60} is not a {kind}")
    return value


def flatten(node, prefix: str = "") -> dict[str, str]:
    """``{"data": {"name": "digits"}}`` -> ``{"data.name": "digits"}``; leaves as YAML text."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()}


def _sizes(config: dict, report: dict) -> str:
    """The searched supernet's and the retrained network's sizes, e.g. ``C=4 N=1 -> C=16 N=1``."""
    def kv(d):
        return " ".join(f"{k}={v}" for k, v in (d or {}).items() if not str(k).startswith("_") and v is not None)

    space = config.get("space") if isinstance(config.get("space"), dict) else {}
    supernet = kv(space.get("supernet")) if space.get("supernet") else ""
    retrain = report.get("retrain") if isinstance(report.get("retrain"), dict) else {}
    network = kv(retrain.get("network")) if isinstance(retrain.get("network"), dict) else ""
    return " -> ".join(p for p in (supernet, network) if p) or "-"


def read_run(path: Path) -> Run:
    report = read_mapping(path / "report.json", json.loads)
    config = read_mapping(path / "config.yaml", yaml.safe_load)
    strategy = _field(path / "report.json", report, "strategy", str) or "retrain"  # oneshot-retrain: no search
    strategy_cfg = config.get("strategy") if isinstance(config.get("strategy"), dict) else {}
    if strategy_cfg.get("order") == 2:
        strategy += " (2nd order)"
    retrain = _field(path / "report.json", report, "retrain", dict) or {}
    test_acc = _field(path / "report.json", retrain, "test_acc", (int, float))
    genotype = _field(path / "report.json", report, "genotype", str)
    if genotype is None:
        raise ValueError(f"{path / 'report.json'} has no genotype: not a report oneshot wrote")
    seed = _field(path / "config.yaml", config, "seed", int)
    space = _field(path / "report.json", report, "space", str, "?")
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    bench = report.get("benchmark") if isinstance(report.get("benchmark"), dict) else {}  # issue 18
    bench = {k: v for k, v in bench.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    cost = report.get("cost") if isinstance(report.get("cost"), dict) else {}  # issue 17
    return Run(path, seed, strategy, space, genotype, test_acc, flatten(config), str(data.get("name", "?")),
               _sizes(config, report), bench, cost)  # fmt: skip


def setting_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs that have them, in config order: what sets
    runs apart besides the seed. A key only some runs have (another strategy's option) follows
    from a key that differs; values equal to the run's own seed (``warmstart.seed: ${seed}``)
    are the seed."""
    keys = {}
    for r in runs:
        for k in r.config:
            keys.setdefault(k, None)
    differing = []
    for k in keys:
        if any(k == n or k.startswith(n + ".") for n in NOT_A_SETTING) or k.rsplit(".", 1)[-1] == "_partial_":
            continue
        have = [r for r in runs if k in r.config]
        if all(r.config[k] == str(r.seed) for r in have):
            continue
        if len({r.config[k] for r in have}) > 1:
            differing.append(k)
    return differing


def _setting(run: Run, keys: list[str]) -> tuple[str, ...]:
    return (run.strategy, run.space, *(run.config.get(k, "-") for k in keys))


def summarise(runs: list[Run]) -> list[tuple[tuple[str, ...], int, float | None, float | None]]:
    """``(setting, runs with an accuracy, mean, std)`` per group of runs that differ only by
    their seed; a setting is (strategy, space, *values of ``setting_keys``). std over seeds
    (n-1), None for a group of one."""
    keys = setting_keys(runs)
    groups: dict[tuple[str, ...], list[float | None]] = {}
    for r in runs:
        groups.setdefault(_setting(r, keys), []).append(r.test_acc)
    rows = []
    for setting, accs in sorted(groups.items()):
        accs = [a for a in accs if a is not None]
        mean = statistics.fmean(accs) if accs else None
        std = statistics.stdev(accs) if len(accs) > 1 else None
        rows.append((setting, len(accs), mean, std))
    return rows


def _acc(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def render(runs: list[Run], console) -> None:
    from rich.table import Table

    # Runs named relative to their common folder (a multirun's: 0, 1, ...), shown in the title.
    paths = [r.path.resolve() for r in runs]
    base = Path(os.path.commonpath(paths))
    base = base.parent if len(paths) == 1 else base
    table = Table(title=f"runs under {base}")
    benchmark = any(r.benchmark for r in runs)  # issue 18: benchmark=nb201 runs
    for col in ("run", "seed", "strategy", "space", "data", "sizes", "genotype", "test acc", *(["benchmark"] if benchmark else [])):
        table.add_column(col, no_wrap=col == "genotype")
    for r, path in zip(runs, paths):
        bench = [", ".join(f"{k} {v:.2f}" for k, v in r.benchmark.items()) or "-"] if benchmark else []
        table.add_row(
            str(path.relative_to(base)), str(r.seed), r.strategy, r.space, r.data, r.sizes, r.genotype,
            _acc(r.test_acc), *bench,
        )  # fmt: skip
    console.print(table)
    keys = setting_keys(runs)
    summary = Table(title="test accuracy (0..1) over seeds, per setting")
    for col in ("strategy", "space", *keys, "n", "mean ± std"):
        summary.add_column(col)
    for setting, n, mean, std in summarise(runs):
        cell = _acc(mean) if std is None else f"{mean:.4f} ± {std:.4f}"  # a group of one has no spread
        summary.add_row(*setting, str(n), cell)
    console.print(summary)


# ---- issue 17: accuracy vs cost (oneshot/pareto.py) ----------------------------------------------


def cost_metric(runs: list[Run]) -> str:
    """The metric the runs were budgeted in, when they agree; else latency."""
    metrics = {r.cost["budget"]["metric"] for r in runs if isinstance(r.cost.get("budget"), dict)}
    return metrics.pop() if len(metrics) == 1 else "latency"


def tradeoff(runs: list[Run], metric: str) -> tuple[list[tuple[float, float]], list[int], set[int]]:
    """``(points, indices, front)``: (cost, test accuracy) of the runs that have both, their
    indices in ``runs``, and which of the points are non-dominated."""
    from oneshot.pareto import cost_value, non_dominated

    points, indices = [], []
    for i, r in enumerate(runs):
        cost = cost_value(r.cost, metric)
        if cost is not None and r.test_acc is not None:
            points.append((cost, float(r.test_acc)))
            indices.append(i)
    return points, indices, non_dominated(points)


def render_tradeoff(runs: list[Run], console, metric: str, pareto_png: Path | None) -> list | None:
    """The cost table (every run; one without a cost or accuracy shows dashes) and, for two or
    more runs with both, ``pareto_png``. Returns ``[columns, rows]`` when it drew the figure
    (what W&B gets), else None."""
    from rich.table import Table

    from oneshot.pareto import METRICS, cost_value, pareto_figure

    if not any(r.cost for r in runs):
        return None
    points, indices, front = tradeoff(runs, metric)
    on_front = {indices[k] for k in front}
    base = _base(runs)
    columns = ["run", "budget", "params (M)", "MFLOPs", "latency (ms)", "test acc", "non-dominated"]
    table = Table(title=f"cost and accuracy (front by {metric}, {METRICS[metric][0]})")
    for col in columns:
        table.add_column(col)
    rows = []
    for i, r in enumerate(runs):
        values = [cost_value(r.cost, m) for m in ("params", "flops", "latency")]
        row = [str(r.path.resolve().relative_to(base)), _budget(r.cost.get("budget")),
               *("-" if v is None else f"{v:.4g}" for v in values), _acc(r.test_acc),
               "*" if i in on_front else ""]  # fmt: skip
        rows.append(row)
        table.add_row(*row)
    console.print(table)
    if len(points) < 2:
        console.print(f"no pareto figure: {len(points)} run(s) with both a cost and a test accuracy (needs 2)")
        return None
    if pareto_png is None:
        return None
    from oneshot.plots import save_figure

    labels = [rows[i][0] for i in indices]
    save_figure(pareto_figure(points, labels, front, metric), pareto_png)
    console.print(f"pareto front: {len(front)} of {len(points)} runs non-dominated; figure: {pareto_png}")
    return [columns, rows]


def _budget(b) -> str:
    try:
        return f"{b['metric']} <= {float(b['max']):g} {b['unit']}"
    except (KeyError, TypeError, ValueError):
        return "-"


def _base(runs: list[Run]) -> Path:
    paths = [r.path.resolve() for r in runs]
    base = Path(os.path.commonpath(paths))
    return base.parent if len(paths) == 1 else base


def main(argv=None) -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="oneshot-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or multirun directories")
    parser.add_argument("--cost", choices=("latency", "flops", "params"), default=None,
                        help="the cost axis of the accuracy-vs-cost front (default: the runs' budget metric, else latency)")
    parser.add_argument("--pareto", metavar="PNG", default=None, help="where to draw the front (default: DIR/pareto.png)")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
    except (ValueError, OSError, json.JSONDecodeError, yaml.YAMLError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Wide enough for NB201 genotypes even when piped (rich defaults to 80 columns there).
    console = Console(width=None if sys.stdout.isatty() else 250)
    render(runs, console)
    # Issue 17: each run's cost and accuracy, the non-dominated ones marked; pareto.png, and W&B.
    png = Path(args.pareto) if args.pareto else Path(args.dirs[0]) / "pareto.png"
    table = render_tradeoff(runs, console, args.cost or cost_metric(runs), png)
    if table is not None:
        from oneshot.pareto import log_to_wandb, wandb_settings

        settings = wandb_settings([read_mapping(r.path / "config.yaml", yaml.safe_load) for r in runs], _base(runs))
        if settings is not None:
            try:
                mode = log_to_wandb(settings, png, *table, png.parent)
                console.print(f"logged to W&B ({mode}): group {settings['group']}, job type report")
            except Exception as e:  # noqa: BLE001 - the report on the console stands without W&B
                print(f"warning: could not log the front to W&B: {str(e).splitlines()[0][:200]}", file=sys.stderr)


if __name__ == "__main__":
    main()
