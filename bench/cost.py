"""Issue 17 (A): how good the additive latency model is, what the table costs, what the budget
term costs per search step. Prints one JSON line per measurement.

* ``additive``: per space, the latency table at the deployed sizes (batch 1, one thread by
  default) built into a fresh cache (its wall time), then for ``--archs`` random architectures the
  table's prediction against the measured latency of the whole fixed network, by the same
  protocol (``oneshot.latency.measure_latency``): median, mean and max relative error.
* ``overhead``: first-order DARTS steps (architecture + weight step) on NB201 at the ``cpu``
  preset, with and without a (tight, so active) budget term, alternating step by step in one
  process: median seconds per step of each and the difference.

    .venv/bin/python bench/cost.py                                   # the note's numbers
    .venv/bin/python bench/cost.py --spaces nb201 --archs 5 --repeats 10 --steps 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch

CLOCK = {"name": "wall"}
SIZES = {  # deployed (retrained) sizes of the papers, 32x32 RGB, 10 classes
    "nb201": {"C": 16, "N": 5},
    "darts": {"C": 36, "layers": 20},
}


def thread_cpu_ms(network, repeats: int) -> float:
    x = torch.randn(1, 3, 32, 32)
    times = []
    with torch.inference_mode():
        network(x)
        for _ in range(repeats):
            start = time.thread_time()
            network(x)
            times.append(1e3 * (time.thread_time() - start))
    return statistics.median(times)


def additive(
    space: str, archs: int, warmup: int, repeats: int, threads: int, calibrate: int = 0
) -> dict:
    from oneshot.cost import additive_error, build_cost_model, network_of
    from oneshot.genotypes import random_genotype
    from oneshot.spaces import DartsSupernet, NB201Network

    supernet = NB201Network(C=4, N=1) if space == "nb201" else DartsSupernet(C=4, layers=3)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        cost = build_cost_model(supernet, "latency", input_shape=(3, 32, 32), network=SIZES[space], cache_dir=cache,
                                threads=threads, warmup=warmup, repeats=repeats, progress=False,
                                calibrate=calibrate)  # fmt: skip
        build_seconds = time.perf_counter() - start
    rng, errors, cpu_errors, rows = (
        random.Random(1),
        [],
        [],
        [],
    )  # not the calibration's draws (seed 0)
    for _ in range(archs):
        genotype = random_genotype(supernet, rng)
        network = network_of(supernet, genotype, cost)
        result = additive_error(cost, genotype, network)
        errors.append(result["error"])
        # Diagnostic on a shared machine: the network's CPU time (a 30 ms forward is preempted by
        # other processes, a 0.1 ms candidate rarely is); the table's prediction against it too.
        cpu = thread_cpu_ms(network, repeats)
        cpu_errors.append(abs(result["table_ms"] - cpu) / cpu)
        rows.append([round(result["table_ms"], 3), round(result["measured_ms"], 3), round(cpu, 3)])
    return {
        "bench": "additive",
        "calibrate": calibrate, "clock": CLOCK["name"], "space": space, "sizes": SIZES[space], "batch_size": 1, "threads": threads,
        "device_name": cost.meta["device_name"], "table_build_s": round(build_seconds, 2),
        "table_entries": sum(int(t.numel()) for t in cost.per_choice.values()), "fixed_ms": round(cost.fixed, 3),
        "archs": archs, "median_error": round(statistics.median(errors), 4),
        "mean_error": round(statistics.mean(errors), 4), "max_error": round(max(errors), 4),
        "median_error_vs_cpu_time": round(statistics.median(cpu_errors), 4),
        "table_vs_measured_vs_cpu_ms": rows,
    }  # fmt: skip


def overhead(steps: int, batch: int) -> dict:
    from oneshot.lightning_modules.darts import DartsSearch

    from oneshot.cost import build_cost_model
    from oneshot.cost.budget import BudgetPenalty
    from oneshot.spaces import NB201Network

    torch.manual_seed(0)
    supernet = NB201Network(C=8, N=1, num_classes=10, in_channels=3)
    module = DartsSearch(supernet, order=1)
    module.manual_backward = lambda loss: (
        loss.backward()
    )  # no Trainer: plain autograd (as bench/search_step.py)
    cost = build_cost_model(supernet, "flops", input_shape=(3, 32, 32))
    penalty = BudgetPenalty(
        cost, cost.cheapest() * 1.01, loss="hinge", multiplier=1.0
    )  # tight: always active
    opts = (torch.optim.SGD(supernet.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4),
            torch.optim.Adam(supernet.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3))  # fmt: skip
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = {"without": [], "with": []}
    for i in range(2 * steps + 2):
        kind = ("without", "with")[i % 2]
        module.budget = penalty if kind == "with" else None
        start = time.perf_counter()
        module.arch_step((x, y), (x, y), *opts)
        module.weight_step((x, y), opts[0])
        if i >= 2:  # the first pair warms up
            times[kind].append(time.perf_counter() - start)
    without, with_ = statistics.median(times["without"]), statistics.median(times["with"])
    # The term alone (expected cost, its gradient, the dual step), which the step difference hides in noise.
    module.budget = penalty
    grads = [torch.zeros_like(a) for a in supernet.arch_parameters()]
    alone = []
    for _ in range(50):
        start = time.perf_counter()
        module.budget_gradients(grads, torch.tensor(1.0))
        penalty.step(module._budget_expected)
        alone.append(time.perf_counter() - start)
    return {"bench": "overhead", "space": "nb201", "sizes": {"C": 8, "N": 1}, "batch": batch, "steps": steps,
            "threads": torch.get_num_threads(), "median_step_s_without": round(without, 4),
            "median_step_s_with": round(with_, 4), "overhead_ms": round(1e3 * (with_ - without), 2),
            "overhead_fraction": round((with_ - without) / without, 4), "term_alone_ms": round(1e3 * statistics.median(alone), 3)}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spaces", nargs="+", default=["nb201", "darts"], choices=list(SIZES))
    parser.add_argument("--archs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--calibrate", type=int, default=0, help="cost.calibrate: K whole networks scale the table"
    )
    parser.add_argument(
        "--darts-sizes",
        type=int,
        nargs=2,
        metavar=("C", "LAYERS"),
        default=None,
        help="the DARTS network's C and layers (default: the paper's 36 20)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: time everything by this thread's CPU time (a diagnostic on a shared "
        "machine: no preemption by other processes; with one thread)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.darts_sizes:
        SIZES["darts"] = {"C": args.darts_sizes[0], "layers": args.darts_sizes[1]}
    if args.clock == "cpu":
        import oneshot.latency

        CLOCK["name"] = "cpu"
        oneshot.latency.time = type(
            "CpuClock", (), {"perf_counter": staticmethod(time.thread_time)}
        )
    for space in args.spaces:
        print(
            json.dumps(
                additive(space, args.archs, args.warmup, args.repeats, args.threads, args.calibrate)
            ),
            flush=True,
        )
    if args.steps:
        print(json.dumps(overhead(args.steps, args.batch)), flush=True)


if __name__ == "__main__":
    main()
