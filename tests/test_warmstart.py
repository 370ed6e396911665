"""The TE-NAS warm start and strategy=tenas through the real Hydra configs: the search supernet
holds only the survivors, the decision is reproducible, bad `keep` is one clear error, and
fast_dev_run of DARTS / ENAS on the pruned supernet and of the standalone TE-NAS search."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oneshot.lightning_modules.pipeline import _data_kwargs, build_supernet
from oneshot.lightning_modules.warmstart import run_warmstart, tenas_space_of, training_images

import oneshot
from oneshot.data import SearchDataModule
from oneshot.genotypes import parse
from oneshot.mixed import MixedOp
from oneshot.prune import prune
from oneshot.spaces import DartsSupernet, NB201Network

FAST = ["+trainer.fast_dev_run=true", "data=digits", "data.batch_size=8", "size=cpu"]
# Metric sizes that make a prune take seconds on digits; the reference's are the defaults.
TINY = ["num_inits=1", "n_crops=100", "ntk_batch=8", "images=200", "progress=false"]
WARM = ["warmstart=tenas", *(f"warmstart.{o}" for o in TINY)]
# A DARTS cell with 2 nodes and 3 live ops: node 3 has three inputs, so the edge stage has work;
# the ops in DARTS' order, not the reference's the prune visits them in.
SMALL_DARTS = ["space=darts", "+space.supernet.steps=2", "+space.supernet.multiplier=2",
               "+space.supernet.primitives=[none,avg_pool_3x3,skip_connect,sep_conv_3x3]"]  # fmt: skip
SPACES = {"nb201": ["space=nb201"], "darts": SMALL_DARTS}


# Thousands of tiny ops: one thread is as fast, and far faster on a shared, busy CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def warm_start(overrides, run_dir):
    cfg = oneshot.compose("search", [*WARM, *FAST, f"run_dir={run_dir}", *overrides])
    datamodule = SearchDataModule(**_data_kwargs(cfg.data, seed=cfg.seed))
    return cfg, datamodule, *run_warmstart(cfg, datamodule, run_dir)


def edges_with_survivors(net, survivors):
    """(MixedOp, its survivors) for every edge of every cell of ``net``."""
    for cell in net.cells:
        if hasattr(cell, "edges"):  # NB201's residual blocks between stages have none
            kept = (
                survivors["reduce" if getattr(cell, "reduction", False) else "normal"]
                if "normal" in survivors
                else survivors["cell"]
            )
            yield from zip(cell.edges, kept)


def pruned_parameters(full, survivors) -> int:
    """Parameters of the ops the warm start removed, counted on the full supernet."""
    return sum(
        p.numel()
        for mixed, kept in edges_with_survivors(full, survivors)
        for name, op in zip(mixed.candidates, mixed.ops)
        if name not in kept
        for p in op.parameters()
    )


@pytest.mark.parametrize("space", SPACES)
def test_warm_started_supernet_holds_only_the_survivors(space, tmp_path):
    cfg, datamodule, survivors, report = warm_start([*SPACES[space], "warmstart.keep=2"], tmp_path)
    info = datamodule.info
    warm, full = build_supernet(cfg, info, survivors), build_supernet(cfg, info)
    cls = NB201Network if space == "nb201" else DartsSupernet
    sizes = dict(cfg.space.supernet)
    sizes.pop("_target_")
    direct = cls(
        **sizes, num_classes=info.num_classes, in_channels=info.in_channels, candidates=survivors
    )
    assert warm.num_weight_parameters() == direct.num_weight_parameters()
    assert warm.num_weight_parameters() == full.num_weight_parameters() - pruned_parameters(
        full, survivors
    )
    assert warm.num_weight_parameters() < full.num_weight_parameters()
    edges = list(edges_with_survivors(warm, survivors))
    assert len(edges) == sum(isinstance(m, MixedOp) for m in warm.modules())
    for mixed, kept in edges:
        assert mixed.candidates == kept and len(mixed.ops) == 2 and "none" not in kept
    for (_, kept), (configured, _) in zip(edges, edges_with_survivors(full, survivors)):
        # Survivors in the configured supernet's op order, whatever order the prune visited.
        assert kept == tuple(op for op in configured.candidates if op in kept)
    assert {t: tuple(a.shape) for t, a in warm.alphas.items()} == {
        t: (len(s), 2) for t, s in survivors.items()
    }
    assert (
        report["survivors"] == {t: [list(k) for k in s] for t, s in survivors.items()}
        and report["seconds"] > 0
    )

    # The history: both metrics of every candidate of every round, in JSON and CSV.
    saved = json.loads((tmp_path / "warmstart.json").read_text())
    rows = list(csv.DictReader((tmp_path / "warmstart.csv").open()))
    assert len(rows) == len(saved["history"]) == report["evaluations"] > 0
    assert {"round", "edge", "op", "ntk", "regions", "ntk_rank", "regions_rank", "pruned"} <= set(
        rows[0]
    )
    assert all(float(r["regions"]) >= 1 and float(r["ntk"]) > 0 for r in rows)
    assert saved["options"]["num_inits"] == 1 and saved["survivors"] == report["survivors"]


def test_warm_start_is_prune_on_the_datamodules_training_images(tmp_path):
    # The pipeline's decision equals the library's prune on the same images: nothing else enters.
    cfg, datamodule, survivors, _ = warm_start(["warmstart.keep=2", "seed=5"], tmp_path)
    with torch.device("meta"):
        space = tenas_space_of(
            build_supernet(cfg, datamodule.info), 10, 1, {"nb201": {"C": 3, "N": 1}}
        )
    images = training_images(datamodule, 200, seed=5)
    expected = prune(space, images, 2, num_inits=1, seed=5, ntk_batch=8, n_crops=100)
    assert survivors == expected.survivors


def test_same_seed_same_survivors_and_history(tmp_path):
    # Every DDP rank runs the warm start on its own: equal inputs must give byte-equal decisions.
    runs = [warm_start(["warmstart.keep=2", "seed=3"], tmp_path / str(i)) for i in range(2)]
    assert runs[0][2] == runs[1][2] and runs[0][3]["fingerprint"] == runs[1][3]["fingerprint"]
    assert (tmp_path / "0" / "warmstart.csv").read_bytes() == (
        tmp_path / "1" / "warmstart.csv"
    ).read_bytes()
    other = warm_start(["warmstart.keep=2", "seed=4"], tmp_path / "2")
    assert (tmp_path / "2" / "warmstart.csv").read_bytes() != (
        tmp_path / "0" / "warmstart.csv"
    ).read_bytes()
    assert other[3]["keep"] == 2


def test_warm_start_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(0)
    warm_start(["warmstart.keep=3"], tmp_path)
    after = torch.rand(3)
    torch.manual_seed(0)
    torch.testing.assert_close(after, torch.rand(3))


@pytest.mark.parametrize(
    ("space", "keep", "valid"),
    [("nb201", 0, "1..4"), ("nb201", 5, "1..4"), ("darts", 8, "2..7"), ("nb201", "two", "1..4"),
     ("darts", 1, "2..7")],
)  # fmt: skip
def test_bad_keep_is_one_clear_error_before_any_work(space, keep, valid, tmp_path):
    overrides = ["space=darts"] if space == "darts" else []
    with pytest.raises(
        ValueError, match=rf"^warmstart.keep={keep!r} is out of range; valid: {re.escape(valid)} "
    ) as err:
        warm_start([*overrides, f"warmstart.keep={keep}"], tmp_path)
    assert not (tmp_path / "warmstart.json").exists()
    # DARTS: keep=1 would drop TE-NAS' input choice; the line names what does keep it.
    assert ("strategy=tenas space=darts" in str(err.value)) == (space == "darts")


def run_app(overrides, run_dir):
    app = Path(sys.executable).parent / "oneshot-search"
    env = {
        k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "ONESHOT_TRACEBACK")
    }
    return subprocess.run([str(app), *overrides, f"run_dir={run_dir}", *FAST],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


def test_bad_keep_through_the_app_is_one_line(tmp_path):
    proc = run_app(["warmstart=tenas", "warmstart.keep=0"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # The up-front check (oneshot/validate.py) or the warm start's own (valid: 1..4) says it.
    assert "error: warmstart.keep=0 is out of range; valid: " in proc.stderr


def test_darts_warm_start_to_one_op_is_refused_through_the_app(tmp_path):
    # One op per edge: alphas of one column get no gradient and derivation would wire every
    # node to inputs 0 and 1, discarding TE-NAS' edge choice. Refused before any pruning.
    proc = run_app(["warmstart=tenas", "warmstart.keep=1", "space=darts"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: warmstart.keep=1 is out of range; valid: 2..7 "
    )
    assert "strategy=tenas space=darts" in errors[0]
    assert not any(
        (tmp_path / f).exists() for f in ("warmstart.json", "genotype.txt", "report.json")
    )


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "space"), [("darts", "nb201"), ("enas", "darts")])
def test_fast_dev_run_of_a_search_on_the_warm_started_supernet(strategy, space, tmp_path):
    cfg = oneshot.compose(
        "search", [*WARM, *FAST, *SPACES[space], f"strategy={strategy}", f"run_dir={tmp_path}"]
    )
    report = oneshot.search(cfg)
    survivors = report["warmstart"]["survivors"]
    assert all(len(ops) == 2 for edges in survivors.values() for ops in edges)
    # The supernet that was searched: its checkpoint holds alphas for the survivors only, and
    # a genotype made of survivors.
    state = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )["state_dict"]
    for t, edges in survivors.items():
        assert tuple(state[f"supernet.alphas.{t}"].shape) == (len(edges), 2)
    genotype = parse((tmp_path / "genotype.txt").read_text())
    if space == "nb201":
        assert all(op in kept for op, kept in zip(genotype.edge_ops, survivors["cell"]))
    direct = build_supernet(
        cfg, oneshot_info(cfg), {t: [tuple(k) for k in s] for t, s in survivors.items()}
    )
    assert report["supernet_weight_parameters"] == direct.num_weight_parameters()
    assert (tmp_path / "warmstart.json").exists() and (tmp_path / "retrain" / "network.pt").exists()


def oneshot_info(cfg):
    return SearchDataModule(**_data_kwargs(cfg.data, seed=cfg.seed)).info


@pytest.mark.slow
def test_standalone_tenas_prunes_to_the_genotype_and_retrains(tmp_path, space="nb201"):
    # Both spaces run in tests/test_pipeline.py::test_fast_dev_run_every_strategy_and_space.
    tiny = [f"strategy.{o}" for o in TINY]
    cfg = oneshot.compose(
        "search", ["strategy=tenas", *FAST, *SPACES[space], *tiny, f"run_dir={tmp_path}"]
    )
    report = oneshot.search(cfg)
    saved = json.loads((tmp_path / "tenas.json").read_text())
    assert (
        report["genotype"] == saved["genotype"] == (tmp_path / "genotype.txt").read_text().strip()
    )
    assert all(len(ops) == 1 for edges in saved["survivors"].values() for ops in edges)
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained while searching
    assert (
        report["retrain"]["test_acc"] is not None and (tmp_path / "retrain" / "network.pt").exists()
    )
    for name in ("config.yaml", "genotype.json", "report.json", "tenas.csv"):
        assert (tmp_path / name).exists(), name
