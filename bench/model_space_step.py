"""Median seconds per search step and peak RSS of a model space (issue 15), next to NB201's.

``space=mobilenet`` (oneshot/spaces/mobilenet.py, searched as ``ModelSpace``) and the NB201
supernet, each with first-order DARTS and ENAS, batch 64 of 32x32 RGB images, 10 classes: the
step is the strategy's own ``arch_step`` + ``weight_step`` (DARTS) or a weight step through one
sampled path + a REINFORCE controller step (ENAS), as bench/search_step.py times them. Every
configuration runs in its own process (its own peak RSS); configurations alternate per round.

    .venv/bin/python bench/model_space_step.py                          # mobilenet cpu + paper, nb201
    .venv/bin/python bench/model_space_step.py --mobilenet cpu --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MOBILENET = {
    "paper": {"width_mult": 1.0, "stages": [[24, 4, 2], [40, 4, 2], [80, 4, 2], [96, 4, 1], [192, 4, 2], [320, 1, 1]],
              "first_channels": 32, "last_channels": 1280},
    "cpu": {"width_mult": 0.25, "stages": [[24, 2, 2], [40, 2, 2], [80, 2, 2]], "first_channels": 32,
            "last_channels": 128, "stem_stride": 2, "small_image_stride1_stages": 0},
}  # fmt: skip


def build(space: str, strategy: str, device: str):
    import torch
    from oneshot.lightning_modules.darts import DartsSearch
    from oneshot.lightning_modules.enas import EnasSearch

    from oneshot.spaces import ModelSpace, NB201Network

    if space == "nb201":
        supernet = NB201Network(C=16, N=5, num_classes=10, in_channels=3)
    else:
        size = space.split("-")[1]
        config = {"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", **MOBILENET[size]}
        supernet = ModelSpace(config, num_classes=10, in_channels=3, image_size=32)
    supernet = supernet.to(device)
    if strategy == "darts1":
        module = DartsSearch(supernet, order=1)
        opts = (torch.optim.SGD(supernet.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4),
                torch.optim.Adam(supernet.arch_parameters(), 3e-4, betas=(0.5, 0.999), weight_decay=1e-3))  # fmt: skip

        def step(train, val):
            module.arch_step(train, val, *opts)
            module.weight_step(train, opts[0])
    else:
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
    return step, supernet.num_weight_parameters()


def run_one(
    space: str, strategy: str, batch: int, steps: int, warmup: int, threads: int, device: str
) -> dict:
    import torch

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    step, params = build(space, strategy, device)

    def batch_():
        return torch.randn(batch, 3, 32, 32, device=device), torch.randint(
            0, 10, (batch,), device=device
        )

    train, val = batch_(), batch_()
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(train, val)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    out = {"times": times, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           "threads": torch.get_num_threads(), "supernet_weight_parameters": params}  # fmt: skip
    if device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mobilenet", nargs="+", default=["cpu", "paper"], choices=list(MOBILENET))
    parser.add_argument(
        "--strategies", nargs="+", default=["darts1", "enas"], choices=["darts1", "enas"]
    )
    parser.add_argument("--no-nb201", action="store_true", help="skip the NB201 reference")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = torch's default)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        space, strategy = args.one.split(":")
        print(
            json.dumps(
                run_one(
                    space, strategy, args.batch, args.steps, args.warmup, args.threads, args.device
                )
            )
        )
        return
    spaces = [f"mobilenet-{m}" for m in args.mobilenet] + ([] if args.no_nb201 else ["nb201"])
    configs = [(s, st) for s in spaces for st in args.strategies]
    results = {c: {"times": [], "peak_rss_mb": 0.0} for c in configs}
    for _ in range(args.rounds):
        for space, strategy in configs:
            cmd = [sys.executable, __file__, "--one", f"{space}:{strategy}", "--batch", str(args.batch), "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device]  # fmt: skip
            one = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            print(json.dumps({"run": [space, strategy], **one}), file=sys.stderr, flush=True)
            r = results[(space, strategy)]
            r["times"] += one["times"]
            r["peak_rss_mb"] = max(r["peak_rss_mb"], one["peak_rss_mb"])
            r.update(threads=one["threads"], params=one["supernet_weight_parameters"])
            if "peak_gpu_mb" in one:
                r["peak_gpu_mb"] = max(r.get("peak_gpu_mb", 0.0), one["peak_gpu_mb"])
    for (space, strategy), r in results.items():
        print(json.dumps({
            "bench": "model_space_step", "space": space, "strategy": strategy, "batch": args.batch, "image": 32,
            "supernet_weight_parameters": r["params"], "median_step_s": round(statistics.median(r["times"]), 3),
            "n_steps": len(r["times"]), "peak_rss_mb": r["peak_rss_mb"], "threads": r["threads"], "device": args.device,
            **({"peak_gpu_mb": r["peak_gpu_mb"]} if "peak_gpu_mb" in r else {}),
        }))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    main()
