"""Reading what a run directory holds: ``metrics.csv`` rows, the architecture columns as
histories, the TE-NAS pruning history; plain Python, shared by ``oneshot.plots`` and notebooks.

Architecture columns: ``alpha/<cell>/<edge>/<op>`` (DARTS) and ``policy/<cell>/<decision>/<op>``
(ENAS: the op distribution of each decision on the policy's most likely path).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

from oneshot.ops import DARTS_PRIMITIVES, NB201_PRIMITIVES

ARCH_PREFIXES = ("alpha/", "policy/")
Rows = list[tuple[str, dict[str, float]]]  # (edge or decision, {op: probability})


def op_order(op: str) -> tuple[int, str]:
    """Ops in the spaces' primitive order (the live and the redrawn heatmaps must agree)."""
    order = list(dict.fromkeys((*NB201_PRIMITIVES, *DARTS_PRIMITIVES)))
    return (order.index(op), op) if op in order else (len(order), op)


def natural(name: str) -> list:
    """Sort key reading digit runs as numbers: ``10<-2`` after ``9<-8``, ``3/op0`` after ``2/op1``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def of(cell: str) -> str:
    """Title suffix naming the cell type (NB201 has a single one, called "cell")."""
    return "" if cell == "cell" else f", {cell} cell"


# ---- reading a run directory ---------------------------------------------------------------------


def read_metrics(path) -> list[dict]:
    """``metrics.csv`` rows with the empty cells dropped and numbers as floats (step, epoch: int)."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if k is None or v in ("", None):
                    continue
                try:
                    row[k] = int(float(v)) if k in ("step", "epoch") else float(v)
                except ValueError:
                    continue
            rows.append(row)
    return rows


def architecture_history(
    metrics: list[dict],
) -> dict[str, dict[str, dict[str, list[tuple[int, float]]]]]:
    """cell type -> edge/decision -> op -> [(epoch, probability)], the last value of each epoch."""
    per_epoch: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for row in metrics:
        for key, value in row.items():
            if key.startswith(ARCH_PREFIXES):
                parts = key.split("/")
                cell, edge, op = parts[1], "/".join(parts[2:-1]), parts[-1]
                per_epoch[cell][edge][op][row.get("epoch", 0)] = value
    return {
        cell: {
            edge: {op: sorted(edges[edge][op].items()) for op in edges[edge]}
            for edge in sorted(edges, key=natural)
        }
        for cell, edges in per_epoch.items()
    }


def rows_at(history: dict, cell: str, epoch: int | None = None) -> Rows:
    """The heatmap rows of one cell type at ``epoch`` (None: the last one logged)."""
    out = []
    for edge, ops in history[cell].items():
        pick = {
            op: dict(pts).get(epoch) if epoch is not None else pts[-1][1] for op, pts in ops.items()
        }
        out.append((edge, {op: p for op, p in pick.items() if p is not None}))
    return out


def find_prune_history(obj) -> list[dict] | None:
    """A TE-NAS pruning history (rows with round, op, ntk and regions) anywhere inside ``obj``."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        if {"round", "op", "ntk_change", "regions_change"} <= set(obj[0]):
            return obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        found = find_prune_history(child)
        if found:
            return found
    return None


def prune_history(run_dir: Path, report: dict | None = None) -> list[dict] | None:
    """The TE-NAS history of a run: ``warmstart.json`` (warm start), ``tenas.json`` (strategy)."""
    for name in ("warmstart.json", "tenas.json"):
        found = find_prune_history(load_json(Path(run_dir) / name))
        if found:
            return found
    return find_prune_history(report)


def load_json(path) -> dict | list | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
