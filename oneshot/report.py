"""``oneshot-report DIR...``: the runs under some directories (single runs, ``-m`` multirun
directories, or folders holding either) as one table, then the test accuracy's mean ± std
across seeds per (strategy, space): how much a result depends on its seed.

A run is a directory holding ``report.json`` and ``config.yaml`` (what ``oneshot-search`` and
``oneshot-retrain`` write); a search's ``retrain/`` subfolder belongs to its search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Run:
    path: Path
    seed: int | None
    strategy: str
    space: str
    genotype: str
    test_acc: float | None


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
    return Run(path, seed, strategy, space, genotype, test_acc)


def summarise(runs: list[Run]) -> list[tuple[str, str, int, float | None, float | None]]:
    """``(strategy, space, runs with an accuracy, mean, std)`` per group; std over seeds (n-1)."""
    groups = defaultdict(list)
    for r in runs:
        groups[r.strategy, r.space].append(r.test_acc)
    rows = []
    for (strategy, space), accs in sorted(groups.items()):
        accs = [a for a in accs if a is not None]
        mean = statistics.fmean(accs) if accs else None
        std = statistics.stdev(accs) if len(accs) > 1 else (0.0 if accs else None)
        rows.append((strategy, space, len(accs), mean, std))
    return rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def render(runs: list[Run], console) -> None:
    from rich.table import Table

    # Runs named relative to their common folder (a multirun's: 0, 1, ...), shown in the title.
    paths = [r.path.resolve() for r in runs]
    base = Path(os.path.commonpath(paths))
    base = base.parent if len(paths) == 1 else base
    table = Table(title=f"runs under {base}")
    for col in ("run", "seed", "strategy", "space", "genotype", "test acc %"):
        table.add_column(col, no_wrap=col == "genotype")
    for r, path in zip(runs, paths):
        table.add_row(
            str(path.relative_to(base)),
            str(r.seed),
            r.strategy,
            r.space,
            r.genotype,
            _pct(r.test_acc),
        )
    console.print(table)
    summary = Table(title="test accuracy across seeds")
    for col in ("strategy", "space", "n", "mean ± std %"):
        summary.add_column(col)
    for strategy, space, n, mean, std in summarise(runs):
        cell = "-" if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}"
        summary.add_row(strategy, space, str(n), cell)
    console.print(summary)


def main(argv=None) -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="oneshot-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="run or multirun directories")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.dirs)
    except (ValueError, OSError, json.JSONDecodeError, yaml.YAMLError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Wide enough for NB201 genotypes even when piped (rich defaults to 80 columns there).
    render(runs, Console(width=None if sys.stdout.isatty() else 250))


if __name__ == "__main__":
    main()
