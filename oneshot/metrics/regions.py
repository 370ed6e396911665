"""Number of linear regions a ReLU network cuts its input into, at initialisation (TE-NAS).

Chen, Gong, Wang, ICLR 2021, sec. 3.2 (after Xiong et al., "On the number of linear regions of
convolutional neural networks", ICML 2020): a ReLU network is piecewise linear, each piece
being the set of inputs that share one on/off pattern of all ReLUs; more distinct patterns over
the data means a more expressive network.

As the reference counts them (VITA-Group/TENAS, ``lib/procedures/linear_region_counter.py``):
a forward hook on every ``nn.ReLU`` records ``output > 0`` per unit (the same as ``input > 0``,
and safe with ``inplace=True``: the hook reads the output right after the ReLU wrote it); the
per-sample patterns of all ReLUs are flattened and concatenated, and the number of distinct
rows over the inputs is the count. The model runs in train mode under ``no_grad`` in batches
of ``batch_size`` (1,000 in the reference, three batches for its 3,000 inputs), BN normalising
with each batch's statistics. ReLUs called as functions (``F.relu``) are not seen. The
reference's filter to 4-D ReLU inputs excludes nothing in its networks and is not kept, so
the count also works for MLPs.

The reference protocol counts on a thin copy of the network (one channel, one cell, no stem)
over 3,000 single-channel 3x3 crops of real images (``random_crops``); see
``oneshot.metrics.tenas_score_nb201`` and ``oneshot.prune``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from oneshot.metrics.ntk import batch_statistics, reinit_


@torch.no_grad()
def activation_patterns(
    model: nn.Module,
    inputs: torch.Tensor,
    batch_size: int = 1000,
    forward_kwargs: dict | None = None,
) -> torch.Tensor:
    """``[n_inputs, n_units]`` booleans: which ReLU units are on for each input."""
    kwargs, seen = forward_kwargs or {}, []

    def record(module, args, output):
        seen.append((output > 0).flatten(1))

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.ReLU)]
    patterns = []
    try:
        with batch_statistics(model):
            for chunk in inputs.split(batch_size):
                seen.clear()
                model(chunk, **kwargs)
                patterns.append(
                    torch.cat(seen, 1) if seen else chunk.new_zeros(len(chunk), 0, dtype=torch.bool)
                )
    finally:
        for h in handles:
            h.remove()
    return torch.cat(patterns)


def count_unique_rows(patterns: torch.Tensor) -> int:
    """Distinct rows of a boolean matrix (the reference gets the same number from a Hamming
    distance matrix in half precision; ``unique`` is exact and needs no N x N matrix)."""
    if patterns.shape[0] == 0:
        return 0
    if patterns.shape[1] == 0:
        return 1
    return int(torch.unique(patterns.to(torch.uint8), dim=0).shape[0])


def linear_regions(
    model: nn.Module,
    inputs: torch.Tensor,
    num_inits: int = 1,
    seed: int = 0,
    init: str | None = "fan_in",
    batch_size: int = 1000,
    forward_kwargs: dict | None = None,
) -> float:
    """Distinct activation patterns over ``inputs``, averaged over ``num_inits`` seeded
    re-initialisations (Kaiming normal fan-in, the reference's init for this metric;
    ``init=None`` counts with the current weights). The model is not modified."""
    if num_inits < 1:
        raise ValueError(f"num_inits must be >= 1, got {num_inits}")
    net = copy.deepcopy(model) if init is not None else model
    counts = []
    for i in range(num_inits):
        if init is not None:
            reinit_(net, init, torch.Generator(device=inputs.device).manual_seed(seed + i))
        counts.append(
            count_unique_rows(activation_patterns(net, inputs, batch_size, forward_kwargs))
        )
    return sum(counts) / len(counts)


def random_crops(images: torch.Tensor, n: int = 3000, size: int = 3, seed: int = 0) -> torch.Tensor:
    """``[n, 1, size, size]`` crops, each from a random image, channel and position (seeded):
    the reference's ``RandomCrop(3)`` + ``RandChannel(1)`` over the training set."""
    N, C, H, W = images.shape
    if H < size or W < size:
        raise ValueError(f"images of {H}x{W} are smaller than {size}x{size} crops")
    g = torch.Generator().manual_seed(seed)
    img, ch = torch.randint(N, (n,), generator=g), torch.randint(C, (n,), generator=g)
    top, left = (
        torch.randint(H - size + 1, (n,), generator=g),
        torch.randint(W - size + 1, (n,), generator=g),
    )
    offset = torch.arange(size)
    rows, cols = (top[:, None] + offset)[:, :, None], (left[:, None] + offset)[:, None, :]
    idx = [t.to(images.device) for t in (img[:, None, None], ch[:, None, None], rows, cols)]
    return images[idx[0], idx[1], idx[2], idx[3]].unsqueeze(1)
