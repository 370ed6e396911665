"""Pictures of a search: architecture heatmaps, their evolution, derived cells, learning curves.

Plain matplotlib (bare ``Figure`` objects rendered with Agg, no pyplot state) and Graphviz
(``oneshot.cell_pictures``); no Lightning. Every picture can be redrawn from the files a run
leaves, which is what ``oneshot-plot RUN_DIR`` does::

    RUN_DIR/plots/alphas_<cell>.png           softmaxed alphas (ENAS: the policy) after the last epoch
    RUN_DIR/plots/alpha_evolution_<cell>.png  every edge's op probabilities over the epochs
    RUN_DIR/plots/cell_<cell>.png             the derived cell(s) of genotype.txt
    RUN_DIR/plots/arch.png                    a model space's derived architecture (issue 15)
    RUN_DIR/plots/curves.png                  search loss and accuracy (retrain_curves.png: retraining)
    RUN_DIR/plots/enas.png                    ENAS reward, baseline and entropies
    RUN_DIR/plots/benchmark.png               the derived cell's benchmark accuracy per epoch (issue 18)
    RUN_DIR/plots/tenas_<cell>.png            TE-NAS changes of both metrics per op per pruning round
    RUN_DIR/plots/epochs/epoch_XXX_{alphas,cell}_<cell>.png   the same, after every search epoch

Architecture columns of ``metrics.csv``: ``alpha/<cell>/<edge>/<op>`` (DARTS) and
``policy/<cell>/<decision>/<op>`` (ENAS: the op distribution of each decision on the policy's
most likely path).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from oneshot.cell_pictures import arch_png, cell_graphs, cell_png
from oneshot.genotypes import GenotypeError, parse
from oneshot.run_files import (  # noqa: F401 - re-exported: plots.read_metrics(...) in notebooks
    ARCH_PREFIXES,
    Rows,
    architecture_history,
    find_prune_history,
    load_json,
    natural,
    of,
    op_order,
    prune_history,
    read_metrics,
    rows_at,
)

log = logging.getLogger(__name__)


def write_bytes(path, data: bytes) -> Path:
    """Write through a temporary name and a rename, so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_name(text) -> str:
    """A file-name part made from a string read out of a run's files (a cell type, a metrics
    column): letters, digits, ``_`` and ``-`` only, so no separator or ``..`` can lead a picture
    out of ``RUN_DIR/plots``; at most 64 characters."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(text))[:64]
    return name or "_"


def png_bytes(fig: Figure, dpi: int = 80) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_figure(fig: Figure, path) -> Path:
    return write_bytes(path, png_bytes(fig))


# ---- figures ------------------------------------------------------------------------------------


def heatmap_figure(rows: Rows, title: str = "") -> Figure:
    """Rows (edges) x columns (ops), each row a distribution; the row's maximum in bold. Ops an
    edge does not have (after a warm start) stay blank."""
    ops = sorted(dict.fromkeys(op for _, probs in rows for op in probs), key=op_order)
    grid = [[probs.get(op, math.nan) for op in ops] for _, probs in rows]
    fig = Figure(figsize=(1.2 + 0.9 * len(ops), 1.0 + 0.38 * len(rows)))
    ax = fig.add_subplot()
    finite = [v for r in grid for v in r if not math.isnan(v)]
    # The colour scale spans the values present: early in a search every row is near uniform,
    # and a 0..1 scale would paint it one colour.
    lo, hi = min(finite, default=0.0), max(finite, default=1.0)
    im = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1e-9, aspect="auto")
    for i, r in enumerate(grid):
        best = max((v for v in r if not math.isnan(v)), default=None)
        for j, v in enumerate(r):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="white" if v < lo + 0.6 * (hi - lo) else "black",
                        fontweight="bold" if v == best else "normal")  # fmt: skip
    ax.set_xticks(range(len(ops)), ops, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def evolution_figure(
    history: dict[str, dict[str, list[tuple[int, float]]]], title: str = ""
) -> Figure:
    """One panel per edge, one line per op: its probability after every epoch."""
    edges = list(history)
    cols = min(4, len(edges))
    nrows = math.ceil(len(edges) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.3 * nrows + 0.6))
    ops = sorted(dict.fromkeys(op for e in edges for op in history[e]), key=op_order)
    colors = {op: f"C{i % 10}" for i, op in enumerate(ops)}
    for k, edge in enumerate(edges):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for op, points in history[edge].items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", ms=3, color=colors[op], label=op)
        ax.set_title(edge, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.tick_params(labelsize=7)
    handles = [fig.axes[0].plot([], [], color=colors[op], label=op)[0] for op in ops]
    fig.legend(handles, ops, loc="lower center", ncol=min(len(ops), 5), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (len(ops) > 5), 1, 0.95))
    return fig


def curves_figure(
    metrics: list[dict], panels: dict[str, list[str]], title: str = ""
) -> Figure | None:
    """One panel per group of metric keys, each key against the step; None when nothing to draw."""
    drawn = {
        name: [k for k in keys if any(k in r for r in metrics)] for name, keys in panels.items()
    }
    drawn = {name: keys for name, keys in drawn.items() if keys}
    if not drawn:
        return None
    fig = Figure(figsize=(4.2 * len(drawn), 3.2))
    for i, (name, keys) in enumerate(drawn.items()):
        ax = fig.add_subplot(1, len(drawn), i + 1)
        for key in keys:
            pts = [(r["step"], r[key]) for r in metrics if key in r and "step" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


BENCHMARK_PREFIX = "benchmark/"  # issue 18: lightning_modules/benchmark.py logs these


def benchmark_history(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """``benchmark/<column>`` -> [(epoch, accuracy)]: the table's accuracies of the cell the search
    derived after each epoch (the last value logged for an epoch wins)."""
    per_epoch: dict[str, dict[int, float]] = {}
    for row in metrics:
        for key, value in row.items():
            if key.startswith(BENCHMARK_PREFIX) and "epoch" in row:
                per_epoch.setdefault(key, {})[row["epoch"]] = value
    return {key: sorted(points.items()) for key, points in per_epoch.items()}


def benchmark_figure(metrics: list[dict], title: str = "") -> Figure | None:
    """One panel per dataset (``cifar10_test`` and ``cifar10_valid`` share one), the derived
    cell's benchmark accuracy against the epoch: NB201 papers' curve, the one that shows a
    collapse to parameter-free cells. None when the run logged no ``benchmark/*``."""
    history = benchmark_history(metrics)
    if not history:
        return None
    panels: dict[str, list[str]] = {}
    for key in sorted(history, key=natural):
        column = key.removeprefix(BENCHMARK_PREFIX)
        panels.setdefault(column.rsplit("_", 1)[0] if "_" in column else column, []).append(key)
    fig = Figure(figsize=(3.8 * len(panels), 3.2))
    for i, (dataset, keys) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in keys:
            xs, ys = zip(*history[key])
            label = key.removeprefix(BENCHMARK_PREFIX)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
        ax.set_title(dataset, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("benchmark accuracy (%)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=7)
    fig.suptitle(title or "benchmark accuracy of the derived cell", fontsize=10)
    fig.tight_layout()
    return fig


def tenas_figure(history: list[dict], cell_type: str) -> Figure:
    """Per pruning round, the relative change of the NTK condition number and of the number of
    linear regions when each op is removed (edges x ops); pruned ops are crossed out."""
    rows = [
        h
        for h in history
        if h.get("cell_type", "cell") == cell_type and h.get("stage", "op") == "op"
    ]
    rounds = sorted({h["round"] for h in rows})
    fig = Figure(figsize=(9, 0.6 + 2.6 * len(rounds)))
    for r_i, rnd in enumerate(rounds):
        sel = [h for h in rows if h["round"] == rnd]
        edges = sorted(dict.fromkeys(h["edge"] for h in sel), key=natural)
        ops = sorted(dict.fromkeys(h["op"] for h in sel), key=op_order)
        for m_i, (key, label) in enumerate(
            (("ntk_change", "NTK condition change"), ("regions_change", "regions change"))
        ):
            grid = [[math.nan] * len(ops) for _ in edges]
            for h in sel:
                v = float(h.get(key, math.nan))  # "inf" (a singular NTK) is written as a string
                grid[edges.index(h["edge"])][ops.index(h["op"])] = (
                    v if math.isfinite(v) else math.nan
                )
            ax = fig.add_subplot(len(rounds), 2, 2 * r_i + m_i + 1)
            span = max((abs(v) for r in grid for v in r if not math.isnan(v)), default=1.0) or 1.0
            im = ax.imshow(
                grid, cmap="coolwarm", vmin=-span, vmax=span, aspect="auto"
            )  # 0 is white
            for h in sel:
                if h.get("pruned"):
                    ax.text(
                        ops.index(h["op"]), edges.index(h["edge"]), "x", ha="center", va="center"
                    )
            ax.set_xticks(range(len(ops)), ops, rotation=30, ha="right", fontsize=7)
            ax.set_yticks(range(len(edges)), edges, fontsize=7)
            ax.set_title(f"round {rnd}: {label}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(f"TE-NAS pruning, {cell_type} (x: pruned)", fontsize=10)
    fig.tight_layout()
    return fig


def is_model_arch(genotype) -> bool:
    """Issue 15: a model space's architecture ``{label: value}`` (an ``Arch``, a dict or its JSON)."""
    return getattr(genotype, "space", None) == "model" or isinstance(genotype, dict) or (
        isinstance(genotype, str) and genotype.lstrip().startswith("{") and '"genotype"' not in genotype)  # fmt: skip


def cell_pictures(genotype, use_dot: bool = True) -> dict[str, bytes]:
    """PNG bytes of each cell type's picture of ``genotype`` (a value or a string)."""
    if is_model_arch(genotype):
        return {}  # issue 15: a model space's {label: value} has no cell; arch_picture draws it
    g = parse(genotype) if isinstance(genotype, str) else genotype
    return {
        t: cell_png(graph, f"{g.space} {t}" if t == "cell" else f"{t} cell", use_dot)
        for t, graph in cell_graphs(g).items()
    }


def arch_picture(genotype, title: str = "derived architecture") -> bytes | None:
    """Issue 15: PNG bytes of a model space's derived architecture (``plots/arch.png``: a table of
    its decisions, mobilenet's block diagram); None for a cell space's genotype."""
    return arch_png(genotype, title) if is_model_arch(genotype) else None


SEARCH_PANELS = {
    "loss": ["train/loss", "val/loss"],
    "accuracy": ["train/acc", "val/acc", "test/acc"],
}
ENAS_PANELS = {
    "reward": ["enas/reward", "enas/baseline", "enas/epoch_reward"],
    "entropy": ["enas/entropy"],
    "mean entropy per decision": ["arch/entropy"],
}


def is_run_dir(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(
        (run_dir / f).is_file() for f in ("metrics.csv", "genotype.txt", "report.json")
    )


def redraw(run_dir, epochs: bool = True, use_dot: bool = True) -> list[Path]:
    """Draw every picture a finished (or running) run's files allow into ``RUN_DIR/plots``."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: it holds none of metrics.csv, genotype.txt, report.json "
            "(pass the directory oneshot-search or oneshot-retrain wrote, e.g. outputs/search/<time>)"
        )
    out, written = run_dir / "plots", []
    metrics = read_metrics(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else []
    history = architecture_history(metrics)
    for cell in history:
        kind = (
            "alphas"
            if any(k.startswith(f"alpha/{cell}/") for r in metrics for k in r)
            else "policy"
        )
        name = safe_name(cell)  # from a metrics.csv column
        written.append(save_figure(heatmap_figure(rows_at(history, cell), f"{kind}{of(cell)}"),
                                   out / f"alphas_{name}.png"))  # fmt: skip
        written.append(save_figure(evolution_figure(history[cell], f"{kind} over epochs{of(cell)}"),
                                   out / f"alpha_evolution_{name}.png"))  # fmt: skip
        if epochs:
            for epoch in sorted(
                {e for ops in history[cell].values() for pts in ops.values() for e, _ in pts}
            ):
                fig = heatmap_figure(
                    rows_at(history, cell, epoch), f"{kind} after epoch {epoch}{of(cell)}"
                )
                written.append(
                    save_figure(fig, out / "epochs" / f"epoch_{int(epoch):03d}_alphas_{name}.png")
                )
    report = _read_report(run_dir / "report.json")
    if epochs:
        for epoch, g in enumerate(report.get("genotypes_per_epoch") or []):
            for cell, png in cell_pictures(g, use_dot).items():
                written.append(
                    write_bytes(out / "epochs" / f"epoch_{epoch:03d}_cell_{safe_name(cell)}.png", png)
                )
            png = arch_picture(g, f"architecture after epoch {epoch}")  # issue 15: model spaces
            if png is not None:
                written.append(write_bytes(out / "epochs" / f"epoch_{epoch:03d}_arch.png", png))
    final = (
        (run_dir / "genotype.txt").read_text()
        if (run_dir / "genotype.txt").is_file()
        else report.get("genotype")
    )
    if final:
        for cell, png in cell_pictures(final, use_dot).items():
            written.append(write_bytes(out / f"cell_{safe_name(cell)}.png", png))
        png = arch_picture(final)  # issue 15: model spaces
        if png is not None:
            written.append(write_bytes(out / "arch.png", png))
    for name, path, panels, title in (
        ("curves.png", run_dir / "metrics.csv", SEARCH_PANELS, "search"),
        ("enas.png", run_dir / "metrics.csv", ENAS_PANELS, "ENAS controller"),
        ("retrain_curves.png", run_dir / "retrain" / "metrics.csv", SEARCH_PANELS, "retraining"),
    ):
        rows = (
            metrics
            if path == run_dir / "metrics.csv"
            else read_metrics(path)
            if path.is_file()
            else []
        )
        if panels is ENAS_PANELS and not any(k.startswith("enas/") for r in rows for k in r):
            continue
        fig = curves_figure(rows, panels, title)
        if fig is not None:
            written.append(save_figure(fig, out / name))
    fig = benchmark_figure(metrics)  # issue 18: benchmark=nb201 runs
    if fig is not None:
        written.append(save_figure(fig, out / "benchmark.png"))
    prune = prune_history(run_dir, report)
    for cell in dict.fromkeys(h.get("cell_type", "cell") for h in prune or []):
        # cell_type comes from warmstart.json/tenas.json: a crafted one must not name a path
        written.append(save_figure(tenas_figure(prune, cell), out / f"tenas_{safe_name(cell)}.png"))
    return written


def _read_report(path: Path) -> dict:
    """``report.json`` as a mapping whose genotypes are strings, or a ValueError naming the file."""
    from oneshot.report import read_mapping

    if not path.is_file():
        return {}
    report = read_mapping(path, __import__("json").loads)
    if report.get("space") == "model":  # issue 15: architectures {label: value}, no genotype strings
        return report
    for key in ("genotype", "genotypes_per_epoch"):
        value = report.get(key)
        values = value if key == "genotypes_per_epoch" and isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path}: {key} must hold genotype strings, holds {value!r:.60}")
        for v in values if value is not None else ():
            try:
                parse(v)
            except GenotypeError as e:
                raise GenotypeError(f"{path}: {key}: {e}") from None
    return report


def main(argv=None) -> int:
    """``oneshot-plot RUN_DIR [RUN_DIR ...]``: redraw a run's pictures into ``RUN_DIR/plots``."""
    parser = argparse.ArgumentParser(prog="oneshot-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--no-epochs", action="store_true", help="skip the per-epoch pictures")
    parser.add_argument(
        "--no-dot", action="store_true", help="draw cells with matplotlib, not Graphviz"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for run_dir in args.run_dirs:
        try:
            written = redraw(run_dir, epochs=not args.no_epochs, use_dot=not args.no_dot)
        except (FileNotFoundError, GenotypeError, ValueError) as e:
            print(f"oneshot-plot: error: {e}", file=sys.stderr)
            return 2
        except (TypeError, KeyError, AttributeError, RecursionError, csv.Error) as e:  # a malformed run file
            print(f"oneshot-plot: error: {run_dir}: a run file is malformed ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        log.info("%d pictures in %s", len(written), run_dir / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
