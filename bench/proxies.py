"""How well each training-free proxy ranks NAS-Bench-201, and what it costs; prints JSON.

    python bench/proxies.py [--cells 1000] [--seed 0] [--workers 2] [--metrics naswot,synflow,...]
                            [--slow-cells 50] [--slow-metrics grasp,ntk,regions] [--cache FILE]
                            [--table PATH] [--images PATH] [--report-only]

Scores a seeded sample of ``--cells`` NB201 cells with every proxy of ``--metrics`` on the
benchmark's own network (C=16, N=5, PyTorch's default init, seeded), using the real CIFAR-10
images of ``cifar10_sample.npz`` (100 images, normalised with the CIFAR-10 statistics, with
their labels for the loss-based proxies), and the first ``--slow-cells`` of the same sample with
the costly ``--slow-metrics`` (GraSP's Hessian-vector product, TE-NAS' NTK over 72 images).
Then the Spearman rho and Kendall tau of every proxy and of chosen rank-sum ensembles against
the benchmark's CIFAR-10, CIFAR-100 and ImageNet16-120 test accuracies (``nb201_accuracy.csv``),
and the seconds per cell of each proxy (median over the first 10 cells, each proxy alone).

Proxies are computed once, on CIFAR-10 images with 10 classes; the papers recompute them on
each dataset's own images. Scores are appended to ``--cache`` (JSON lines) as they come, so an
interrupted run resumes where it stopped. Without the table or the images the script says so
and exits 0 (they are optional data, not part of the product).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from oneshot.metrics import rank_sum, score_space
from oneshot.metrics.space_scores import METRICS, score_arch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repo
CIFAR10_MEAN, CIFAR10_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # 0..255 scale
TARGETS = {"cifar10": "cifar10_test", "cifar100": "cifar100_test", "imagenet16": "imagenet16_test"}
FAST = "naswot,synflow,snip,grad_norm,fisher,jacob_cov,zen,params,flops"
SLOW = "grasp,ntk,regions"
ENSEMBLES = [
    ("ntk", "regions"),  # TE-NAS
    ("naswot", "synflow"),
    ("synflow", "jacob_cov"),
    ("naswot", "synflow", "jacob_cov"),
    ("naswot", "synflow", "flops"),
    ("naswot", "synflow", "ntk", "regions"),
]


def load_table(path: Path) -> dict[str, dict[str, float]]:
    with path.open() as f:
        return {r["arch"]: {k: float(r[v]) for k, v in TARGETS.items()} for r in csv.DictReader(f)}


def load_images(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(path)
    x = torch.tensor(data["x"], dtype=torch.float32).permute(0, 3, 1, 2)
    mean = torch.tensor(CIFAR10_MEAN)[:, None, None]
    std = torch.tensor(CIFAR10_STD)[:, None, None]
    return (x - mean) / std, torch.tensor(data["y"], dtype=torch.long)


def correlations(scores: list[float], accuracy: list[float]) -> dict[str, float]:
    """Spearman and Kendall (tau-b) over the cells with a finite score; non-finite scores rank
    last (-inf for higher-is-better ones), as the ensembles treat them."""
    from scipy import stats

    x = np.nan_to_num(np.asarray(scores, dtype=float), nan=-np.inf, posinf=np.inf)
    x = stats.rankdata(x)  # infinities are ordered, then ranked: no NaN reaches scipy
    return {
        "spearman": round(float(stats.spearmanr(x, accuracy).statistic), 4),
        "kendall": round(float(stats.kendalltau(x, accuracy).statistic), 4),
    }


def signed(metric: str, values: list[float]) -> list[float]:
    """Scores oriented so that larger is better (the NTK condition number is negated)."""
    return [-v for v in values] if metric == "ntk" else list(values)


def read_cache(cache: Path, seed: int, metrics=None) -> dict:
    """``{arch: {metric: score}}`` from the cache file (only archs with all ``metrics``)."""
    done: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            if row["seed"] == seed:
                done.setdefault(row["arch"], {}).update({k: float(v) for k, v in row["scores"].items()})
    if metrics is None:
        return done
    return {a: {m: v[m] for m in metrics} for a, v in done.items() if set(metrics) <= set(v)}


def score_cached(archs, metrics, images, labels, cache: Path, workers: int, seed: int) -> None:
    """Score ``archs`` with ``metrics`` into the cache, skipping what it holds already."""
    done = read_cache(cache, seed)
    todo = [a for a in archs if not set(metrics) <= set(done.get(a, {}))]
    count = [0]

    def save(arch, scores, seconds):
        row = {m: _json_float(scores[m]) for m in metrics}
        with cache.open("a") as f:
            f.write(json.dumps({"arch": arch, "seed": seed, "scores": row, "seconds": seconds}) + "\n")
        done.setdefault(arch, {}).update(row)
        count[0] += 1
        if count[0] % 20 == 0 or count[0] == len(todo):
            print(f"scored {count[0]}/{len(todo)} cells ({','.join(metrics)})", file=sys.stderr, flush=True)

    if todo:
        score_space("nb201", todo, images, metrics, labels, seed=seed, workers=workers, chunk=2,
                    progress=False, callback=save)  # fmt: skip


def _json_float(v: float):
    return v if math.isfinite(v) else str(v)


def seconds_per_cell(archs, metrics, images, labels, seed) -> dict[str, float]:
    """Median seconds of each metric alone on one cell, over ``archs`` (one thread)."""
    out = {}
    for m in metrics:
        times = []
        for a in archs:
            start = time.perf_counter()
            score_arch("nb201", a, images, labels, [m], seed)
            times.append(time.perf_counter() - start)
        out[m] = round(statistics.median(times), 3)
    return out


def report(scores: dict, table: dict, metrics: list[str], ensembles) -> dict:
    archs = list(scores)
    out = {}
    for m in metrics:
        vals = signed(m, [scores[a][m] for a in archs])
        out[m] = {d: correlations(vals, [table[a][d] for a in archs]) for d in TARGETS}
    for ens in ensembles:
        if all(m in metrics for m in ens):
            total = rank_sum({m: [scores[a][m] for a in archs] for m in ens}, ens)
            out["+".join(ens)] = {
                d: correlations(total, [table[a][d] for a in archs]) for d in TARGETS
            }
    return out


def best_ensembles(scores: dict, table: dict, metrics: list[str], top: int = 5) -> list:
    """Every ensemble of 2..4 of ``metrics`` by CIFAR-10 Spearman (chosen on the same cells it
    is measured on: optimistic; the other datasets are the out-of-sample check)."""
    archs = list(scores)
    c10 = [table[a]["cifar10"] for a in archs]
    found = []
    for k in (2, 3, 4):
        for ens in itertools.combinations(metrics, k):
            total = rank_sum({m: [scores[a][m] for a in archs] for m in ens}, ens)
            found.append((correlations(total, c10)["spearman"], ens))
    found.sort(reverse=True)
    return [{"ensemble": "+".join(e), "cifar10_spearman": r} for r, e in found[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--slow-cells", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--metrics", default=FAST)
    p.add_argument("--slow-metrics", default=SLOW)
    p.add_argument("--timing-cells", type=int, default=10)
    p.add_argument("--table", type=Path, default=DATA / "nb201_accuracy.csv")
    p.add_argument("--images", type=Path, default=DATA / "cifar10_sample.npz")
    p.add_argument("--cache", type=Path, default=Path("bench_proxies_scores.jsonl"))
    p.add_argument("--report-only", action="store_true", help="report on the cached cells only")
    args = p.parse_args()
    for path in (args.table, args.images):
        if not path.is_file():
            print(json.dumps({"skipped": f"{path} not found (optional benchmark data)"}))
            return
    metrics = [m for m in args.metrics.split(",") if m]
    slow = [m for m in args.slow_metrics.split(",") if m]
    for m in metrics + slow:
        if m not in METRICS:
            sys.exit(f"error: unknown metric {m!r}; valid: {', '.join(METRICS)}")
    torch.set_num_threads(1)
    table = load_table(args.table)
    images, labels = load_images(args.images)
    cells = random.Random(args.seed).sample(sorted(table), min(args.cells, len(table)))
    start = time.perf_counter()
    few = cells[: args.slow_cells]
    if args.report_only:  # whatever the cache holds, in sample order
        cached = read_cache(args.cache, args.seed)
        cells = [a for a in cells if set(metrics) <= set(cached.get(a, {}))]
        few = [a for a in few if set(metrics + slow) <= set(cached.get(a, {}))]
    else:  # the costly metrics first, on the first cells, so a stopped run has both kinds
        if slow and few:
            score_cached(few, metrics + slow, images, labels, args.cache, args.workers, args.seed)
        score_cached(cells, metrics, images, labels, args.cache, args.workers, args.seed)
    fast = {a: v for a, v in read_cache(args.cache, args.seed, metrics).items() if a in set(cells)}
    fast = {a: fast[a] for a in cells}
    slow_scores = {}
    if slow and few:
        both = read_cache(args.cache, args.seed, metrics + slow)
        slow_scores = {a: both[a] for a in few}
    wall = time.perf_counter() - start
    result = {
        "cells": len(cells),
        "seed": args.seed,
        "images": f"{args.images.name}: {len(images)} CIFAR-10 images",
        "wall_seconds": round(wall, 1),
        "fast": {"metrics": metrics, "cells": len(cells), **report(fast, table, metrics, ENSEMBLES)},
    }
    if slow_scores:
        all_metrics = metrics + slow
        result["slow"] = {
            "metrics": all_metrics,
            "cells": len(few),
            **report(slow_scores, table, all_metrics, ENSEMBLES),
        }
    if len(metrics) > 1:
        result["best_ensembles"] = best_ensembles(fast, table, metrics)
    timing = [] if args.report_only else cells[: args.timing_cells]
    if timing:
        result["seconds_per_cell"] = seconds_per_cell(timing, metrics + slow, images, labels, args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
