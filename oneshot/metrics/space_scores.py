"""Score many architectures of a space with several training-free metrics in one pass.

``score_space("nb201", archs, images, ["naswot", "synflow", ...], targets=labels)`` builds each
architecture's network once, initialises it once per seed (every proxy of the default init sees
the same weights), computes the four loss-based proxies from one shared gradient pass
(``loss_proxies``), and returns the scores per metric plus seconds per architecture. A rich
progress bar shows on a terminal; ``workers=N`` spreads the architectures over N processes
(each on one thread, the fastest use of a CPU for networks this small).

Batch sizes follow the papers on NAS-Bench-201: 128 images for NASWOT, 64 for the zero-cost-nas
proxies and Zen-score (capped at the images given); ``ntk``/``regions`` use TE-NAS' protocol on
NB201 (``tenas_score_nb201``: its own small networks, 72 images, 3,000 crops) and the space's
network otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch
from torch import nn

from oneshot.metrics.ensemble import direction
from oneshot.metrics.proxies import LOSS_PROXIES, PROXIES, loss_proxies

BATCH = {"naswot": 128}  # NASWOT's NB201 batch; every other proxy: DEFAULT_BATCH
DEFAULT_BATCH = 64  # zero-cost-nas' NB201 batch (nasbench2_pred.py)
METRICS = (*PROXIES, "ntk", "regions")


@dataclass
class SpaceScores:
    """``scores[metric][i]`` is architecture ``archs[i]``'s score; ``seconds[i]`` its time."""

    archs: list
    scores: dict[str, list[float]]
    seconds: list[float] = field(default_factory=list)


def build_network(space, arch, num_classes: int, in_channels: int, size: dict | None = None) -> nn.Module:
    """The network ``space`` stands for at ``arch``: NB201's benchmark network (C=16, N=5,
    the one its accuracies were trained on; ``size`` overrides C, N) for ``"nb201"``, else
    ``space(arch)``."""
    if space == "nb201":
        from oneshot.spaces.nb201 import nb201_network

        return nb201_network(arch, num_classes=num_classes, in_channels=in_channels, **(size or {}))
    if callable(space):
        return space(arch)
    raise ValueError(f"unknown space {space!r}; valid: 'nb201' or a callable arch -> nn.Module")


def check_metrics(metrics: Sequence[str]) -> list[str]:
    """The metric names, each checked (one clear error naming the bad one and the valid ones)."""
    if isinstance(metrics, str) or not metrics:
        raise ValueError(f"metrics must be a non-empty list of names; valid: {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; valid: {', '.join(METRICS)}")
        direction(m)
    return list(metrics)


def score_arch(space, arch, inputs: torch.Tensor, targets: torch.Tensor | None, metrics: Sequence[str],
               seed: int = 0, num_classes: int = 10, tenas_inits: int = 1, size: dict | None = None) -> dict[str, float]:  # fmt: skip
    """Every metric of one architecture (see the module docstring for the shared work)."""
    out: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # building draws PyTorch's init; every proxy re-initialises anyway
        net = build_network(space, arch, num_classes, inputs.shape[1], size)
    lossy = [m for m in metrics if m in LOSS_PROXIES]
    if lossy:
        b = DEFAULT_BATCH
        out.update(loss_proxies(net, inputs[:b], targets[:b] if targets is not None else None, lossy, seed=seed))
    for m in metrics:
        if m in LOSS_PROXIES:
            continue
        if m in PROXIES:
            out[m] = PROXIES[m](net, inputs[: BATCH.get(m, DEFAULT_BATCH)], targets, seed=seed)
        elif space == "nb201":  # TE-NAS' own protocol and networks, both metrics at once
            if "ntk" not in out:
                from oneshot.metrics import tenas_score_nb201

                out.update(tenas_score_nb201(arch, inputs, num_inits=tenas_inits, seed=seed,
                                             ntk_batch=min(72, len(inputs)), num_classes=num_classes))  # fmt: skip
        elif m == "ntk":
            from oneshot.metrics.ntk import ntk_condition_number

            out[m] = ntk_condition_number(net, inputs[:72], tenas_inits, seed)
        else:
            from oneshot.metrics.regions import linear_regions

            out[m] = linear_regions(net, inputs, tenas_inits, seed)
    return {m: out[m] for m in metrics}


def _score_chunk(space, archs, inputs, targets, metrics, seed, num_classes, tenas_inits, threads, size):
    torch.set_num_threads(threads)
    rows = []
    for arch in archs:
        start = time.perf_counter()
        row = score_arch(space, arch, inputs, targets, metrics, seed, num_classes, tenas_inits, size)
        rows.append((row, time.perf_counter() - start))
    return rows


def score_space(space: str | Callable, archs: Sequence, inputs: torch.Tensor, metrics: Sequence[str],
                targets: torch.Tensor | None = None, *, seed: int = 0, num_classes: int = 10,
                workers: int = 0, chunk: int = 4, progress: bool = True, tenas_inits: int = 1,
                threads: int = 1, size: dict | None = None, callback: Callable | None = None) -> SpaceScores:  # fmt: skip
    """Score ``archs`` of ``space`` ("nb201", or a callable ``arch -> nn.Module``) with
    ``metrics`` (names in ``METRICS``) on ``inputs`` (real images, normalised) and ``targets``
    (their labels: the loss-based proxies need them). ``workers=0`` runs in this process;
    ``workers=N`` in N worker processes, ``chunk`` architectures at a time (``space`` must then
    be picklable). Results do not depend on ``workers``. ``size``: NB201's ``{"C", "N"}``.
    ``callback(arch, scores, seconds)`` is called as each architecture's scores arrive (to save
    them as they come: a long run that stops keeps what it did)."""
    metrics = check_metrics(metrics)
    if any(m in LOSS_PROXIES for m in metrics) and targets is None:
        raise ValueError(f"{', '.join(m for m in metrics if m in LOSS_PROXIES)} need targets (the images' labels)")
    archs = list(archs)
    chunks = [archs[i : i + chunk] for i in range(0, len(archs), chunk)]
    args = (inputs, targets, metrics, seed, num_classes, tenas_inits, threads, size)
    results: list = [None] * len(chunks)
    with _bar(progress, len(archs)) as advance:
        if workers and workers > 0:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(_score_chunk, space, c, *args): i for i, c in enumerate(chunks)}
                for f in as_completed(futures):
                    results[futures[f]] = f.result()
                    _report(callback, chunks[futures[f]], results[futures[f]])
                    advance(len(results[futures[f]]))
        else:
            before = torch.get_num_threads()
            try:
                for i, c in enumerate(chunks):
                    results[i] = _score_chunk(space, c, *args)
                    _report(callback, c, results[i])
                    advance(len(c))
            finally:
                torch.set_num_threads(before)
    rows = [r for chunk_rows in results for r in chunk_rows]
    return SpaceScores(
        archs, {m: [row[m] for row, _ in rows] for m in metrics}, [s for _, s in rows]
    )


def _report(callback, archs, rows) -> None:
    if callback is not None:
        for arch, (row, seconds) in zip(archs, rows):
            callback(arch, row, seconds)


class _bar:
    """A rich progress bar on a terminal (stderr); nothing when piped or disabled."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.progress = enabled and sys.stderr.isatty(), total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True), transient=True)
        self.progress.start()
        task = self.progress.add_task("scoring architectures", total=self.total)
        return lambda n=1: self.progress.advance(task, n)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
