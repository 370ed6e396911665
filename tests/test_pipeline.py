"""The real Hydra configs through the real pipeline: every strategy x space with fast_dev_run,
retraining published genotypes, and what the run directory holds."""

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from torch.utils.data import DataLoader

import oneshot
from oneshot.data import RetrainDataModule
from oneshot.genotypes import parse

CONF = Path(oneshot.__file__).parent.parent / "conf"
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))
# The cell spaces (their genotypes parse as cell genotypes); the model spaces (space=model,
# mobilenet) run every strategy in tests/test_model_space.py.
SPACES = sorted(p.stem for p in (CONF / "space").glob("*.yaml") if p.stem in ("darts", "nb201"))
assert SPACES == ["darts", "nb201"], SPACES
FAST = ["+trainer.fast_dev_run=true", "data=digits", "data.batch_size=8"]
# A training-free strategy (TE-NAS) searches by pruning: tiny metric sizes, and on DARTS a 2-node
# cell of 3 live ops, make that seconds (tests/test_warmstart.py covers it further).
TINY = {"tenas": ["strategy.num_inits=1", "strategy.n_crops=100", "strategy.ntk_batch=8", "strategy.images=200"]}
TINY_SPACE = {("tenas", "darts"): ["+space.supernet.steps=2", "+space.supernet.multiplier=2",
                                   "+space.supernet.primitives=[none,skip_connect,sep_conv_3x3,avg_pool_3x3]"]}  # fmt: skip


def compose(overrides, name="search"):
    return oneshot.compose(name, overrides)


@pytest.mark.parametrize("space", SPACES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fast_dev_run_every_strategy_and_space(strategy, space, tmp_path):
    tiny = [*TINY.get(strategy, []), *TINY_SPACE.get((strategy, space), [])]
    cfg = compose([f"strategy={strategy}", f"space={space}", f"run_dir={tmp_path}", *FAST, *tiny])
    report = oneshot.search(cfg)
    genotype = parse((tmp_path / "genotype.txt").read_text())
    assert str(genotype) == report["genotype"] and genotype.space == space
    assert parse(json.dumps(json.loads((tmp_path / "genotype.json").read_text()))) == genotype
    assert json.loads((tmp_path / "report.json").read_text())["retrain"]["test_acc"] is not None
    assert (tmp_path / "config.yaml").read_text().count(f"name: {space}") == 1
    trains = not getattr(get_class(cfg.strategy._target_), "training_free", False)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() == trains
    assert (tmp_path / "retrain" / "network.pt").exists()


def test_second_order_darts_runs(tmp_path):
    cfg = compose(["strategy=darts", "strategy.order=2", f"run_dir={tmp_path}", "retrain.enabled=false", *FAST])
    report = oneshot.search(cfg)
    assert "retrain" not in report and not (tmp_path / "retrain").exists()


def test_short_search_writes_metrics_and_alphas(tmp_path):
    cfg = compose([
        f"run_dir={tmp_path}", "data=digits", "data.batch_size=16", "trainer.max_epochs=2", "trainer.log_every_n_steps=1",
        "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=1", "retrain.trainer.max_epochs=1",
        "+retrain.trainer.limit_train_batches=2",
    ])  # fmt: skip
    report = oneshot.search(cfg)
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "arch/entropy", "alpha/cell/3<-2/nor_conv_3x3"):
        assert key in header
    assert len(report["genotypes_per_epoch"]) == 2
    assert (tmp_path / "checkpoints" / "epoch=001.ckpt").exists()
    assert (tmp_path / "retrain" / "metrics.csv").exists()


@pytest.mark.parametrize(
    ("genotype", "network"),
    [("DARTS_V2", ["network.C=8", "network.layers=3"]), ("NB201_RESNET", ["network.C=4", "network.N=1"])],
)
def test_retrain_published_genotype_and_reload_export(genotype, network, tmp_path):
    cfg = compose([f"genotype={genotype}", f"run_dir={tmp_path}", *network, *FAST], name="retrain")
    report = oneshot.retrain(cfg)
    assert report["genotype"] == str(parse(report["genotype"]))
    net = oneshot.load_network(tmp_path / "network.pt")
    assert sum(p.numel() for n, p in net.named_parameters() if "auxiliary" not in n) == report["retrain"]["parameters"]


def test_retrain_reads_a_search_run_directory(tmp_path):
    search_dir, retrain_dir = tmp_path / "s", tmp_path / "r"
    oneshot.search(compose([f"run_dir={search_dir}", "retrain.enabled=false", *FAST]))
    report = oneshot.retrain(compose([f"genotype={search_dir / 'genotype.txt'}", f"run_dir={retrain_dir}",
                                      "network.C=4", "network.N=1", *FAST], name="retrain"))  # fmt: skip
    assert report["genotype"] == (search_dir / "genotype.txt").read_text().strip()


def _accuracy(net, x, y):
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def test_retrain_validates_on_held_out_train_images_and_tests_once(tmp_path):
    """val/acc is the network's accuracy on the held-out training images, test/acc on the test
    set, each recomputed here from the exported weights; the recipe is NB201's for an NB201 cell."""
    report = oneshot.retrain(compose([
        "genotype=NB201_RESNET", f"run_dir={tmp_path}", "network.C=4", "network.N=1", "data=digits",
        "data.batch_size=32", "retrain.trainer.max_epochs=1", "+retrain.trainer.limit_train_batches=3",
        "retrain.val_split=0.2", "logger.pictures=false",
    ], name="retrain"))["retrain"]  # fmt: skip
    assert report["recipe"]["recipe"] == "nb201" and report["recipe"]["optimizer"]["nesterov"] is True
    assert report["images"] == {"train": 1151, "val": 287, "test": 359}  # 1,438 digits train, 359 test
    dm = RetrainDataModule("digits", batch_size=32, val_split=0.2, seed=0)
    dm.setup()
    net = oneshot.load_network(tmp_path / "network.pt")
    val = next(iter(DataLoader(dm.val_set, batch_size=len(dm.val_set), collate_fn=dm.val_dataloader().collate_fn)))
    test = next(iter(DataLoader(dm.test_dataloader().dataset, batch_size=359, collate_fn=dm.val_dataloader().collate_fn)))
    assert report["val_acc"] == pytest.approx(_accuracy(net, *val), abs=1e-4)
    assert report["test_acc"] == pytest.approx(_accuracy(net, *test), abs=1e-4)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert sum(bool(r.get("test/acc")) for r in rows) == 1  # the test set: once, after training
    assert any(r.get("val/acc") for r in rows)


def test_retrain_without_validation_images_trains_on_all_and_still_tests(tmp_path):
    report = oneshot.retrain(compose([
        "genotype=NB201_RESNET", f"run_dir={tmp_path}", "network.C=4", "network.N=1", "retrain.val_split=0", *FAST,
    ], name="retrain"))["retrain"]  # fmt: skip
    assert report["images"]["val"] == 0 and report["images"]["train"] == 1438
    assert report["val_acc"] is None and report["test_acc"] is not None
