"""TE-NAS warm start: prune the supernet training-free, then search the smaller one.

``warmstart=tenas warmstart.keep=K`` runs TE-NAS' prune-by-importance (``oneshot.prune``; Chen,
Gong, Wang, ICLR 2021) on real training images of the configured datamodule until K ops per
edge remain, then DARTS or ENAS searches a supernet built with only those ops (``candidates=``):
pruned ops have no parameters and no compute, and the alphas cover only the survivors.
``strategy=tenas`` (``lightning_modules/tenas.py``) runs the same prune to one op per edge.
In the DARTS space K >= 2: at K=1 TE-NAS also chooses two inputs per node, which a supernet of
one op per edge cannot carry to the search (``DARTS_KEEP_1``); that result is ``strategy=tenas``.

Every DDP rank runs this before the Trainer (and its process group) exists, so the ranks cannot
compare notes; they agree because the decision is a deterministic function of (seed, data,
options): the images are a seeded draw from the seed's weight/architecture split, every random
initialisation comes from a ``torch.Generator`` seeded by (seed, round, repeat), the metric
networks run on the CPU with a fixed thread count (``threads``: the same reduction order on
every rank), changes are rounded to ``precision`` decimals before ranking, and ties break by a
fixed order. The global RNG is restored afterwards, so the search that follows is seeded the
same with or without a warm start. Each rank logs a fingerprint of its survivors, and where a
process group does exist (a user's own launcher) rank 0's survivors are broadcast.

Writes ``<stem>.json`` (options, survivors, timings, the whole history) and ``<stem>.csv`` (one
row per candidate per round: both metrics, their changes and ranks) into the run directory.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from oneshot.lightning_modules.runs import atomic_write_json, atomic_write_text
from pytorch_lightning.utilities import rank_zero_only

from oneshot.data import BatchTransform
from oneshot.prune import (
    PruneResult,
    PruneRow,
    TenasSpace,
    check_keep,
    darts_space,
    nb201_space,
    prune,
)
from oneshot.spaces import DartsSupernet, NB201Network

log = logging.getLogger("oneshot")


@dataclass(frozen=True)
class PruneOptions:
    """The prune's options, as ``conf/warmstart/tenas.yaml`` and ``conf/strategy/tenas.yaml``
    document them; ``None`` means the space's reference value."""

    seed: int = 0
    num_inits: int = 3
    n_crops: int = 3000
    crop_size: int = 3
    ntk_batch: int | None = None
    ops_per_round: int | None = None
    precision: int = 3
    method: str = "loop"
    images: int = 3000
    threads: int = 1
    progress: bool = True
    networks: dict = field(default_factory=dict)
    # Issue 18: what the prune ranks by, rank sums over any of oneshot.metrics.HIGHER_IS_BETTER.
    metrics: list = field(default_factory=lambda: ["ntk", "regions"])

    @classmethod
    def from_config(cls, options: dict | DictConfig, group: str) -> PruneOptions:
        if isinstance(options, DictConfig):
            options = OmegaConf.to_container(options, resolve=True)
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown {group} option(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
            )
        return cls(**options)


def tenas_space_of(supernet, num_classes: int, in_channels: int, networks: dict) -> TenasSpace:
    """TE-NAS' view of ``supernet``: its candidates (and DARTS' steps and multiplier) on the
    metric networks, sized by ``networks[space]`` (the reference's sizes by default)."""
    cands = {t: supernet.candidates[t] for t in supernet.cell_types}
    common = {"num_classes": num_classes, "in_channels": in_channels, "candidates": cands}
    if isinstance(supernet, NB201Network):
        return nb201_space(**{"C": 3, "N": 1, **(networks.get("nb201") or {})}, **common)
    if isinstance(supernet, DartsSupernet):
        sizes = {"C": 1, "stem_multiplier": 1, **(networks.get("darts") or {})}
        return darts_space(steps=supernet.steps, multiplier=supernet.multiplier, **sizes, **common)
    from oneshot.spaces.model import ModelSpace, tenas_space

    if isinstance(supernet, ModelSpace):  # issue 15: the user's model itself, on real images
        return tenas_space(supernet, num_classes, in_channels, **(networks.get("model") or {}))
    raise ValueError(f"TE-NAS prunes the nb201, darts and model spaces, not {type(supernet).__name__}")


def training_labels(datamodule, n: int, seed: int) -> torch.Tensor:
    """The labels of ``training_images(datamodule, n, seed)``, in the same order (issue 18: the
    loss-based proxies need them)."""
    pool = datamodule.weight_set
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.as_tensor(pool.y[idx]).long()


def training_images(datamodule, n: int, seed: int) -> torch.Tensor:
    """``n`` real images (seeded) of the search split's weight part, normalised as for training
    and not augmented: TE-NAS measures on training data, never on the held-out test set."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    pool, splits = datamodule.weight_set, datamodule.splits
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return BatchTransform(splits.mean, splits.std)((pool.x[idx], pool.y[idx]))[0]


@contextlib.contextmanager
def _fixed_threads(n: int):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finite(value):
    """JSON has no infinities: a singular NTK's kappa is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _write_history(run_dir: Path, stem: str, result: PruneResult, report: dict, options) -> None:
    rows = [asdict(r) for r in result.history]
    names = [f.name for f in fields(PruneRow)]
    if result.extra:  # issue 18: the other metrics' value, change and rank columns
        rows = [{**r, **x} for r, x in zip(rows, result.extra)]
        names += list(result.extra[0])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / f"{stem}.csv", buffer.getvalue())
    history = [{k: _finite(v) for k, v in r.items()} for r in rows]
    atomic_write_json(
        run_dir / f"{stem}.json", {**report, "options": asdict(options), "history": history}
    )


# One op per edge leaves a DARTS supernet nothing to search on an edge, and TE-NAS' choice of
# inputs (made only at keep=1) cannot be handed over: the alphas of one op get no gradient and
# derivation would wire every node to inputs 0 and 1. TE-NAS' own answer is strategy=tenas.
DARTS_KEEP_1 = (
    "; keep=1 would leave one op per edge for the search and drop TE-NAS' choice of two inputs "
    "per node: for TE-NAS' own one-op genotype run strategy=tenas space=darts"
)


def check_warmstart_keep(keep, supernet, networks: dict | None = None) -> None:
    """``warmstart.keep`` must be in ``1..`` the candidates per edge on NB201, ``2..`` on DARTS."""
    space = tenas_space_of(supernet, 10, 3, networks or {})
    darts = isinstance(supernet, DartsSupernet)
    check_keep(keep, space, "warmstart.keep", 2 if darts else 1, DARTS_KEEP_1 if darts else "")


def _in_supernet_order(survivors: dict, supernet) -> dict:
    """Each edge's survivors in the supernet's own op order (the prune visits ops in the
    reference's), so the smaller supernet lists its ops as the configured one did."""
    return {
        t: [
            tuple(op for op in supernet.candidates[t][e] if op in kept)
            for e, kept in enumerate(edges)
        ]
        for t, edges in survivors.items()
    }


def run_prune(supernet, datamodule, keep: int, options: PruneOptions, run_dir: Path, stem: str,
              group: str, budget: tuple | None = None) -> tuple[PruneResult, dict]:  # fmt: skip
    """Prune ``supernet``'s space to ``keep`` ops per edge on the datamodule's training images;
    write ``<stem>.json``/``.csv`` (rank 0); return the result and a small report. ``group``:
    the config group of the options, for error messages. ``budget`` (issue 17): ``(cost model,
    budget.max)``, so no pruned supernet's cheapest architecture is over budget (``prune``)."""
    info = datamodule.info
    space = tenas_space_of(supernet, info.num_classes, info.in_channels, options.networks)
    check_keep(keep, space, f"{group}.keep")  # before any data is loaded
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _fixed_threads(options.threads):
        images = training_images(datamodule, options.images, options.seed)
        ntk_batch = options.ntk_batch or space.ntk_batch
        if len(images) < ntk_batch:
            raise ValueError(
                f"the NTK batch needs {ntk_batch} training images, got {len(images)} "
                f"({group}.images={options.images}): lower {group}.ntk_batch or use more images"
            )
        result = prune(
            space, images, keep, num_inits=options.num_inits, seed=options.seed, ntk_batch=ntk_batch,
            n_crops=options.n_crops, crop_size=options.crop_size, ops_per_round=options.ops_per_round,
            precision=options.precision, method=options.method,
            progress=options.progress and rank_zero_only.rank == 0, metrics=list(options.metrics),
            targets=_labels_if_needed(datamodule, options), budget=budget,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    if dist.is_available() and dist.is_initialized():  # a group exists already: rank 0 decides
        shared = [result]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
    result = replace(result, survivors=_in_supernet_order(result.survivors, supernet))
    survivors = {t: [list(ops) for ops in edges] for t, edges in result.survivors.items()}
    fingerprint = hashlib.sha256(json.dumps(survivors, sort_keys=True).encode()).hexdigest()[:12]
    report = {
        "method": "tenas",
        "metrics": list(options.metrics),
        "keep": keep,
        "seconds": round(seconds, 2),
        "rounds": 1 + max((r.round for r in result.history), default=-1),
        "evaluations": len(result.history),
        "survivors": survivors,
        "genotype": None if result.genotype is None else str(result.genotype),
        "fingerprint": fingerprint,
    }
    log.info(
        "TE-NAS (rank %d): %d ops per edge kept in %.1f s over %d rounds, fingerprint %s",
        rank_zero_only.rank, keep, seconds, report["rounds"], fingerprint,
    )  # fmt: skip
    if rank_zero_only.rank == 0:
        _write_history(Path(run_dir), stem, result, report, options)
    return result, report


def _labels_if_needed(datamodule, options):
    from oneshot.metrics.proxies import LOSS_PROXIES

    if any(m in LOSS_PROXIES for m in options.metrics):
        return training_labels(datamodule, options.images, options.seed)
    return None


def run_warmstart(cfg: DictConfig, datamodule, run_dir: Path) -> tuple[dict, dict]:
    """Prune the configured space to ``warmstart.keep`` ops per edge; return the survivors (the
    ``candidates=`` of the search supernet) and the report for ``report.json``."""
    from oneshot.lightning_modules.pipeline import build_supernet  # the pipeline imports us lazily

    opts = OmegaConf.to_container(cfg.warmstart, resolve=True)
    opts.pop("enabled", None)
    keep = opts.pop("keep", None)
    options = PruneOptions.from_config(opts, "warmstart")
    with torch.device("meta"):  # the structure only: no memory, no initialisation
        supernet = build_supernet(cfg, datamodule.info)
    check_warmstart_keep(keep, supernet, options.networks)  # before any data is loaded
    budget = None
    if OmegaConf.select(cfg, "budget.max", default=None) is not None:
        # Issue 17: the warm start never leaves a supernet whose cheapest architecture is over
        # budget; the costs come from the full supernet (a real one: latency is measured on it).
        from oneshot.cost.budget import budget_from_cfg

        penalty = budget_from_cfg(cfg, build_supernet(cfg, datamodule.info), datamodule.info)
        budget = (penalty.cost, penalty.max)
    result, report = run_prune(
        supernet, datamodule, keep, options, run_dir, "warmstart", "warmstart", budget=budget
    )
    return result.survivors, report
