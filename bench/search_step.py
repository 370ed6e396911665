"""Median seconds per search step and peak RSS, per space x strategy, printed as JSON lines.

A step is what a strategy's ``training_step`` does for one batch: DARTS = architecture step on a
validation batch + weight step on a training batch (order 1 or 2); ENAS = weight step through one
sampled path + a REINFORCE controller step scored on a validation batch; GDAS = weight step and
architecture step, each through one Gumbel-max sampled op per edge; DrNAS = DARTS' two steps
through Dirichlet samples (+ the KL term); SPOS = one weight step along one uniform path (its
evolution runs once after training and is not a step); ``darts1_beta`` / ``darts1_auxskip`` =
first-order DARTS with the beta-DARTS / DARTS- collapse guard.

Each configuration runs in its own process (so its peak RSS is its own), and the configurations
alternate round by round, so a noisy machine slows all of them alike. Quote the medians.

    .venv/bin/python bench/search_step.py                       # README table: both spaces, all strategies
    .venv/bin/python bench/search_step.py --spaces nb201 --strategies darts1 --steps 5 --rounds 3
    .venv/bin/python bench/search_step.py --spaces darts --strategies darts1 --partial 1 4   # PC-DARTS
    .venv/bin/python bench/search_step.py --strategies darts1 gdas drnas spos --device cuda  # peak GPU memory too
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SIZES = {  # the configurations the README quotes (issue #3/#4): batch 64, 32x32 RGB, 10 classes
    "nb201": {"C": 16, "N": 5},
    "darts": {"C": 16, "layers": 8},
}


def build(space: str, strategy: str, sizes: dict, partial: int = 1, device: str = "cpu"):
    import torch
    from oneshot.lightning_modules.darts import DartsSearch

    from oneshot.spaces import DartsSupernet, NB201Network

    if partial > 1:  # PC-DARTS: 1/K of the channels through the mixed ops, edge normalisation
        sizes = {**sizes, "partial_channels": partial}
    supernet = (NB201Network if space == "nb201" else DartsSupernet)(num_classes=10, in_channels=3, **sizes).to(device)
    guards = {"darts1_beta": "beta", "darts1_auxskip": "auxiliary_skip"}  # issue 16: collapse guards
    if strategy in ("gdas", "drnas") or strategy in guards:
        from oneshot.lightning_modules.drnas import DrnasSearch
        from oneshot.lightning_modules.gdas import GdasSearch

        cls = {"gdas": GdasSearch, "drnas": DrnasSearch}.get(strategy, DartsSearch)
        module = cls(supernet, **({"regularizer": guards[strategy]} if strategy in guards else {}))
        opts = (torch.optim.SGD(supernet.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4),
                torch.optim.Adam(supernet.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3))  # fmt: skip

        def step(train, val):  # GDAS trains the weights first (its authors' order); same work
            module.arch_step(train, val, *opts)
            module.weight_step(train, opts[0])
    elif strategy == "spos":
        from oneshot.lightning_modules.spos import SposSearch

        module = SposSearch(supernet)
        w_opt = torch.optim.SGD(supernet.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)

        def step(train, val):
            module.path_step(train, w_opt)
    elif strategy.startswith("darts"):
        module = DartsSearch(supernet, order=int(strategy[-1]))
        opts = (torch.optim.SGD(supernet.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4),
                torch.optim.Adam(supernet.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3))  # fmt: skip

        def step(train, val):
            module.arch_step(train, val, *opts)
            module.weight_step(train, opts[0])
    else:
        from oneshot.lightning_modules.enas import EnasSearch

        module = EnasSearch(supernet).to(device)
        w_opt = torch.optim.SGD(supernet.weight_parameters(), 0.05, momentum=0.9, weight_decay=1e-4)
        c_opt = torch.optim.Adam(module.controller.parameters(), 3.5e-4)
        generator = torch.Generator().manual_seed(0)

        def step(train, val):
            with torch.no_grad():
                sample = module.controller.sample(generator)
            module.weight_step(train, sample.weights, w_opt)
            module.controller_step(val, c_opt, generator=generator)

    module.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
    module.log = lambda *a, **k: None
    return step


def run_one(space: str, strategy: str, batch: int, steps: int, warmup: int, threads: int, partial: int = 1,
            device: str = "cpu") -> dict:  # fmt: skip
    import torch

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    step = build(space, strategy, SIZES[space], partial, device)
    return time_steps(step, batch, steps, warmup, device)


def time_steps(step, batch: int, steps: int, warmup: int, device: str = "cpu") -> dict:
    """``step(train, val)`` on two fixed random batches (``batch`` 32x32 RGB images, 10 classes),
    ``warmup`` untimed then ``steps`` timed runs: their seconds, this process's peak RSS, the
    torch threads, and on CUDA the peak GPU memory. Shared by bench/model_space_step.py."""
    import torch

    def batch_():
        return torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    train, val = batch_(), batch_()
    times = []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        step(train, val)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"times": times, "peak_rss_mb": round(peak_kb / 1024, 1), "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def alternate(script: str, configs: list[str], rounds: int, args: list[str]) -> dict[str, dict]:
    """Every configuration in its own process (``script --one CONFIG *args``, which prints its
    ``time_steps`` dict as the last line), all of them round after round, so a noisy machine
    slows them alike. Per configuration: the timed steps of every round, the peak RSS (and GPU
    memory) over the rounds, and the other fields of its last run. Progress goes to stderr."""
    results = {c: {"times": [], "peak_rss_mb": 0.0} for c in configs}
    for _ in range(rounds):
        for config in configs:
            cmd = [sys.executable, script, "--one", config, *args]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            one = json.loads(out)
            print(json.dumps({"run": config, **one}), file=sys.stderr, flush=True)  # progress, raw
            r = results[config]
            r["times"] += one.pop("times")
            for key in ("peak_rss_mb", "peak_gpu_mb"):
                if key in one:
                    r[key] = max(r.get(key, 0.0), one.pop(key))
            r.update(one)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=["nb201", "darts"])
    parser.add_argument("--strategies", nargs="+",
                        default=["darts1", "darts2", "enas", "gdas", "drnas", "spos", "darts1_beta", "darts1_auxskip"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all configurations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--partial", nargs="+", type=int, default=[1],
                        help="PC-DARTS K values to compare (DARTS space only; 1 = full channels)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (cuda also reports peak GPU memory)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        space, strategy, k = args.one.split(":")
        print(json.dumps(run_one(space, strategy, args.batch, args.steps, args.warmup, args.threads, int(k), args.device)))
        return

    configs = [(s, st, k) for s in args.spaces for st in args.strategies for k in args.partial
               if k == 1 or (s == "darts" and st.startswith("darts"))]  # fmt: skip
    runs = alternate(__file__, [f"{s}:{st}:{k}" for s, st, k in configs], args.rounds,
                     ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                      "--threads", str(args.threads), "--device", args.device])  # fmt: skip
    results = {(s, st, k): runs[f"{s}:{st}:{k}"] for s, st, k in configs}
    medians = {}
    for (space, strategy, k), r in results.items():
        medians[(space, strategy, k)] = statistics.median(r["times"])
        print(json.dumps({
            "bench": "search_step", "space": space, "strategy": strategy, "partial_channels": k, "batch": args.batch,
            **SIZES[space], "median_step_s": round(medians[(space, strategy, k)], 3), "n_steps": len(r["times"]),
            "peak_rss_mb": r["peak_rss_mb"], "threads": r["threads"], "device": args.device,
            **({"peak_gpu_mb": r["peak_gpu_mb"]} if "peak_gpu_mb" in r else {}),
        }))  # fmt: skip
    for space, strategy, k in configs:
        base = medians.get((space, "darts1", 1))
        if base and (strategy, k) != ("darts1", 1):
            print(json.dumps({"bench": "ratio", "space": space, "of": f"{strategy} K={k}", "to": "darts1 K=1",
                              "time_ratio": round(medians[(space, strategy, k)] / base, 3),
                              "rss_ratio": round(results[(space, strategy, k)]["peak_rss_mb"]
                                                 / results[(space, "darts1", 1)]["peak_rss_mb"], 3)}))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    main()
