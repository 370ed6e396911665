"""Pictures of derived cells: Graphviz ``dot`` when it is installed, matplotlib otherwise.

The drawing follows the DARTS repository's ``visualize.py``: a DARTS cell reads the two previous
cells' outputs ``c_{k-2}``, ``c_{k-1}``, each intermediate node sums two ops of earlier nodes,
and the output ``c_{k}`` concatenates the ``concat`` nodes. An NB201 cell is a 4-node DAG where
every node sums one op per earlier node; ``none`` edges are left out, as they compute zero.

A model space's architecture ``{label: value}`` (issue 15) has no cell: ``arch_figure`` draws it
as a table of its decisions, or, for ``space=mobilenet``, as a block diagram of its stages.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

from oneshot.genotypes import DartsGenotype, NB201Genotype

log = logging.getLogger(__name__)

# One colour per op, shared by both renderers so a picture reads the same either way.
OP_COLORS = {
    "skip_connect": "#4c72b0", "nor_conv_1x1": "#dd8452", "nor_conv_3x3": "#c44e52",
    "avg_pool_3x3": "#55a868", "max_pool_3x3": "#8172b3", "sep_conv_3x3": "#c44e52",
    "sep_conv_5x5": "#937860", "dil_conv_3x3": "#dd8452", "dil_conv_5x5": "#da8bc3",
}  # fmt: skip


def cell_graphs(genotype) -> dict[str, dict]:
    """Per cell type, the cell as ``{"inputs", "nodes", "output", "edges": [(src, dst, op)]}``."""
    if isinstance(genotype, NB201Genotype):
        edges = [
            (str(src), str(j), op)
            for j, node in enumerate(genotype.nodes, start=1)
            for op, src in node
            if op != "none"
        ]
        n = len(genotype.nodes)
        return {
            "cell": {
                "inputs": ["0"],
                "nodes": [str(j) for j in range(1, n)],
                "output": str(n),
                "edges": edges,
            }
        }
    if isinstance(genotype, DartsGenotype):
        out = {}
        for t, pairs, concat in (
            ("normal", genotype.normal, genotype.normal_concat),
            ("reduce", genotype.reduce, genotype.reduce_concat),
        ):
            steps = len(pairs) // 2

            def name(j):
                return ("c_{k-2}", "c_{k-1}")[j] if j < 2 else str(j - 2)

            edges = [(name(src), str(k // 2), op) for k, (op, src) in enumerate(pairs)]
            edges += [(str(c - 2), "c_{k}", "") for c in concat]
            out[t] = {"inputs": ["c_{k-2}", "c_{k-1}"], "nodes": [str(i) for i in range(steps)],
                      "output": "c_{k}", "edges": edges}  # fmt: skip
        return out
    raise TypeError(f"cannot draw a {type(genotype).__name__}; expected an NB201 or DARTS genotype")


def to_dot(graph: dict, title: str = "") -> str:
    """Graphviz source of one cell graph (left to right, inputs green, output blue)."""
    lines = [
        "digraph cell {",
        f'  rankdir=LR; label="{title}"; labelloc=t; fontname=Helvetica; bgcolor=white;',
        '  node [style="rounded,filled", shape=box, fontname=Helvetica, fontsize=16, height=0.5, width=0.5];',
        "  edge [fontname=Helvetica, fontsize=14];",
    ]
    for n in graph["inputs"]:
        lines.append(f'  "{n}" [fillcolor=darkseagreen2];')
    for n in graph["nodes"]:
        lines.append(f'  "{n}" [fillcolor=lightblue];')
    lines.append(f'  "{graph["output"]}" [fillcolor=palegoldenrod];')
    for src, dst, op in graph["edges"]:
        color = OP_COLORS.get(op, "gray40")
        lines.append(f'  "{src}" -> "{dst}" [label="{op}", color="{color}", fontcolor="{color}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(source: str, timeout: float = 30.0) -> bytes | None:
    """PNG bytes from ``dot -Tpng``; None when ``dot`` is missing or fails (the caller falls back)."""
    dot = shutil.which("dot")
    if dot is None:
        return None
    try:
        done = subprocess.run([dot, "-Tpng", "-Gdpi=80"], input=source.encode(), capture_output=True,
                              timeout=timeout, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("graphviz dot failed (%s); drawing the cell with matplotlib", e)
        return None
    if done.returncode != 0 or not done.stdout.startswith(b"\x89PNG"):
        log.warning(
            "graphviz dot failed: %s; drawing the cell with matplotlib", done.stderr.decode()[:200]
        )
        return None
    return done.stdout


def _positions(graph: dict) -> dict[str, tuple[float, float]]:
    inputs, nodes = graph["inputs"], graph["nodes"]
    # Columns left to right: inputs, intermediate nodes (zig-zag, so arrows between neighbours
    # and arrows that skip a node take different paths), output.
    pos = {n: (0.0, 1.0 - 2.0 * i) if len(inputs) > 1 else (0.0, 0.0) for i, n in enumerate(inputs)}
    for i, n in enumerate(nodes, start=1):
        pos[n] = (float(i), 0.5 * (-1) ** i)
    pos[graph["output"]] = (float(len(nodes) + 1), 0.0)
    return pos


def draw_matplotlib(graph: dict, title: str = ""):
    """The same picture without Graphviz: a layered layout, curved labelled arrows."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    pos = _positions(graph)
    xs = [p[0] for p in pos.values()]
    # A bare Figure (no pyplot): no global backend state, so it works under any backend, in
    # threads, and inline in notebooks; savefig renders with Agg.
    fig = Figure(figsize=(2.0 + 2.0 * (max(xs) - min(xs)), 4.0))
    ax = fig.add_subplot()
    for i, (src, dst, op) in enumerate(graph["edges"]):
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        # Edges that skip nodes bend (alternately up and down) so they do not run through them.
        rad = 0.0 if op == "" or abs(x1 - x0) <= 1 else (0.12 + 0.04 * abs(x1 - x0)) * (-1) ** i
        color = OP_COLORS.get(op, "0.4")
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                     mutation_scale=14, color=color, lw=1.4, shrinkA=14, shrinkB=14))  # fmt: skip
        if op:  # the label sits on the curve: a quadratic Bezier's midpoint
            mx, my = (x0 + x1) / 2 + 0.5 * rad * (y1 - y0), (y0 + y1) / 2 - 0.5 * rad * (x1 - x0)
            ax.text(mx, my, op, color=color, fontsize=8, ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    fills = {**dict.fromkeys(graph["inputs"], "#b4eeb4"), **dict.fromkeys(graph["nodes"], "#add8e6"),
             graph["output"]: "#eee8aa"}  # fmt: skip
    for n, (x, y) in pos.items():
        ax.text(x, y, n, ha="center", va="center", fontsize=11, zorder=3,
                bbox={"boxstyle": "round,pad=0.4", "fc": fills[n], "ec": "0.3"})  # fmt: skip
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ys = [p[1] for p in pos.values()]
    ax.set_ylim(min(ys) - 1.0, max(ys) + 1.0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def cell_png(graph: dict, title: str = "", use_dot: bool = True) -> bytes:
    """One cell as PNG bytes: Graphviz if available (and ``use_dot``), matplotlib otherwise."""
    png = render_dot(to_dot(graph, title)) if use_dot else None
    if png is not None:
        return png
    import io

    buf = io.BytesIO()
    draw_matplotlib(graph, title).savefig(buf, format="png", dpi=80)
    return buf.getvalue()


# ---- a model space's derived architecture (issue 15) ---------------------------------------------

_BLOCK_LABEL = re.compile(r"s(\d+)b(\d+)")  # space=mobilenet's labels: stage s, block b
_MBCONV = re.compile(r"k(\d+)e(\d+)")  # its candidates: kernel k, expansion e (or "skip")
KERNEL_COLORS = {3: "#b4d7f0", 5: "#6fa8dc", 7: "#2f6fa8"}


def arch_rows(arch) -> list[tuple[str, str, str]]:
    """One ``(label, kind, chosen)`` row per decision of an architecture ``{label: value}``; the
    kind follows from the value: a candidate name (LayerChoice), a list of inputs (InputChoice),
    a depth (Repeat)."""
    from oneshot.arch import load_arch

    rows = []
    for label, value in load_arch(arch).items():
        if isinstance(value, list):
            rows.append((label, "inputs", " + ".join(map(str, value))))
        elif isinstance(value, int):
            rows.append((label, "depth", str(value)))
        else:
            rows.append((label, "candidate", value))
    return rows


def mobilenet_blocks(arch) -> dict[int, list[tuple[int, int | None, int | None]]] | None:
    """``{stage: [(block, kernel, expansion)]}`` (``None, None``: the block is skipped) when every
    label is ``s<stage>b<block>`` and every value ``k<kernel>e<expansion>`` or ``skip``, as in
    ``space=mobilenet``; None for any other architecture."""
    from oneshot.arch import load_arch

    stages: dict[int, list] = {}
    for label, value in load_arch(arch).items():
        block, mb = _BLOCK_LABEL.fullmatch(label), _MBCONV.fullmatch(str(value))
        if block is None or not (mb or value == "skip"):
            return None
        k, e = (int(mb[1]), int(mb[2])) if mb else (None, None)
        stages.setdefault(int(block[1]), []).append((int(block[2]), k, e))
    return {s: sorted(blocks) for s, blocks in sorted(stages.items())} or None


def arch_figure(arch, title: str = ""):
    """The derived architecture of a model space: for ``space=mobilenet`` a block diagram (a row
    per stage, a box per block labelled ``MB<expansion> <k>x<k>`` as ProxylessNAS draws them,
    coloured by kernel, skipped blocks dashed); for any other model a table, one row per label."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch

    stages = mobilenet_blocks(arch)
    if stages is None:
        rows = arch_rows(arch)
        fig = Figure(figsize=(6.0, 0.6 + 0.28 * (len(rows) + 1)))
        ax = fig.add_subplot()
        ax.set_axis_off()
        table = ax.table(cellText=[list(r) for r in rows], colLabels=["decision", "kind", "chosen"],
                         bbox=[0, 0, 1, 1], cellLoc="left", colLoc="left")  # fmt: skip
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        for (r, _), cell in table.get_celld().items():
            cell.set_facecolor("#dce6f0" if r == 0 else "white")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        return fig
    width = max(len(blocks) for blocks in stages.values())
    fig = Figure(figsize=(2.2 + 1.5 * width, 0.9 + 0.75 * len(stages)))
    ax = fig.add_subplot()
    for row, (stage, blocks) in enumerate(stages.items()):
        y = -row
        kept = sum(k is not None for _, k, _ in blocks)
        label = f"stage {stage}\n{kept}/{len(blocks)} blocks"
        ax.text(-0.3, y, label, ha="right", va="center", fontsize=8)
        for col, (_, k, e) in enumerate(blocks):
            skipped = k is None
            ax.add_patch(FancyBboxPatch((col + 0.06, y - 0.3), 0.88, 0.6, boxstyle="round,pad=0.02",
                                        fc="white" if skipped else KERNEL_COLORS.get(k, "#cccccc"),
                                        ec="0.55" if skipped else "0.2", ls="--" if skipped else "-"))  # fmt: skip
            text = "skip" if skipped else f"MB{e} {k}x{k}"
            dark = not skipped and k >= 7
            ax.text(col + 0.5, y, text, ha="center", va="center", fontsize=8,
                    color="white" if dark else ("0.45" if skipped else "black"))  # fmt: skip
            if col:
                arrow = {"arrowstyle": "-|>", "color": "0.4"}
                ax.annotate("", (col + 0.06, y), (col - 0.06, y), arrowprops=arrow)
    ax.set_xlim(-1.4, width)
    ax.set_ylim(-len(stages) + 0.4, 0.6)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def arch_png(arch, title: str = "") -> bytes:
    """``arch_figure`` as PNG bytes."""
    import io

    buf = io.BytesIO()
    arch_figure(arch, title).savefig(buf, format="png", dpi=80)
    return buf.getvalue()
