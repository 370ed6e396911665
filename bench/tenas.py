"""Timings of TE-NAS' metrics and of a standalone NB201 prune; one JSON object per line.

    python bench/tenas.py [--repeats 3] [--threads 1] [--methods loop,vmap] [--nets full,tenas]
                          [--chunk-size 2] [--num-inits 1] [--skip-prune]

* ``ntk``: one NTK condition number of the full NB201 supernet (C=16, N=5, every op but
  ``none`` on every edge, batch 64 of 32x32 images), per method (per-sample loop, vmap);
  ``--nets full,tenas`` adds TE-NAS' NTK network (C=3, N=1, batch 72), the one a prune measures;
* ``regions``: one linear-region count of the same supernet over the 64 images, and of the
  reference's thin network (one C=1 cell) over 3,000 one-channel 3x3 crops;
* ``prune``: wall time of ``oneshot.prune.prune("nb201", ...)`` at the reference sizes (NTK
  network C=3, N=1, batch 72; 3,000 crops) with ``--num-inits`` initialisations (1), and, when
  ``../shared/data/nb201_accuracy.csv`` is there, the benchmark's CIFAR-10 test accuracy of
  the genotype it picks.

Images: the 100 CIFAR-10 test images of ``../shared/data/cifar10_sample.npz`` if present
(normalised with the CIFAR-10 statistics the reference uses), else Gaussian noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from oneshot.metrics import (
    NB201SingleCell,
    linear_regions,
    ntk_condition_number,
    random_crops,
    reinit_,
)
from oneshot.prune import average_masked_ops, prune
from oneshot.spaces import NB201Network

ALL_OPS = {"weights": {"cell": [(1, 2, 3, 4)] * 6}}  # every NB201 op but `none`, every edge
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_sample.npz"  # ../shared beside the checkout
ACCURACY = SAMPLE.parent / "nb201_accuracy.csv"
CIFAR10_MEAN, CIFAR10_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)  # reference, 0..255 scale


def load_images() -> tuple[torch.Tensor, str]:
    if SAMPLE.is_file():
        x = torch.tensor(np.load(SAMPLE)["x"], dtype=torch.float32).permute(0, 3, 1, 2)
        mean, std = (
            torch.tensor(CIFAR10_MEAN)[:, None, None],
            torch.tensor(CIFAR10_STD)[:, None, None],
        )
        return (x - mean) / std, "cifar10_sample"
    return torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "random"


def median_seconds(fn, repeats: int) -> tuple[float, object, float]:
    """Median wall and CPU seconds of ``fn()``; with one thread the CPU seconds are what an idle
    machine's wall seconds would be, so quote them from a shared, busy CPU."""
    times, cpu, value = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), value, statistics.median(cpu)


def emit(**row) -> None:
    print(json.dumps(row), flush=True)  # the bench's output is its JSON lines


def bench_supernet(C: int, N: int, batch: torch.Tensor, args, common: dict) -> None:
    """NTK per method and regions of the NB201 supernet with every op but ``none`` on every
    edge, averaged per edge as TE-NAS' masked supernet computes it (a plain sum of 4 ops grows
    ~17x per cell and overflows float32 by the 15th cell of C=16, N=5)."""
    name, masks = f"nb201 supernet C={C} N={N}", ALL_OPS
    net = NB201Network(C=C, N=N, search=False, affine=True)
    reinit_(net, "fan_out", torch.Generator().manual_seed(0))
    with average_masked_ops(net):
        for method in args.methods.split(","):
            secs, kappa, cpu = median_seconds(
                lambda m=method: ntk_condition_number(net, batch, init=None, forward_kwargs=masks, method=m,
                                                      chunk_size=args.chunk_size),
                args.repeats,
            )  # fmt: skip
            emit(
                bench="ntk",
                net=name,
                batch=len(batch),
                method=method,
                seconds=secs,
                cpu_seconds=cpu,
                kappa=kappa,
                **common,
            )
        secs, count, cpu = median_seconds(
            lambda: linear_regions(net, batch, init=None, forward_kwargs=masks), args.repeats
        )
    emit(
        bench="regions",
        net=name,
        inputs=f"{len(batch)} images",
        seconds=secs,
        cpu_seconds=cpu,
        regions=count,
        **common,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--methods", default="loop,vmap")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=2,
        help="vmap rows at once; the full net needs > 19 GB even at 1",
    )
    parser.add_argument("--num-inits", type=int, default=1)
    parser.add_argument("--skip-prune", action="store_true")
    parser.add_argument(
        "--nets", default="full", help="full: C=16 N=5, batch 64; tenas: C=3 N=1, batch 72"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, source = load_images()
    common = {"images": source, "threads": args.threads, "repeats": args.repeats}

    sizes = {"full": (16, 5, 64), "tenas": (3, 1, 72)}
    for C, N, n in (sizes[name] for name in args.nets.split(",")):
        bench_supernet(C, N, images[:n], args, common)
    crops, thin = random_crops(images, 3000), NB201SingleCell()
    reinit_(thin, "fan_in", torch.Generator().manual_seed(0))
    with average_masked_ops(thin):
        secs, count, cpu = median_seconds(
            lambda: linear_regions(thin, crops, init=None, forward_kwargs=ALL_OPS), args.repeats
        )
    emit(
        bench="regions",
        net="nb201 thin cell C=1",
        inputs="3000 crops 1x3x3",
        seconds=secs,
        cpu_seconds=cpu,
        regions=count,
        **common,
    )

    if not args.skip_prune:
        start, start_cpu = time.perf_counter(), time.process_time()
        result = prune("nb201", images, num_inits=args.num_inits)
        emit(bench="prune", space="nb201", ntk_batch=72, n_crops=3000, num_inits=args.num_inits,
             seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - start_cpu, genotype=str(result.genotype), evaluations=len(result.history),
             images=source, threads=args.threads, **benchmark_accuracy(str(result.genotype)))  # fmt: skip


def benchmark_accuracy(arch: str) -> dict:
    """NAS-Bench-201's CIFAR-10 test accuracy of ``arch`` and the share of the 15,625 cells it
    beats, from ``../shared/data/nb201_accuracy.csv`` when present (bench only)."""
    if not ACCURACY.is_file():
        return {}
    import csv

    with ACCURACY.open() as f:
        table = {row["arch"]: float(row["cifar10_test"]) for row in csv.DictReader(f)}
    acc = table.get(arch)
    if acc is None:
        return {}
    beats = sum(a < acc for a in table.values()) / len(table)
    return {"nb201_cifar10_test": acc, "beats_fraction_of_space": round(beats, 4),
            "best_in_space": max(table.values())}  # fmt: skip


if __name__ == "__main__":
    main()
