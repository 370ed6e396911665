"""Median seconds per search step and peak RSS of a model space (issue 15), next to NB201's.

``space=mobilenet`` (oneshot/spaces/mobilenet.py, searched as ``ModelSpace``) and the NB201
supernet, each with first-order DARTS and ENAS, batch 64 of 32x32 RGB images, 10 classes: the
step is the strategy's own ``arch_step`` + ``weight_step`` (DARTS) or a weight step through one
sampled path + a REINFORCE controller step (ENAS), timed by bench/search_step.py's ``time_steps``.
Every configuration runs in its own process (its own peak RSS); configurations alternate per
round (``alternate``). ``activations_saved_mb``: what autograd keeps for the backward of one
training forward (parameters left out), the part of the peak memory that grows with the batch.

    .venv/bin/python bench/model_space_step.py                          # mobilenet cpu + paper, nb201
    .venv/bin/python bench/model_space_step.py --mobilenet cpu --steps 3 --rounds 2
    .venv/bin/python bench/model_space_step.py --mobilenet paper --partial 1 4 --strategies darts1  # PC-DARTS
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from search_step import alternate, time_steps  # bench/ is this script's directory

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
        size, *pc = space.split("-")[1:]  # mobilenet-paper, or mobilenet-paper-pc4: PC-DARTS K=4
        config = {"_target_": "oneshot.spaces.mobilenet.MobileNetSpace", **MOBILENET[size]}
        k = int(pc[0][2:]) if pc else 1
        supernet = ModelSpace(config, num_classes=10, in_channels=3, image_size=32, partial_channels=k)
    supernet = supernet.to(device)
    if strategy == "darts1":
        module = DartsSearch(supernet, order=1)
        forward = supernet  # the softmax of the alphas: every candidate runs
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

        def forward(x):  # one sampled path
            with torch.no_grad():
                weights = module.controller.sample(torch.Generator().manual_seed(0)).weights
            return supernet(x, weights)

    module.manual_backward = lambda loss: loss.backward()  # no Trainer: plain autograd
    module.log = lambda *a, **k: None
    return step, forward, supernet


def activations_saved_mb(forward, x, parameters) -> float:
    """MB of the distinct tensors autograd keeps for the backward of one training forward, the
    parameters left out: the activations a step holds at its peak (DARTS keeps every
    candidate's, ENAS one path's)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in parameters}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    del out
    return round(sum(kept.values()) / 2**20, 1)


def run_one(
    space: str, strategy: str, batch: int, steps: int, warmup: int, threads: int, device: str
) -> dict:
    import torch

    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    step, forward, supernet = build(space, strategy, device)
    out = time_steps(step, batch, steps, warmup, device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    saved = activations_saved_mb(forward, x, supernet.parameters())
    params = supernet.num_weight_parameters()
    return {**out, "activations_saved_mb": saved, "supernet_weight_parameters": params}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mobilenet", nargs="+", default=["cpu", "paper"], choices=list(MOBILENET))
    parser.add_argument(
        "--strategies", nargs="+", default=["darts1", "enas"], choices=["darts1", "enas"]
    )
    parser.add_argument("--no-nb201", action="store_true", help="skip the NB201 reference")
    parser.add_argument("--partial", nargs="+", type=int, default=[1],
                        help="PC-DARTS K values for mobilenet (its same-width blocks; 1 = full channels)")  # fmt: skip
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
    spaces = [f"mobilenet-{m}" + (f"-pc{k}" if k > 1 else "") for m in args.mobilenet for k in args.partial]
    spaces += [] if args.no_nb201 else ["nb201"]
    configs = [(s, st) for s in spaces for st in args.strategies]
    runs = alternate(__file__, [f"{s}:{st}" for s, st in configs], args.rounds,
                     ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                      "--threads", str(args.threads), "--device", args.device])  # fmt: skip
    results = {(s, st): runs[f"{s}:{st}"] for s, st in configs}
    for (space, strategy), r in results.items():
        print(json.dumps({
            "bench": "model_space_step", "space": space, "strategy": strategy, "batch": args.batch, "image": 32,
            "supernet_weight_parameters": r["supernet_weight_parameters"],
            "median_step_s": round(statistics.median(r["times"]), 3), "n_steps": len(r["times"]),
            "peak_rss_mb": r["peak_rss_mb"], "activations_saved_mb": r["activations_saved_mb"], "threads": r["threads"],
            "device": args.device,
            **({"peak_gpu_mb": r["peak_gpu_mb"]} if "peak_gpu_mb" in r else {}),
        }))  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    main()
