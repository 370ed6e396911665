"""Benchmark tables: reading a CSV, the lookup, and the per-epoch benchmark accuracy of the
derived cell through the real search app (a table the test writes for every NB201 cell)."""

import csv
import itertools
import logging
from pathlib import Path

import pytest

import oneshot
from oneshot import plots
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


def test_plot_draws_benchmark_accuracy_per_epoch_only_when_logged(tmp_path):
    rows = [
        {"step": 3, "epoch": 0, "train/loss": 2.0},
        {"step": 3, "epoch": 0, "benchmark/cifar10_test": 90.0, "benchmark/cifar10_valid": 89.0,
         "benchmark/imagenet16_test": 40.0},
        {"step": 7, "epoch": 1, "benchmark/cifar10_test": 85.5, "benchmark/cifar10_valid": 84.0,
         "benchmark/imagenet16_test": 38.0},
    ]  # fmt: skip
    history = plots.benchmark_history(rows)
    assert history["benchmark/cifar10_test"] == [(0, 90.0), (1, 85.5)]
    fig = plots.benchmark_figure(rows)
    assert [ax.get_title() for ax in fig.axes] == ["cifar10", "imagenet16"]  # one panel a dataset
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["cifar10_test", "cifar10_valid"]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [40.0, 38.0]
    assert plots.benchmark_figure(rows[:1]) is None
    keys = sorted({k for r in rows for k in r})
    with (tmp_path / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    assert tmp_path / "plots" / "benchmark.png" in plots.redraw(tmp_path, epochs=False, use_dot=False)


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
    # oneshot-plot draws those accuracies per epoch: the figure's lines are the table's values.
    assert plots.main([str(tmp_path / "run"), "--no-epochs", "--no-dot"]) == 0
    assert (tmp_path / "run" / "plots" / "benchmark.png").stat().st_size > 0
    fig = plots.benchmark_figure(plots.read_metrics(tmp_path / "run" / "metrics.csv"))
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert sorted(lines) == ["cifar100_valid", "cifar10_test"]
    for column, i in (("cifar10_test", 0), ("cifar100_valid", 1)):
        assert list(lines[column].get_xdata()) == [0, 1, 2]
        assert list(lines[column].get_ydata()) == pytest.approx([fake_accuracy(g)[i] for g in per_epoch])


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


# ---- the official NAS-Bench-201 file, read through the real nas_201_api (optional extra nb201) ----

OFFICIAL_SETS = {  # dataset -> the eval sets the official file has for it
    "cifar10-valid": ("x-valid", "ori-test"),
    "cifar10": ("ori-test",),
    "cifar100": ("x-valid", "x-test", "ori-test"),
    "ImageNet16-120": ("x-valid", "x-test", "ori-test"),
}


def official_value(index: int, dataset: str, setname: str, hp: str) -> float:
    """The seed-mean final accuracy written for a cell (hp '12' rows are decoys)."""
    base = 50.0 + 7 * index + 3 * list(OFFICIAL_SETS).index(dataset) + 0.25 * len(setname)
    return base if hp == "200" else base - 40


def official_infos(archs: list[str], skip_imagenet: int, package: str = "nas_201_api") -> dict:
    """``arch2infos`` in NAS-Bench-201's / NATS-Bench's format, made with the package's own
    classes: ``{index: {hp key: ArchResults state}}`` (NB201's keys 'less'/'full', NATS' '12'/'200').
    Two seeds per dataset at +-1 around ``official_value`` on the last of two epochs (epoch 0 is a
    decoy)."""
    api_utils = __import__(f"{package}.api_utils", fromlist=["ArchResults"])
    keys = (("12", "less"), ("200", "full")) if package == "nas_201_api" else (("12", "12"), ("200", "200"))
    arch2infos = {}
    for index, arch in enumerate(archs):
        per_hp = {}
        for hp, key in keys:
            results = api_utils.ArchResults(index, arch)
            for dataset, sets in OFFICIAL_SETS.items():
                if dataset == "ImageNet16-120" and index == skip_imagenet:
                    continue  # a cell not trained on ImageNet16-120
                for seed, offset in ((777, 1.0), (888, -1.0)):
                    config = {"channel": 16, "num_cells": 5, "arch_str": arch, "class_num": 10}
                    trial = api_utils.ResultsCount(dataset, None, {0: 10.0, 1: 20.0}, {0: 2.0, 1: 1.0}, 0.1, 10.0,
                                                   config, seed, 2, None)  # fmt: skip
                    accs, losses, times = {}, {}, {}
                    for s in sets:
                        accs[f"{s}@0"], accs[f"{s}@1"] = 1.0, official_value(index, dataset, s, hp) + offset
                        losses[f"{s}@0"] = losses[f"{s}@1"] = 1.0
                        times[f"{s}@0"] = times[f"{s}@1"] = 0.1
                    trial.update_eval(accs, losses, times)
                    results.update(dataset, seed, trial)
            per_hp[key] = results.state_dict()
        arch2infos[index] = per_hp
    return arch2infos


def write_official(path: Path, archs: list[str], skip_imagenet: int) -> None:
    """NAS-Bench-201's .pth: {meta_archs, arch2infos, evaluated_indexes}, saved by torch."""
    import torch

    infos = official_infos(archs, skip_imagenet)
    torch.save({"meta_archs": archs, "arch2infos": infos, "evaluated_indexes": list(range(len(archs)))}, path)


def write_bz2_pickle(path: Path, data) -> None:
    """What NATS-Bench's pickle_save writes: a bz2-compressed pickle."""
    import bz2
    import pickle

    with bz2.open(path, "wb") as f:
        pickle.dump(data, f)


ARCHS = [
    "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|",
    "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|skip_connect~2|",
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",
]  # fmt: skip
OURS = {  # OFFICIAL's names -> (dataset, eval set) as NAS-Bench-201 defines them
    "cifar10_valid": ("cifar10-valid", "x-valid"), "cifar10_test": ("cifar10", "ori-test"),
    "cifar100_valid": ("cifar100", "x-valid"), "cifar100_test": ("cifar100", "x-test"),
    "imagenet16_valid": ("ImageNet16-120", "x-valid"), "imagenet16_test": ("ImageNet16-120", "x-test"),
}  # fmt: skip


def check_official_lookups(table, missing_cells=()):
    assert table.rows is None and table.api is not None  # the official API answers the lookups
    for index, arch in enumerate(ARCHS):
        found = table.lookup(NB201Genotype.from_edge_ops(arch_ops(arch)))
        if index in missing_cells:
            assert found is None
            continue
        expected = {name: official_value(index, d, s, "200") for name, (d, s) in OURS.items()
                    if not (index == 2 and d == "ImageNet16-120")}  # fmt: skip
        assert found == pytest.approx(expected)  # 200 epochs, the two seeds' mean, last epoch
    assert table.lookup("|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|") is None


def test_official_file_through_the_real_api(tmp_path):
    pytest.importorskip("nas_201_api")
    write_official(tmp_path / "NAS-Bench-201-tiny.pth", ARCHS, skip_imagenet=2)
    check_official_lookups(BenchmarkTable.load(tmp_path / "NAS-Bench-201-tiny.pth"))


def test_nats_bench_file_and_directory_through_the_real_api(tmp_path):
    """NATS-Bench's topology benchmark in both of its layouts: one .pickle.pbz2 file (the API's
    fast_mode=False) and the -simple directory, meta.pickle.pbz2 + one file per cell (fast_mode);
    a cell whose file the directory lacks is not in the table."""
    pytest.importorskip("nats_bench")
    infos = official_infos(ARCHS, skip_imagenet=2, package="nats_bench")
    whole = tmp_path / "NATS-tss-v1_0-tiny.pickle.pbz2"
    write_bz2_pickle(whole, {"meta_archs": ARCHS, "arch2infos": infos, "evaluated_indexes": [0, 1, 2]})
    check_official_lookups(BenchmarkTable.load(whole))

    simple = tmp_path / "NATS-tss-v1_0-tiny-simple"
    simple.mkdir()
    write_bz2_pickle(simple / "meta.pickle.pbz2", {"meta_archs": ARCHS})
    for index in (0, 2):  # cell 1's file is missing
        write_bz2_pickle(simple / f"{index:06d}.pickle.pbz2", infos[index])
    table = BenchmarkTable.load(simple)
    assert table.api.arch2infos_dict == {}  # nothing read before a lookup asks for it
    check_official_lookups(table, missing_cells={1})
    assert sorted(table.api.arch2infos_dict) == [0, 2]


def test_nats_bench_file_is_unpickled_safely_and_checked(tmp_path, caplog):
    pytest.importorskip("nats_bench")
    marker = tmp_path / "code-ran"
    write_bz2_pickle(tmp_path / "evil.pickle.pbz2", {"meta_archs": [], "arch2infos": _RunsCode(marker)})
    with pytest.raises(BenchmarkError, match=r"evil.pickle.pbz2 is not a NATS-Bench file we can read safely "
                                             r"\(plain data only\): it names pathlib"):  # fmt: skip
        BenchmarkTable.load(tmp_path / "evil.pickle.pbz2")
    assert not marker.exists()
    write_bz2_pickle(tmp_path / "other.pickle.pbz2", {"weights": [1.0]})
    with pytest.raises(BenchmarkError, match="it needs the keys meta_archs, arch2infos, evaluated_indexes; it has weights"):
        BenchmarkTable.load(tmp_path / "other.pickle.pbz2")
    simple = tmp_path / "bad-simple"
    simple.mkdir()
    write_bz2_pickle(simple / "meta.pickle.pbz2", {"meta_archs": ARCHS})
    write_bz2_pickle(simple / "000000.pickle.pbz2", {"200": _RunsCode(marker)})
    table = BenchmarkTable.load(simple)  # the cells' files are read at lookup, one by one
    cell = NB201Genotype.from_edge_ops(arch_ops(ARCHS[0]))
    with pytest.raises(BenchmarkError, match=r"bad-simple \(000000.pickle.pbz2\) is not a NATS-Bench file we can read safely"):
        table.lookup(cell)
    assert not marker.exists()
    # during a search the per-epoch lookup warns in one line and the search goes on
    from oneshot.lightning_modules.benchmark import accuracies

    with caplog.at_level(logging.WARNING, logger="oneshot"):
        assert accuracies(table, cell) is None
    (line,) = [r.getMessage() for r in caplog.records if "read safely" in r.getMessage()]
    assert line.startswith("benchmark: benchmark.path=") and "\n" not in line


class _RunsCode:
    """A pickle that would touch a file when unpickled with the pickle's full powers."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_official_file_is_unpickled_safely_and_checked(tmp_path):
    pytest.importorskip("nas_201_api")
    import torch

    marker = tmp_path / "code-ran"
    torch.save({"meta_archs": [], "arch2infos": _RunsCode(marker), "evaluated_indexes": []}, tmp_path / "evil.pth")
    with pytest.raises(BenchmarkError, match=r"evil.pth is not a NAS-Bench-201 file we can read safely"):
        BenchmarkTable.load(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    with pytest.raises(BenchmarkError, match="needs the keys meta_archs, arch2infos, evaluated_indexes; it has state_dict"):
        BenchmarkTable.load(tmp_path / "weights.pth")
