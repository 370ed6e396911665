"""``build_cost_model``: parameters and FLOPs counted exactly, latency measured per candidate.

Parameters: ``sum(p.numel())`` of each candidate module and of the fixed part. FLOPs:
``torch.utils.flop_counter.FlopCounterMode`` on each candidate's recorded input at batch 1 (a
FLOP count per image; the counter counts 2 FLOPs per multiply-add of convolutions and matrix
products, and nothing for element-wise ops, pooling and normalisation). Latency: every distinct
candidate (module and input shape) timed in its place by ``oneshot.latency.measure_latency`` at
``batch_size`` on ``device``, with a progress bar, and kept in a JSON cache keyed by device
name, torch version, space structure, shapes, batch size, threads, dtype, warm-up/repeats and
calibration, so a second search on the same machine measures nothing. ``table=path`` reads a
table measured elsewhere (on the target device) and refuses one of another space, shape, batch
size or device kind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from oneshot.cost.model import UNITS, CostModel
from oneshot.cost.probe import Probe, probe_space
from oneshot.latency import device_name, measure_latency

METRICS = tuple(UNITS)
#: Candidates timed by this process (tests read it: a cache hit times nothing).
MEASUREMENTS = {"count": 0}


def _batched(obj, batch_size: int, device):
    if isinstance(obj, torch.Tensor):
        fmt = (
            torch.channels_last
            if obj.dim() == 4 and obj.is_contiguous(memory_format=torch.channels_last)
            else None
        )
        out = obj.expand(batch_size, *obj.shape[1:]).clone() if batch_size != obj.shape[0] else obj
        out = out.to(device)
        return out.contiguous(memory_format=fmt) if fmt is not None else out.contiguous()
    if isinstance(obj, list | tuple):
        return type(obj)(_batched(o, batch_size, device) for o in obj)
    return obj


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: torch.nn.Module, inputs: tuple) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def _structure(probe: Probe, input_shape) -> str:
    """A digest of what is measured: every entry's module and input shapes, the fixed part."""
    items = [[list(k), [e.key for e in v]] for k, v in sorted(probe.entries.items())]
    text = json.dumps([probe.space, list(input_shape), items, repr(probe.fixed)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _assemble(probe: Probe, metric: str, entry_cost, fixed: float, meta: dict) -> CostModel:
    per_choice = {}
    for t, rows in probe.candidates.items():
        table = torch.zeros(len(rows), len(rows[0]), dtype=torch.float64)
        for e, row in enumerate(rows):
            for k in range(len(row)):
                table[e, k] = sum(entry_cost(entry) for entry in probe.entries.get((t, e, k), []))
        per_choice[t] = table
    return CostModel(metric, UNITS[metric], float(fixed), per_choice,
                     {t: [tuple(r) for r in rows] for t, rows in probe.candidates.items()}, meta)  # fmt: skip


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path("~/.cache").expanduser()
    return Path(root) / "oneshot" / "cost"


def build_cost_model(supernet, metric: str, *, input_shape, network=None, num_classes=None, device="cpu",
                     batch_size: int = 1, threads: int | None = None, table=None, cache_dir=None,
                     progress: bool = True, warmup: int = 10, repeats: int = 50, calibrate: int = 0) -> CostModel:  # fmt: skip
    """The cost model of ``supernet``'s space for ``metric`` (latency | flops | params), with the
    candidates at the deployed sizes ``network`` (``space.network``'s ``C``/``N``/``layers``;
    default: the supernet's own). ``input_shape``: one image's ``(channels, height, width)``.
    ``calibrate=K`` (latency): also time K random whole networks and scale the table by the
    median measured/predicted ratio (see ``_calibrate``)."""
    if metric not in METRICS:
        raise ValueError(
            f"budget.metric={metric} is not a cost metric; valid: {', '.join(METRICS)}"
        )
    # The probe builds modules and draws inputs: on a forked RNG, so a search with a cost model
    # draws exactly what it draws without one (a loose budget changes nothing, bit for bit).
    with torch.random.fork_rng(devices=[]):
        return _build(supernet, metric, input_shape, network, num_classes, device, batch_size, threads, table,
                      cache_dir, progress, warmup, repeats, calibrate)  # fmt: skip


def _build(supernet, metric, input_shape, network, num_classes, device, batch_size, threads, table, cache_dir,
           progress, warmup, repeats, calibrate=0) -> CostModel:  # fmt: skip
    probe = probe_space(supernet, input_shape, network, num_classes)
    meta = {"space": probe.space, "structure": _structure(probe, input_shape), "input_shape": list(input_shape),
            **probe.meta, "torch": torch.__version__, "dtype": "float32"}  # fmt: skip
    if metric == "params":
        return _assemble(
            probe,
            metric,
            lambda e: count_params(e.module) / 1e6,
            count_params(probe.fixed) / 1e6,
            meta,
        )
    if metric == "flops":
        return _assemble(probe, metric, lambda e: count_flops(e.module, e.inputs) / 1e6,
                         count_flops(probe.fixed, probe.fixed_inputs) / 1e6, meta)  # fmt: skip
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    meta.update(
        device=device.type,
        device_name=device_name(device),
        batch_size=int(batch_size),
        threads=int(threads),
    )
    if table is not None:
        return load_table(table, meta)
    meta.update(calibrate=int(calibrate), warmup=int(warmup), repeats=int(repeats))
    key = {
        k: meta[k]
        for k in (
            "space",
            "structure",
            "device",
            "device_name",
            "torch",
            "dtype",
            "batch_size",
            "threads",
            "calibrate",
            "warmup",
            "repeats",
        )
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (
        Path(cache_dir or default_cache_dir()).expanduser() / f"latency-{probe.space}-{digest}.json"
    )
    if path.is_file():
        try:
            cached = CostModel.from_json(json.loads(path.read_text()))
            if all(cached.meta.get(k) == v for k, v in key.items()):
                cached.meta.update(cache="hit", cache_file=str(path))
                return cached
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file is measured again and rewritten
    timings = _measure(probe, device, batch_size, threads, warmup, repeats, progress)
    model = _assemble(probe, metric, lambda e: timings[e.key], timings["<fixed>"],
                      {**meta, "warmup": warmup, "repeats": repeats})  # fmt: skip
    if calibrate:
        _calibrate(model, supernet, int(calibrate), device, warmup, repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(model.to_json()))
    tmp.replace(path)  # atomic: a concurrent search reads the old file or the new one
    model.meta.update(cache="miss", cache_file=str(path))
    return model


def _measure(
    probe: Probe, device, batch_size, threads, warmup, repeats, progress
) -> dict[str, float]:
    """Median latency (ms) of every distinct entry and of the fixed part."""
    from rich.progress import Progress

    todo = {}
    for entries in probe.entries.values():
        for e in entries:
            todo.setdefault(e.key, e)
    out = {}
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"latency table ({probe.space}, {device.type})", total=len(todo) + 1)
        for key, entry in [*todo.items(), ("<fixed>", None)]:
            module, inputs = (
                (probe.fixed, probe.fixed_inputs) if entry is None else (entry.module, entry.inputs)
            )
            module = module.to(device).eval()
            timing = measure_latency(module, _batched(inputs, batch_size, device), warmup=warmup, repeats=repeats,
                                     device=device, threads=threads)  # fmt: skip
            MEASUREMENTS["count"] += 1
            out[key] = timing["median_ms"]
            bar.advance(task)
    return out


def load_table(path, meta: dict) -> CostModel:
    """A latency table measured elsewhere, refused (one line) unless it is of this space and
    shape, batch size and device kind; its device name may differ (that is what it is for)."""
    where = f"cost.table={path}"
    try:
        model = CostModel.from_json(json.loads(Path(path).expanduser().read_text()))
    except FileNotFoundError:
        raise ValueError(
            f"{where}: no such file; valid: a latency-*.json table written by a search's cost cache"
        ) from None
    except (ValueError, KeyError, TypeError, OSError):
        raise ValueError(
            f"{where} is not a oneshot latency table (latency-*.json of a search's cost cache)"
        ) from None
    got = model.meta
    if model.metric != "latency":
        raise ValueError(f"{where} is a {model.metric} table; valid: a latency table")
    for k, what in (("space", "space"), ("structure", "space structure and sizes"), ("input_shape", "input shape"),
                    ("device", "device kind"), ("batch_size", "batch size")):  # fmt: skip
        if got.get(k) != meta.get(k):
            raise ValueError(f"{where} was measured for another {what} ({k}={got.get(k)}) than this search's "
                             f"({k}={meta.get(k)}); valid: a table of space {meta['space']} with these sizes, "
                             f"input {meta['input_shape']}, cost.device={meta['device']}, "
                             f"cost.batch_size={meta['batch_size']}")  # fmt: skip
    model.meta.update(cache="table", cache_file=str(path))
    return model


def additive_error(
    cost: CostModel, genotype, network: torch.nn.Module, *, warmup=None, repeats=None
) -> dict:
    """How far the additive latency model is from the measured latency of the fixed network of
    ``genotype``: ``|table - measured| / measured``, measured by the table's own protocol."""
    meta = cost.meta
    device = torch.device(meta.get("device", "cpu"))
    x = torch.randn(int(meta.get("batch_size", 1)), *meta["input_shape"], device=device)
    measured = measure_latency(network.to(device).eval(), (x,), warmup=warmup or meta.get("warmup", 10),
                               repeats=repeats or meta.get("repeats", 50), device=device,
                               threads=meta.get("threads"))["median_ms"]  # fmt: skip
    predicted = cost.of_genotype(genotype)
    return {
        "table_ms": predicted,
        "measured_ms": measured,
        "error": abs(predicted - measured) / measured,
    }


def _calibrate(model: CostModel, supernet, k: int, device, warmup: int, repeats: int) -> None:
    """Scale the table so it predicts whole networks: time ``k`` random architectures' networks
    (the same protocol) and multiply the fixed part and every choice by the median of measured /
    predicted. Candidates timed alone run with their weights and buffers hot in cache; in a
    network they do not, so the plain sum under-predicts (bench/cost.py measures by how much)."""
    import random
    import statistics

    from oneshot.cost.derive import _genotype, decision_groups
    from oneshot.cost.probe import network_of

    rng = random.Random(0)
    groups = decision_groups(model)
    zeros = {
        t: torch.zeros(v.shape, dtype=torch.float64).numpy() for t, v in model.per_choice.items()
    }
    archs, measured, predicted = [], [], []
    for _ in range(k):
        picks = [p for g in groups for p in g.picks[rng.randrange(len(g.picks))]]
        genotype = _genotype(model, picks, zeros)
        x = torch.randn(int(model.meta["batch_size"]), *model.meta["input_shape"], device=device)
        net = network_of(supernet, genotype, model).to(device)
        measured.append(measure_latency(net, (x,), warmup=warmup, repeats=repeats, device=device,
                                        threads=model.meta["threads"])["median_ms"])  # fmt: skip
        predicted.append(model.of_genotype(genotype))
        archs.append(str(genotype))
    scale = statistics.median(m / p for m, p in zip(measured, predicted))
    model.fixed *= scale
    model.per_choice = {t: v * scale for t, v in model.per_choice.items()}
    before = statistics.median(abs(p - m) / m for m, p in zip(measured, predicted))
    after = statistics.median(abs(scale * p - m) / m for m, p in zip(measured, predicted))
    model.meta["calibration"] = {"scale": scale, "archs": archs, "measured_ms": measured,
                                 "median_error_before": before, "median_error_after": after}  # fmt: skip
