"""Our first-order DARTS search step against NNI 3.0's on the same space, and against the limit.

Both sides train the same space (NB201: C=16, N=5; DARTS space: C=16, 8 cells) on the same
batch size (64 x 3 x 32 x 32, 10 classes) inside a real Lightning ``Trainer``; a callback times
each ``training_step`` (architecture step on the val batch + weight step on the train batch).
Each (side, space) runs in its own process, so its peak RSS is its own, and the runs alternate
round by round, so a noisy machine slows both alike. Quote the medians.

The limit: the same run measures this CPU's dense 3x3 conv (forward + backward) and matmul
throughput, counts the FLOPs of one of our search steps with ``torch.utils.flop_counter``
(convolutions and matmuls, forward and backward, as executed), and prints the lower-bound step
time ``conv_flops / conv_throughput + mm_flops / mm_throughput`` and our ratio to it. A second,
tighter floor: every conv kernel call of our step (forward and backward, recorded below
autograd) replayed alone at its own shape and layout, summed (``step_convs_alone_s``): the time
the library's kernels need for exactly these convs, with no framework around them.

NNI is not a dependency of this project: its side runs ``bench/nni_step.py`` under the python of
a separate venv (default ``$HOME/nni-venv``; ``--nni-python`` or ``$NNI_PYTHON`` to change), made
with the same torch as ours, since the torch version alone moves step time by about 25%:

    python3 -m venv $HOME/nni-venv
    $HOME/nni-venv/bin/pip install torch==2.14.1 lightning==2.6.6 pytorch-lightning==2.6.6 nni==3.0

    .venv/bin/python bench/vs_nni.py                      # both spaces, 2 rounds x 3 steps each
    .venv/bin/python bench/vs_nni.py --spaces nb201 --rounds 1 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from trainer_timing import bilevel_pair, timed_fit  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
CELLS = {"nb201": 5, "darts": 8}  # NB201: cells per stage (N); DARTS: cells (layers)


def _our_supernet(space: str, C: int, cells: int, partial: int = 1):
    from oneshot.spaces import DartsSupernet, NB201Network

    if space == "nb201":
        return NB201Network(C=C, N=cells, num_classes=10)
    return DartsSupernet(C=C, layers=cells, num_classes=10, partial_channels=partial)


def ours(space: str, C: int, cells: int, batch: int, steps: int, warmup: int) -> dict:
    """Our side: ``DartsSearch`` (order 1, paper defaults) in a real Trainer."""
    import torch
    from oneshot.lightning_modules.darts import DartsSearch

    torch.manual_seed(0)
    module = DartsSearch(_our_supernet(space, C, cells), order=1)
    return timed_fit(module, batch, steps, warmup)


def _best_time(fn, reps: int = 7) -> float:
    """The fastest of ``reps`` runs: what the machine achieves when nothing else interferes."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _flops(fn) -> dict[str, int]:
    """FLOPs by kind (conv, mm) of what ``fn`` runs, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    out = {"conv": 0, "mm": 0}
    for op, n in counter.get_flop_counts()["Global"].items():
        out["conv" if "conv" in str(op) else "mm"] += n
    return out


def _conv_calls(fn) -> dict:
    """Every convolution kernel call (forward and backward) ``fn`` makes, below autograd, as
    {(op, argument description): (count, args)}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    kinds = (aten.convolution.default, aten.convolution_backward.default)

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype))
        return tuple(describe(b) for b in a) if isinstance(a, (list, tuple)) else a

    calls = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                key = (str(func), describe(args))
                n, _ = calls.get(key, (0, None))
                calls[key] = (n + 1, (func, args))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return calls


def _kernels_alone_s(calls: dict) -> float:
    """Seconds the recorded conv calls take when each runs alone at its own shape and layout
    (best of 5, times its count): what the library's kernels achieve on exactly this step's convs."""
    import torch

    def fresh(a):
        if isinstance(a, torch.Tensor):
            return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).normal_()
        return type(a)(fresh(b) for b in a) if isinstance(a, (list, tuple)) else a

    total = 0.0
    for n, (func, args) in calls.values():
        replay = fresh(args)
        total += n * _best_time(lambda func=func, replay=replay: func(*replay), reps=5)
    return total


def limit(space: str, C: int, cells: int, batch: int) -> dict:
    """Machine throughput, FLOPs of one of our search steps, and the lower-bound step time."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import torch.nn.functional as F
    from search_step import build

    torch.manual_seed(0)
    # Large dense 3x3 convs, forward + backward (input and weight grads), NHWC and NCHW: the best
    # any conv of the step could do. The machine's conv throughput is the best of them.
    conv_tp = 0.0
    for channels, size in ((64, 32), (128, 16), (256, 16)):
        for fmt in (torch.channels_last, torch.contiguous_format):
            x = torch.randn(64, channels, size, size).contiguous(memory_format=fmt).requires_grad_()
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=fmt)

            def conv_fb(conv=conv, x=x):
                conv(x).sum().backward()

            conv_tp = max(conv_tp, _flops(conv_fb)["conv"] / _best_time(conv_fb))
    a, b = torch.randn(2048, 2048, requires_grad=True), torch.randn(2048, 2048)

    def mm_fb():
        (a @ b).sum().backward()

    mm_tp = _flops(mm_fb)["mm"] / _best_time(mm_fb)
    sizes = {"C": C, "N": cells} if space == "nb201" else {"C": C, "layers": cells}
    step = build(space, "darts1", sizes)
    pair = bilevel_pair(batch)
    step(pair["train"], pair["val"])  # lazy init outside the count
    flops = _flops(lambda: step(pair["train"], pair["val"]))  # our step, as executed
    net = _our_supernet(space, C, cells)

    def reference():  # what NNI's step runs: two full forward + backward passes
        for x, y in pair.values():
            F.cross_entropy(net(x), y).backward()

    ref = _flops(reference)
    bound = flops["conv"] / conv_tp + flops["mm"] / mm_tp
    # The same step's own convs, each timed alone: the floor at these (small) shapes.
    kernels_s = _kernels_alone_s(_conv_calls(lambda: step(pair["train"], pair["val"])))
    return {
        "conv_gflops_per_s": round(conv_tp / 1e9, 1), "mm_gflops_per_s": round(mm_tp / 1e9, 1),
        "step_gflop_conv": round(flops["conv"] / 1e9, 1), "step_gflop_mm": round(flops["mm"] / 1e9, 2),
        "full_fwd_bwd_x2_gflop": round((ref["conv"] + ref["mm"]) / 1e9, 1),
        "lower_bound_s": round(bound, 3),
        "lower_bound_full_fwd_bwd_x2_s": round(ref["conv"] / conv_tp + ref["mm"] / mm_tp, 3),
        "step_convs_alone_s": round(kernels_s, 3),
        "step_convs_alone_gflops_per_s": round(flops["conv"] / kernels_s / 1e9, 1),
    }  # fmt: skip


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"benchmark process failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spaces", nargs="+", default=["nb201", "darts"], choices=list(CELLS))
    parser.add_argument("--C", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all runs")
    parser.add_argument("--nni-python", default=os.environ.get("NNI_PYTHON", os.path.expanduser("~/nni-venv/bin/python")))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, space = args.one.split(":")
        fn = ours if kind == "ours" else limit
        extra = (args.steps, args.warmup) if kind == "ours" else ()
        print(json.dumps(fn(space, args.C, CELLS[space], args.batch, *extra)))
        return
    if not Path(args.nni_python).exists():
        raise SystemExit(f"NNI python {args.nni_python} not found; create the venv as the docstring of {__file__} says")

    common = ["--C", str(args.C), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    runs = {}
    for space in args.spaces:
        runs[("ours", space)] = [sys.executable, __file__, "--one", f"ours:{space}", *common]
        runs[("nni", space)] = [args.nni_python, str(ROOT / "bench" / "nni_step.py"), "--space", space,
                                "--cells", str(CELLS[space]), *common]  # fmt: skip
    results = {k: {"times": [], "cpu": [], "peak_rss_mb": 0.0} for k in runs}
    load = []
    for _ in range(args.rounds):
        for key, cmd in runs.items():
            one = _run(cmd)
            print(json.dumps({"run": key, **one}), file=sys.stderr, flush=True)  # progress, raw
            results[key]["times"] += one["times"]
            results[key]["cpu"] += one["cpu"]
            load.append(os.getloadavg()[0])
            results[key]["peak_rss_mb"] = max(results[key]["peak_rss_mb"], one["peak_rss_mb"])
    for space in args.spaces:
        bound = _run([sys.executable, __file__, "--one", f"limit:{space}", *common])
        ours_s, nni_s = (statistics.median(results[(k, space)]["times"]) for k in ("ours", "nni"))
        ours_cpu, nni_cpu = (statistics.median(results[(k, space)]["cpu"]) for k in ("ours", "nni"))
        ours_mb, nni_mb = (results[(k, space)]["peak_rss_mb"] for k in ("ours", "nni"))
        print(json.dumps({
            "bench": "vs_nni", "space": space, "C": args.C, "cells": CELLS[space], "batch": args.batch,
            "strategy": "darts first order", "n_steps": len(results[("ours", space)]["times"]),
            "ours_median_s": round(ours_s, 3), "nni_median_s": round(nni_s, 3),
            "time_ratio_ours_to_nni": round(ours_s / nni_s, 3),
            "ours_median_cpu_s": round(ours_cpu, 3), "nni_median_cpu_s": round(nni_cpu, 3),
            "cpu_ratio_ours_to_nni": round(ours_cpu / nni_cpu, 3),
            "ours_peak_rss_mb": ours_mb, "nni_peak_rss_mb": nni_mb, "rss_ratio_ours_to_nni": round(ours_mb / nni_mb, 3),
            **bound, "ratio_to_lower_bound": round(ours_s / bound["lower_bound_s"], 3),
            "ratio_to_step_convs_alone": round(ours_s / bound["step_convs_alone_s"], 3),
            "load_avg_1min_during_runs": round(statistics.median(load), 2),
        }))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
