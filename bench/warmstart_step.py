"""Search-step speed-up of the TE-NAS warm start: DARTS (first order) on the supernet pruned to
``--keep`` ops per edge vs the full supernet; JSON lines, medians.

    .venv/bin/python bench/warmstart_step.py                        # both spaces, keep=2
    .venv/bin/python bench/warmstart_step.py --spaces nb201 --steps 3
    .venv/bin/python bench/warmstart_step.py --spaces darts --survivors darts=run/warmstart.json

1. The survivors: ``oneshot.prune.prune`` to ``--keep`` ops per edge on the real CIFAR-10 images
   of ``../shared/data/cifar10_sample.npz`` (Gaussian noise without it), with the reference's
   metric networks and ``--num-inits`` / ``--ntk-batch`` / ``--n-crops`` (defaults cheaper than
   the reference's so the bench stays short; the survivors are TE-NAS picks all the same), or
   the ``survivors`` of a run's ``warmstart.json`` (``--survivors space=FILE``).
2. DARTS steps (architecture step + weight step, ``bench/search_step.py::build``) at the
   README's sizes (NB201 C=16 N=5, DARTS C=16 8 cells, batch 64 of 32x32) on both supernets in
   one process, alternating full / warm step by step, so a busy shared CPU slows both alike;
   wall and CPU (``time.process_time``) seconds, medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search_step import SIZES, build  # noqa: E402


def survivors(space: str, args) -> tuple[dict, float | None, str]:
    import torch

    from oneshot.prune import prune

    for item in args.survivors:
        name, file = item.split("=", 1)
        if name == space:
            return json.loads(Path(file).read_text())["survivors"], None, file
    from tenas import load_images

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images, source = load_images()
    start = time.perf_counter()
    result = prune(space, images, args.keep, num_inits=args.num_inits, ntk_batch=args.ntk_batch or None,
                   n_crops=args.n_crops)  # fmt: skip
    torch.set_num_threads(threads)
    return result.survivors, time.perf_counter() - start, source


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spaces", nargs="+", default=["nb201", "darts"])
    parser.add_argument("--keep", type=int, default=2)
    parser.add_argument(
        "--survivors", nargs="*", default=[], help="space=warmstart.json: skip the prune"
    )
    parser.add_argument("--num-inits", type=int, default=1)
    parser.add_argument(
        "--ntk-batch", type=int, default=0, help="0 = the reference's (nb201 72, darts 14)"
    )
    parser.add_argument("--n-crops", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per supernet")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for the steps (0 = default)"
    )
    args = parser.parse_args()
    # One thread by default: its CPU seconds barely change when other jobs share the machine,
    # so they are the number to quote from a busy CPU (wall seconds are printed too).
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for space in args.spaces:
        cands, prune_s, source = survivors(space, args)
        print(json.dumps({"bench": "warmstart_prune", "space": space, "keep": args.keep, "source": source,
                          "num_inits": args.num_inits, "seconds": prune_s and round(prune_s, 1),
                          "survivors": cands}), flush=True)  # fmt: skip
        torch.manual_seed(0)
        steps = {"full": build(space, "darts1", SIZES[space]),
                 "warm": build(space, "darts1", {**SIZES[space], "candidates": cands})}  # fmt: skip
        batch = [
            (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
            for _ in range(2)
        ]
        times, cpu = {"full": [], "warm": []}, {"full": [], "warm": []}
        for i in range(args.warmup + args.steps):
            for variant, step in steps.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                step(*batch)
                if i >= args.warmup:
                    times[variant].append(time.perf_counter() - start)
                    cpu[variant].append(time.process_time() - start_cpu)
        medians = {v: statistics.median(t) for v, t in times.items()}
        cpu_medians = {v: statistics.median(t) for v, t in cpu.items()}
        print(json.dumps({"bench": "warmstart_step", "space": space, "strategy": "darts1", "keep": args.keep,
                          "batch": args.batch, **SIZES[space], "median_step_s_full": round(medians["full"], 3),
                          "median_step_s_warm": round(medians["warm"], 3),
                          "speedup": round(medians["full"] / medians["warm"], 2), "n_steps": args.steps,
                          "median_cpu_s_full": round(cpu_medians["full"], 3),
                          "median_cpu_s_warm": round(cpu_medians["warm"], 3),
                          "cpu_speedup": round(cpu_medians["full"] / cpu_medians["warm"], 2),
                          "times_full": [round(t, 2) for t in times["full"]],
                          "times_warm": [round(t, 2) for t in times["warm"]],
                          "threads": torch.get_num_threads()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
