"""NNI 3.0's side of ``bench/vs_nni.py``; runs under the NNI venv's python, never imports oneshot.

Builds NNI's hub space (``NasBench201`` or ``DARTS``), turns it into a supernet with
``nni.nas.strategy.DARTS`` and trains it with NNI's own ``DartsLightningModule`` around NNI's
``ClassificationModule`` in a real Lightning ``Trainer``: the step timed is exactly NNI's
``training_step`` (architecture step on the val batch, weight step on the train batch, grad clip,
optimizer steps, metric logging). Prints one JSON line: per-step times and peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import json

from trainer_timing import timed_fit  # bench/ is on sys.path when run as a script


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--space", choices=["nb201", "darts"], required=True)
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--cells", type=int, default=5, help="NB201: cells per stage; DARTS: cells")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()

    import torch
    from nni.nas.evaluator.pytorch import ClassificationModule
    from nni.nas.hub.pytorch import DARTS, NasBench201
    from nni.nas.strategy import DARTS as DartsStrategy

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.space == "nb201":
        space = NasBench201(stem_out_channels=args.C, num_modules_per_stack=args.cells, num_labels=10)
    else:
        space = DARTS(width=args.C, num_cells=args.cells, dataset="cifar")
    strategy = DartsStrategy(gradient_clip_val=5.0)
    supernet = strategy.mutate_model(space)
    # DARTS' weight optimiser (SGD 0.025, momentum 0.9, wd 3e-4), as our side uses.
    module = ClassificationModule(
        learning_rate=0.025, weight_decay=3e-4, optimizer=functools.partial(torch.optim.SGD, momentum=0.9),
        num_classes=10,
    )
    module.set_model(supernet)
    oneshot = strategy.configure_oneshot_module(module)

    result = timed_fit(oneshot, args.batch, args.steps, args.warmup)
    print(json.dumps({**result, "torch": torch.__version__,
                      "params": sum(p.numel() for p in supernet.parameters())}))


if __name__ == "__main__":
    main()
