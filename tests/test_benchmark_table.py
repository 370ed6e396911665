"""Benchmark tables: reading a CSV, the lookup, and the per-epoch benchmark accuracy of the
derived cell through the real search app (a table the test writes for every NB201 cell)."""

import csv
import itertools
import logging
from pathlib import Path

import pytest

import oneshot
from oneshot.benchmark import BenchmarkError, BenchmarkTable
from oneshot.genotypes import NB201Genotype
from oneshot.ops import NB201_PRIMITIVES

TINY = [
    "data=digits", "data.batch_size=16", "space=nb201", "space.supernet.C=4", "space.supernet.N=1",
    "trainer.max_epochs=3", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
    "retrain.enabled=false", "logger.pictures=false",
]  # fmt: skip


def fake_accuracy(arch: str) -> tuple[float, float]:
    """A made-up but arch-specific pair: the table's two columns."""
    ops = NB201Genotype.from_edge_ops(arch_ops(arch)).edge_ops
    a = sum((i + 1) * (NB201_PRIMITIVES.index(op) + 1) for i, op in enumerate(ops))
    return float(a), 100.0 - a / 3


def arch_ops(arch: str):
    return [tok.split("~")[0] for part in arch.strip("|").split("|+|") for tok in part.split("|")]


def write_table(path: Path, skip: set[str] = frozenset()) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "cifar10_test", "cifar100_valid", "index"])
        for i, ops in enumerate(itertools.product(NB201_PRIMITIVES, repeat=6)):
            arch = str(NB201Genotype.from_edge_ops(list(ops)))
            if arch not in skip:
                w.writerow([arch, *fake_accuracy(arch), i])


def test_csv_lookup_and_bad_tables(tmp_path):
    table_path = tmp_path / "t.csv"
    write_table(table_path)
    table = BenchmarkTable.load(table_path)
    resnet = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
    c10, c100 = fake_accuracy(resnet)
    assert table.columns == ["cifar10_test", "cifar100_valid"]  # `index` is not an accuracy
    assert table.lookup(NB201Genotype.from_edge_ops(arch_ops(resnet))) == {"cifar10_test": c10, "cifar100_valid": c100}
    assert table.lookup("|not~0|+|a~0|cell~1|") is None
    with pytest.raises(BenchmarkError, match=r"benchmark.path=.*nope.csv not found"):
        BenchmarkTable.load(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_text("name,acc\nx,1\n")
    with pytest.raises(BenchmarkError, match="has no 'arch' column; its columns: name, acc"):
        BenchmarkTable.load(tmp_path / "bad.csv")
    with pytest.raises(BenchmarkError, match="no accuracy column imagenet16_test; valid: cifar10_test"):
        BenchmarkTable.load(table_path, ["imagenet16_test"])


def logged_benchmark(metrics_csv: Path) -> list[dict]:
    with metrics_csv.open() as f:
        return [r for r in csv.DictReader(f) if r.get("benchmark/cifar10_test")]


@pytest.mark.slow
def test_search_logs_the_derived_cells_benchmark_accuracy_every_epoch(tmp_path):
    table = tmp_path / "nb201.csv"
    write_table(table)
    cfg = oneshot.compose("search", [*TINY, "benchmark=nb201", f"benchmark.path={table}", f"run_dir={tmp_path / 'run'}"])
    report = oneshot.search(cfg)
    per_epoch = report["genotypes_per_epoch"]
    assert len(per_epoch) == 3
    rows = logged_benchmark(tmp_path / "run" / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2]
    for row, genotype in zip(rows, per_epoch):  # the strings the search derived are the table's
        c10, c100 = fake_accuracy(genotype)
        assert float(row["benchmark/cifar10_test"]) == pytest.approx(c10)
        assert float(row["benchmark/cifar100_valid"]) == pytest.approx(c100)
    final = fake_accuracy(report["genotype"])
    assert report["benchmark"] == {"cifar10_test": final[0], "cifar100_valid": final[1]}
    saved = (tmp_path / "run" / "report.json").read_text()
    assert '"benchmark"' in saved and str(final[0]) in saved


@pytest.mark.slow
def test_an_arch_the_table_lacks_is_one_line_not_a_crash(tmp_path, caplog):
    # The first run tells which cells the search derives; a table without them all logs nothing.
    cfg = oneshot.compose("search", [*TINY, "trainer.max_epochs=1", f"run_dir={tmp_path / 'a'}"])
    derived = set(oneshot.search(cfg)["genotypes_per_epoch"])
    table = tmp_path / "partial.csv"
    write_table(table, skip=derived)
    cfg = oneshot.compose("search", [*TINY, "trainer.max_epochs=1", "benchmark=nb201",
                                     f"benchmark.path={table}", f"run_dir={tmp_path / 'b'}"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="oneshot"):
        report = oneshot.search(cfg)
    assert report["benchmark"] is None
    missing = [r.getMessage() for r in caplog.records if "is not in partial.csv" in r.getMessage()]
    assert len(missing) == 2  # the epoch's and the final genotype's lookups, one line each
    assert not logged_benchmark(tmp_path / "b" / "metrics.csv")


def test_a_missing_table_or_another_space_stops_before_the_run(tmp_path):
    cfg = oneshot.compose("search", [*TINY, "benchmark=nb201", f"benchmark.path={tmp_path / 'none.csv'}",
                                     f"run_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(BenchmarkError, match="none.csv not found"):
        oneshot.search(cfg)
    assert not (tmp_path / "run" / "report.json").exists()
    write_table(tmp_path / "t.csv")
    darts = oneshot.compose("search", ["space=darts", "benchmark=nb201", f"benchmark.path={tmp_path / 't.csv'}"])
    with pytest.raises(BenchmarkError, match="needs space=nb201, not space=darts"):
        oneshot.search(darts)
