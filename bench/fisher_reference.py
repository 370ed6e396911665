"""Why our fisher ranks NAS-Bench-201 better than zero-cost-nas published: prints JSON lines.

Needs a checkout of the authors' code (``git clone https://github.com/SamsungLabs/zero-cost-nas``),
imported from ``--zero-cost-nas DIR``; nothing of it is copied here. Two measurements:

* ``same_network``: on ``--check`` random cells, our ``fisher`` against the authors'
  ``compute_fisher_per_weight`` (``foresight/pruners/measures/fisher.py``, summed as their
  ``find_measures`` sums it) on the same network (NB201's benchmark network, ours), the same
  weights and the same 64 CIFAR-10 images: the largest relative difference.
* ``rho``: Spearman rho against the table's CIFAR-10 test accuracy on ``--cells`` seeded cells of
  our fisher, of the authors' fisher on *their* NB201 network (``foresight/models/nasbench2.py``:
  its cells' convs have biases and non-affine BN; NB201's own network has neither bias), and on
  their network with the cells' conv biases set to zero.

    .venv/bin/python bench/fisher_reference.py --zero-cost-nas ../zero-cost-nas --cells 200
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from proxies import DATA, load_images, load_table  # bench/ is this script's directory


def reference_fisher(fisher_module, net, x, y) -> float:
    grads = fisher_module.compute_fisher_per_weight(net, x, y, F.cross_entropy, "channel")
    return float(sum(g.sum() for g in grads))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zero-cost-nas", type=Path, required=True, help="a checkout of SamsungLabs/zero-cost-nas")
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--check", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    sys.path.insert(0, str(args.zero_cost_nas))
    warnings.filterwarnings("ignore")  # the authors' module backward hooks are deprecated in torch
    import foresight.pruners.measures.fisher as theirs
    from foresight.models.nasbench2 import get_model_from_arch_str
    from scipy.stats import spearmanr

    from oneshot.metrics.proxies import loss_proxies, reinit_copy
    from oneshot.metrics.space_scores import build_network, score_arch

    torch.set_num_threads(1)
    x, y = load_images(args.data / "cifar10_sample.npz")
    x, y = x[:64], y[:64]  # the batch every loss-based proxy scores (zero-cost-nas: 64)
    table = load_table(args.data / "nb201_accuracy.csv")
    rng = random.Random(args.seed)
    archs = rng.sample(sorted(table), args.cells)

    worst = 0.0
    for arch in archs[: args.check]:
        torch.manual_seed(0)
        net = build_network("nb201", arch, 10, 3)
        ours = loss_proxies(net, x, y, ("fisher",), seed=0)["fisher"]
        ref = reference_fisher(theirs, reinit_copy(net, "default", 0, x.device), x, y)
        worst = max(worst, abs(ours - ref) / max(abs(ref), 1e-30))
    print(json.dumps({"bench": "same_network", "cells": args.check, "max_relative_difference": worst}), flush=True)

    scores = {"ours": [], "theirs_network": [], "theirs_network_no_cell_conv_bias": []}
    for arch in archs:
        scores["ours"].append(score_arch("nb201", arch, x, y, ["fisher"], seed=0)["fisher"])
        for key, zero_bias in (("theirs_network", False), ("theirs_network_no_cell_conv_bias", True)):
            torch.manual_seed(0)
            net = get_model_from_arch_str(arch, 10).get_prunable_copy(bn=True)  # as their measure copies it
            if zero_bias:
                with torch.no_grad():
                    for m in net.modules():
                        if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                            m.bias.zero_()
            scores[key].append(reference_fisher(theirs, net, x, y))
    accuracy = [table[a]["cifar10"] for a in archs]
    rho = {k: round(float(spearmanr(v, accuracy)[0]), 3) for k, v in scores.items()}
    print(json.dumps({"bench": "rho", "cells": args.cells, "seed": args.seed, "target": "cifar10_test", **rho}), flush=True)


if __name__ == "__main__":
    main()
