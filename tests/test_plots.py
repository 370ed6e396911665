"""Pictures: drawn in the run directory during a real search (any logger), redrawn identically by
the real ``oneshot-plot`` console script, and drawn without Graphviz too."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import oneshot
from oneshot import plots
from oneshot.cell_pictures import cell_graphs, render_dot
from oneshot.genotypes import DARTS_V2, ENAS, NB201_BEST_CIFAR10, parse

PLOT = Path(sys.executable).parent / "oneshot-plot"
TINY = [
    "data=digits", "data.batch_size=16", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
    "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "retrain.trainer.max_epochs=1",
    "+retrain.trainer.limit_train_batches=2", "+retrain.trainer.limit_val_batches=1",
]  # fmt: skip


def pixels(png: bytes | Path) -> np.ndarray:
    """Decode a PNG; fail unless it is a real picture, not a blank canvas."""
    data = png.read_bytes() if isinstance(png, Path) else png
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert img.shape[0] >= 100 and img.shape[1] >= 150, img.shape
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # text, colours, edges: not a flat image
    assert (img < 128).any() and (img > 200).any()  # dark marks on a light background
    return img


@pytest.mark.parametrize(
    "genotype", [DARTS_V2, ENAS, NB201_BEST_CIFAR10], ids=["darts", "enas5", "nb201"]
)
@pytest.mark.parametrize("use_dot", [True, False], ids=["dot", "matplotlib"])
def test_cell_pictures_every_cell_type(genotype, use_dot):
    pictures = plots.cell_pictures(genotype, use_dot=use_dot)
    assert (
        set(pictures)
        == set(cell_graphs(genotype))
        == ({"cell"} if genotype.space == "nb201" else {"normal", "reduce"})
    )
    for png in pictures.values():
        pixels(png)


def test_cell_graph_is_the_genotype():
    g = cell_graphs(DARTS_V2)["normal"]
    ops = [(s, d, op) for s, d, op in g["edges"] if op]
    # DARTS_V2 normal node 0 = sep_conv_3x3(c_{k-2}) + sep_conv_3x3(c_{k-1}); node 3 reads node 0.
    assert ops[:2] == [("c_{k-2}", "0", "sep_conv_3x3"), ("c_{k-1}", "0", "sep_conv_3x3")]
    assert ("0", "3", "dil_conv_3x3") in ops and len(ops) == 8
    assert sorted(s for s, d, op in g["edges"] if d == "c_{k}") == ["0", "1", "2", "3"]
    nb = cell_graphs(
        parse("|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|")
    )["cell"]
    assert nb["edges"] == [
        ("0", "1", "nor_conv_3x3"),
        ("1", "2", "nor_conv_3x3"),
        ("0", "3", "skip_connect"),
        ("2", "3", "skip_connect"),
    ]  # fmt: skip  - `none` edges compute zero: not drawn


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz not installed")
def test_dot_and_fallback_differ_and_fallback_needs_no_dot(monkeypatch, tmp_path):
    graph = cell_graphs(DARTS_V2)["reduce"]
    with_dot = plots.cell_pictures(DARTS_V2)["reduce"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on this PATH
    assert render_dot("digraph { a -> b }") is None
    without = plots.cell_pictures(DARTS_V2)["reduce"]
    assert without != with_dot and pixels(without).shape != pixels(with_dot).shape
    assert graph["output"] == "c_{k}"


def test_heatmap_orders_ops_canonically_and_leaves_missing_ops_blank():
    rows = [
        ("1<-0", {"skip_connect": 0.7, "none": 0.3}),
        ("2<-0", {"nor_conv_3x3": 1.0, "none": 0.0}),
    ]
    fig = plots.heatmap_figure(rows, "warm-started")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "skip_connect", "nor_conv_3x3"]
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0.000", "0.300", "0.700", "1.000"]  # two cells blank: ops the edge lacks
    pixels(plots.png_bytes(fig))


def _search(tmp_path, *overrides):
    cfg = oneshot.compose("search", [f"run_dir={tmp_path}", *TINY, *overrides])
    return oneshot.search(cfg)


@pytest.mark.slow
def test_enas_search_draws_pictures_and_oneshot_plot_redraws_them(tmp_path):
    report = _search(tmp_path, "strategy=enas", "space=darts", "logger=csv", "strategy.derive_samples=5")
    out = tmp_path / "plots"
    assert not (tmp_path / "wandb").exists()
    # Every epoch: a policy heatmap and a cell picture per cell type, and latest copies.
    live = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    for epoch in (0, 1):
        for cell in ("normal", "reduce"):
            for what in ("alphas", "cell"):
                pixels(out / "epochs" / f"epoch_{epoch:03d}_{what}_{cell}.png")
    # The per-epoch cell is the module's genotype of that epoch (what report.json records).
    for epoch, g in enumerate(report["genotypes_per_epoch"]):
        for cell, png in plots.cell_pictures(g).items():
            assert live[Path("epochs") / f"epoch_{epoch:03d}_cell_{cell}.png"] == png
    # The policy columns are distributions: each decision's ops sum to one.
    history = plots.architecture_history(plots.read_metrics(tmp_path / "metrics.csv"))
    assert set(history) == {"normal", "reduce"} and len(history["normal"]) == 8  # 4 nodes x 2 ops
    for decision in history["normal"].values():
        for epoch in (0, 1):
            assert sum(dict(pts)[epoch] for pts in decision.values()) == pytest.approx(1, abs=1e-5)
    for name in (
        "alphas_normal",
        "alpha_evolution_reduce",
        "cell_normal",
        "curves",
        "enas",
        "retrain_curves",
    ):
        pixels(out / f"{name}.png")

    shutil.rmtree(out)
    done = subprocess.run([str(PLOT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    redrawn = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    assert set(redrawn) == set(live)
    # Redrawn from metrics.csv and report.json, the pictures equal the live ones.
    for key in live:
        if key.parts[0] == "epochs":
            assert redrawn[key] == live[key], key


@pytest.mark.slow
def test_darts_pictures_without_wandb_and_without_dot(tmp_path):
    _search(tmp_path, "strategy=darts", "space=nb201", "logger=csv", "retrain.enabled=false")
    out = tmp_path / "plots"
    for epoch in (0, 1):
        pixels(out / "epochs" / f"epoch_{epoch:03d}_alphas_cell.png")
        pixels(out / "epochs" / f"epoch_{epoch:03d}_cell_cell.png")
    with_dot = (out / "cell_cell.png").read_bytes()
    env = {**os.environ, "PATH": str(tmp_path / "empty")}  # a PATH without graphviz
    done = subprocess.run([str(PLOT), "--no-epochs", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    without = (out / "cell_cell.png").read_bytes()
    assert without != with_dot
    pixels(without)


def test_logger_none_draws_nothing(tmp_path):
    _search(tmp_path, "logger=none", "retrain.enabled=false", "+trainer.fast_dev_run=true")
    assert not (tmp_path / "plots").exists()


def test_oneshot_plot_rejects_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    done = subprocess.run([str(PLOT), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a run directory" in lines[0] and str(tmp_path) in lines[0]
    assert "metrics.csv" in lines[0] and not (tmp_path / "plots").exists()
    missing = subprocess.run(
        [str(PLOT), str(tmp_path / "nope")], capture_output=True, text=True, timeout=120
    )
    assert missing.returncode == 2 and "is not a run directory" in missing.stderr


def test_tenas_figure_from_a_prune_history(tmp_path):
    history = [
        {"round": r, "stage": "op", "cell_type": "cell", "edge": e, "op": op, "ntk": 1.0, "regions": 2.0,
         "ntk_change": 0.1 * i - 0.2, "regions_change": "inf" if i == 0 else 0.05 * i, "pruned": i == 3}
        for r in (0, 1) for e in ("1<-0", "2<-0") for i, op in enumerate(("skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"))
    ]  # fmt: skip
    (tmp_path / "tenas.json").write_text(json.dumps({"history": history}))
    (tmp_path / "genotype.txt").write_text(str(NB201_BEST_CIFAR10))
    written = plots.redraw(tmp_path)
    assert tmp_path / "plots" / "tenas_cell.png" in written
    img = pixels(tmp_path / "plots" / "tenas_cell.png")
    assert img.shape[0] > 300  # two rounds, two panels each
