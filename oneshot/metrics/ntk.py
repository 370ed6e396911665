"""Condition number of the empirical neural tangent kernel at initialisation (TE-NAS).

Chen, Gong, Wang, "Neural Architecture Search on ImageNet in Four GPU Hours: A Theoretically
Inspired Perspective", ICLR 2021, sec. 3.1: a network whose NTK is well conditioned (small
kappa = lambda_max / lambda_min) trains faster, so kappa at initialisation ranks architectures.

As the reference code (VITA-Group/TENAS, ``lib/procedures/ntk.py::get_ntk_n``) computes it:

* the model is in **train mode** and the batch goes through it **once, batched**, so every
  BatchNorm normalises with the statistics of this batch: the "per-sample" gradient of sample
  ``i`` is the gradient of the batched forward's ``sum_c logits[i, c]``, and it depends on every
  other sample through BN. That is the reference's quantity and our default; running statistics
  are left untouched (the model's buffers do not change);
* the Jacobian rows are taken w.r.t. the parameters whose name ends in ``weight`` (conv, linear
  and affine-BN weights; biases are not included, ``include_biases=True`` adds them), that
  require grad and that the forward uses, never architecture parameters;
* ``NTK = J J^T`` (N x N), kappa = largest / smallest eigenvalue.

Two ways to get the N rows of J, both exact and equal to round-off (tested):

* ``method="loop"``: one backward per sample through one retained graph, as the reference;
* ``method="vmap"``: ``torch.func.vjp`` of the batched forward, then ``vmap`` of the pullback
  over the N one-hot cotangents - all rows in one vectorised backward, still *of the batched
  forward* (vmapping the forward per sample would change BN's statistics, hence the metric).

The FLOPs are the same (N backward passes); vmap only saves per-op overhead. On a small-channel
CPU workload the loop is faster (functorch turns the batched conv backward into grouped convs,
see ``bench/tenas.py``), so it is the default; try ``vmap`` on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

_COLUMN_CHUNK = 1 << 18  # columns of J per float64 block when forming J J^T


def reinit_(
    model: nn.Module, mode: str = "fan_out", generator: torch.Generator | None = None
) -> nn.Module:
    """TE-NAS' initialisation (``prune_tenas.py::kaiming_normal_fan{in,out}_init``): Kaiming
    normal for conv/linear weights, zero biases, BN weight 1 and bias 0. The reference uses
    fan-out for the NTK network ("for backward") and fan-in for the linear-region network ("for
    forward"). Other parameters (e.g. architecture logits) are left alone.

    The released launcher passes ``init='kaiming_normal'``, which matches neither of
    ``init_model``'s names (``'kaiming_norm_fanin'``/``'_fanout'``), so that script silently keeps
    PyTorch's default init; we follow the evident intent, Kaiming normal."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu", generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Train mode with BN normalising by the batch's statistics, without updating running
    statistics: the metrics see the reference's train-mode network and leave no trace."""
    was_training = model.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [m.track_running_stats for m in bns]
    model.train()
    for m in bns:
        m.track_running_stats = False  # train mode + no tracking: batch stats, buffers untouched
    try:
        yield model
    finally:
        for m, t in zip(bns, tracking):
            m.track_running_stats = t
        model.train(was_training)


def ntk_parameters(
    model: nn.Module, include_biases: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """The parameters the NTK is taken over (see the module docstring)."""
    arch = {id(p) for p in model.arch_parameters()} if hasattr(model, "arch_parameters") else set()
    keep = ("weight", "bias") if include_biases else ("weight",)
    return [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in arch and name.rsplit(".", 1)[-1] in keep
    ]


def _summed_logits(out) -> torch.Tensor:
    if isinstance(out, tuple):  # (logits, auxiliary logits) of a DARTS network in train mode
        out = out[0]
    return out.flatten(1).sum(1) if out.dim() > 1 else out


def _gram(rows: list[torch.Tensor]) -> torch.Tensor:
    """``J J^T`` in float64 from J's column blocks ``[N, P_k]``, a bounded block at a time."""
    n = rows[0].shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=rows[0].device)
    for block in rows:
        for cols in block.reshape(n, -1).split(_COLUMN_CHUNK, dim=1):
            cols = cols.double()
            gram += cols @ cols.T
    return gram


def ntk_gram(
    model: nn.Module,
    inputs: torch.Tensor,
    forward_kwargs: dict | None = None,
    method: str = "loop",
    include_biases: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The empirical NTK ``J J^T`` (float64, N x N) of ``model(inputs, **forward_kwargs)`` as
    it is now (no re-initialisation). ``chunk_size`` bounds how many rows ``vmap`` computes at
    once (memory)."""
    kwargs = forward_kwargs or {}
    named = ntk_parameters(model, include_biases)
    n = inputs.shape[0]
    with batch_statistics(model):
        if method == "loop":
            out = _summed_logits(model(inputs, **kwargs))
            params = [p for _, p in named]
            grads = [
                torch.autograd.grad(out[i], params, retain_graph=i < n - 1, allow_unused=True)
                for i in range(n)
            ]
            # A parameter the forward does not use (a masked op) has no gradient: skip it.
            rows = [
                torch.stack([g[k] for g in grads])
                for k in range(len(params))
                if grads[0][k] is not None
            ]
        elif method == "vmap":
            params = {name: p.detach() for name, p in named}

            def summed(p):
                return _summed_logits(torch.func.functional_call(model, p, (inputs,), kwargs))

            _, pullback = torch.func.vjp(summed, params)
            eye = torch.eye(n, dtype=inputs.dtype, device=inputs.device)
            rows = list(torch.func.vmap(pullback, chunk_size=chunk_size)(eye)[0].values())
        else:
            raise ValueError(f"unknown NTK method {method!r}; valid: 'loop', 'vmap'")
    if not rows:
        return torch.zeros(n, n, dtype=torch.float64)
    return _gram(rows)


def condition_number(gram: torch.Tensor) -> float:
    """lambda_max / lambda_min of a symmetric PSD matrix, from ``eigvalsh`` in float64.

    A kernel with non-finite entries, a non-positive smallest eigenvalue (singular: two samples
    with the same gradient, or a network whose output ignores its weights) or an eigensolver
    failure has an unbounded condition number: ``inf`` is returned, never an exception. The
    reference would return a negative or NaN ratio there."""
    gram = gram.detach().double()
    if gram.numel() == 0 or not torch.isfinite(gram).all():
        return math.inf
    try:
        eig = torch.linalg.eigvalsh(gram)  # ascending
    except RuntimeError:  # torch.linalg.LinAlgError: did not converge
        return math.inf
    lo, hi = float(eig[0]), float(eig[-1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0:
        return math.inf
    return hi / lo


def ntk_condition_number(
    model: nn.Module,
    inputs: torch.Tensor,
    num_inits: int = 1,
    seed: int = 0,
    init: str | None = "fan_out",
    forward_kwargs: dict | None = None,
    method: str = "loop",
    include_biases: bool = False,
    chunk_size: int | None = None,
) -> float:
    """kappa of the NTK, averaged over ``num_inits`` seeded re-initialisations (TE-NAS: Kaiming
    normal fan-out, see ``reinit_``). ``init=None`` measures the model's current weights (then
    ``num_inits`` repeats the same number). The model is not modified: a copy is re-initialised.
    ``inf`` when one initialisation gives a singular or non-finite kernel."""
    if num_inits < 1:
        raise ValueError(f"num_inits must be >= 1, got {num_inits}")
    net = copy.deepcopy(model) if init is not None else model
    conds = []
    for i in range(num_inits):
        if init is not None:
            reinit_(net, init, torch.Generator(device=inputs.device).manual_seed(seed + i))
        conds.append(
            condition_number(
                ntk_gram(net, inputs, forward_kwargs, method, include_biases, chunk_size)
            )
        )
    return sum(conds) / len(conds)
