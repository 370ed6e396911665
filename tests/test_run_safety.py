"""Run safety (issue 13, items 1-7), through the real apps and the Python API: files never run
code when loaded, a resume is the same run, one process per run directory, a moved run
directory resumes correctly, an explicit checkpoint resumes the stage it belongs to, nothing is
written outside a run directory, and errors never echo the contents of other files."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oneshot.lightning_modules.run_safety import lock_run_dir

import oneshot
from oneshot import plots
from oneshot.genotypes import GenotypeError, resolve

BIN = Path(sys.executable).parent
# One search epoch and one retraining epoch of one batch each: seconds, and every file a run writes.
TINY = {
    "data": "digits", "data.batch_size": "16", "space": "nb201", "space.supernet.C": "4", "space.supernet.N": "1",
    "space.network.C": "4", "logger.pictures": "false", "trainer.max_epochs": "1", "+trainer.limit_train_batches": "1",
    "callbacks.model_checkpoint.save_top_k": "-1",  # every epoch's checkpoint: the tests resume from them
    "+trainer.limit_val_batches": "0", "retrain.trainer.max_epochs": "1", "+retrain.trainer.limit_train_batches": "1",
    "+retrain.trainer.limit_val_batches": "0", "+retrain.trainer.limit_test_batches": "1",
}  # fmt: skip


def overrides(run_dir, **changes) -> list[str]:
    """TINY with some values changed (Hydra refuses the same key twice)."""
    values = {**TINY, **{k.replace("__", "."): v for k, v in changes.items()}}
    return [f"{k}={v}" for k, v in values.items()] + [f"run_dir={run_dir}"]


def app(name, *args, cwd):
    return subprocess.run(
        [str(BIN / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def one_error_line(proc) -> str:
    """Exit status 2, no traceback, exactly one ``error:`` line, which is returned."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return line


def digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and a hash of its bytes: "nothing changed" made checkable."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny search + retraining; tests work on copies of it."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    oneshot.search(oneshot.compose("search", overrides(run_dir)))
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def epoch_of(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


# ---- 1. loading a file never runs code ------------------------------------------------------------


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted file runs."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted(path: Path, marker: Path, kind: str) -> Path:
    payload = _CreatesFile(marker)
    obj = {
        "export": {"genotype": "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|none~2|", "network_kwargs": {},
                   "state_dict": {"x": payload}},
        "search_ckpt": {"epoch": 0, "global_step": 1, "state_dict": {"supernet.alphas.cell": payload}},
    }[kind]  # fmt: skip
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind", ["export", "search_ckpt"])
def test_crafted_pickles_would_run_code_when_loaded_unsafely(tmp_path, kind):
    """The control: the crafted files are live, so the tests below can fail."""
    marker = tmp_path / "ran"
    torch.load(crafted(tmp_path / "f.pt", marker, kind), weights_only=False)
    assert marker.exists()


def test_load_network_refuses_a_crafted_pickle_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = crafted(tmp_path / "network.pt", marker, "export")
    with pytest.raises(ValueError, match="cannot be loaded safely") as e:
        oneshot.load_network(path)
    assert not marker.exists()
    assert (
        str(path) in str(e.value)
        and "not a oneshot export" in str(e.value)
        and "\n" not in str(e.value)
    )


@pytest.mark.parametrize(
    "bad", ["not_a_dict", "no_state_dict", "truncated", "genotype_names_a_file", "code_in_kwargs"]
)
def test_load_network_refuses_what_is_not_an_export(finished_run, tmp_path, bad):
    export = finished_run / "retrain" / "network.pt"
    path = tmp_path / "network.pt"
    bundle = torch.load(export, weights_only=True)
    if bad == "not_a_dict":
        torch.save([1, 2], path)
    elif bad == "no_state_dict":
        torch.save({"genotype": bundle["genotype"], "network_kwargs": {}}, path)
    elif bad == "truncated":
        path.write_bytes(export.read_bytes()[: export.stat().st_size // 2])
    elif (
        bad == "genotype_names_a_file"
    ):  # resolve() would read it; an export's string is parsed only
        torch.save({**bundle, "genotype": str(finished_run / "genotype.txt")}, path)
    else:
        torch.save({**bundle, "network_kwargs": {"C": "__import__('os')"}}, path)
    with pytest.raises(ValueError) as e:
        oneshot.load_network(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_load_network_rebuilds_a_real_export(finished_run):
    export = finished_run / "retrain" / "network.pt"
    net = oneshot.load_network(export)
    saved = torch.load(export, weights_only=True)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items()) and not net.training


@pytest.mark.parametrize("strategy", ["darts", "enas"])
def test_everything_a_run_writes_loads_with_weights_only(finished_run, tmp_path, strategy):
    if strategy == "darts":
        run_dir = finished_run
    else:
        run_dir = tmp_path / "enas"
        oneshot.search(
            oneshot.compose("search", overrides(run_dir, strategy="enas", retrain__enabled="false"))
        )
    files = [*run_dir.rglob("*.ckpt"), *run_dir.rglob("network.pt")]
    assert len(files) >= 2
    for f in files:
        assert isinstance(torch.load(f, map_location="cpu", weights_only=True), dict), f


@pytest.mark.parametrize(
    "name, ckpt, expected",
    [
        ("oneshot-search", "code", "cannot be loaded safely"),
        ("oneshot-retrain", "code", "cannot be loaded safely"),
        ("oneshot-search", "foreign", "not a oneshot checkpoint"),
        ("oneshot-search", "empty", "cannot be loaded safely"),
        ("oneshot-retrain", "search", "is a search checkpoint"),
    ],
)
def test_apps_refuse_a_bad_ckpt_path_in_one_line_before_making_a_run_dir(
    finished_run, tmp_path, name, ckpt, expected
):
    marker, path = tmp_path / "ran", tmp_path / "x.ckpt"
    if ckpt == "code":
        crafted(path, marker, "search_ckpt")
    elif ckpt == "foreign":
        torch.save({"epoch": 0, "state_dict": {"fc.weight": torch.zeros(2, 2)}}, path)
    elif ckpt == "empty":
        path.write_bytes(b"")
    else:
        shutil.copy(finished_run / "checkpoints" / "last.ckpt", path)
    args = [*TINY_ARGS[name], f"run_dir={tmp_path / 'new'}", f"ckpt_path={path}"]
    line = one_error_line(app(name, *args, cwd=tmp_path))
    assert expected in line and str(path) in line
    assert not marker.exists() and not (tmp_path / "new").exists()


TINY_ARGS = {
    "oneshot-search": [f"{k}={v}" for k, v in TINY.items()],
    "oneshot-retrain": [
        "data=digits",
        "genotype=NB201_RESNET",
        "network.C=4",
        "network.N=1",
        "logger.pictures=false",
    ],
}

# ---- 2. a resume is the same run --------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"seed": "1"}, "seed: 0 -> 1"),
        ({"space.supernet.C": "8"}, "space.supernet.C: 4 -> 8"),
        ({"strategy": "enas"}, "strategy._target_: "),
        ({"data.batch_size": "8"}, "data.batch_size: 16 -> 8"),
        ({"+trainer.limit_val_batches": "1"}, "trainer.limit_val_batches: 0 -> 1"),
    ],
)
def test_a_resume_that_changes_the_run_is_refused_before_anything_is_written(
    run_copy, change, shown
):
    before = digest(run_copy)
    cfg = oneshot.compose("search", [*overrides(run_copy, **{k.replace(".", "__"): v for k, v in change.items()}),
                                     "ckpt_path=last"])  # fmt: skip
    with pytest.raises(ValueError) as e:
        oneshot.search(cfg)
    message = str(e.value)
    assert shown in message and "\n" not in message and "ckpt_path=last" in message
    assert digest(run_copy) == before  # config.yaml, checkpoints, metrics: untouched


def test_the_app_refuses_a_changed_resume_in_one_line(run_copy):
    before = digest(run_copy)
    line = one_error_line(
        app("oneshot-search", *overrides(run_copy, seed="7"), "ckpt_path=last", cwd=run_copy.parent)
    )
    assert "seed: 0 -> 7" in line and str(run_copy) in line
    assert digest(run_copy) == before


# ---- 4. a moved or copied run directory resumes correctly -------------------------------------------


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_moved_or_copied_run_resumes_and_keeps_last_ckpt_the_latest(run_copy, tmp_path, how):
    dst = tmp_path / "elsewhere" / "run"
    dst.parent.mkdir()
    (shutil.move if how == "moved" else shutil.copytree)(run_copy, dst)
    original = digest(run_copy) if how == "copied" else None
    old_config = (dst / "config.yaml").read_text()
    retrain_last = (dst / "retrain" / "checkpoints" / "last.ckpt").read_bytes()
    oneshot.search(
        oneshot.compose("search", [*overrides(dst, trainer__max_epochs="2"), "ckpt_path=last"])
    )
    names = sorted(p.name for p in (dst / "checkpoints").iterdir())
    assert names == ["epoch=000.ckpt", "epoch=001.ckpt", "last.ckpt"], names
    assert epoch_of(dst / "checkpoints" / "last.ckpt") == 1
    state = torch.load(dst / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (ckpt_state,) = [v for k, v in state.items() if k.startswith("ModelCheckpoint")]
    assert Path(ckpt_state["last_model_path"]).parent == (dst / "checkpoints").resolve()
    # The search went on (its genotype may have changed), so its retraining started over.
    assert sorted(p.name for p in (dst / "retrain" / "checkpoints").iterdir()) == [
        "epoch=000.ckpt",
        "last.ckpt",
    ]
    assert (dst / "retrain" / "checkpoints" / "last.ckpt").read_bytes() != retrain_last
    # The allowed change is written, and the config it replaced is kept.
    assert (
        "max_epochs: 2" in (dst / "config.yaml").read_text()
        and (dst / "config.v1.yaml").read_text() == old_config
    )
    if original is not None:
        assert digest(run_copy) == original  # resuming a copy leaves the original as it was


# ---- 5. an explicit checkpoint resumes the stage it belongs to --------------------------------------


@pytest.mark.parametrize("ckpt", ["checkpoints/epoch=000.ckpt", "retrain/checkpoints/last.ckpt"])
def test_an_explicit_checkpoint_resumes_its_own_stage_and_the_other_continues(run_copy, ckpt):
    search_last = (run_copy / "checkpoints" / "last.ckpt").read_bytes()
    path = run_copy / ckpt
    cfg = oneshot.compose(
        "search", [*overrides(run_copy, retrain__trainer__max_epochs="2"), f'ckpt_path="{path}"']
    )
    report = oneshot.search(cfg)
    # The search had ended at epoch 0: nothing to redo, its checkpoint stays; the retraining went on.
    assert (run_copy / "checkpoints" / "last.ckpt").read_bytes() == search_last
    assert epoch_of(run_copy / "retrain" / "checkpoints" / "last.ckpt") == 1
    assert (run_copy / "retrain" / "checkpoints" / "epoch=001.ckpt").exists() and report["retrain"][
        "epochs"
    ] == 2


# ---- 3. one process per run directory ------------------------------------------------------------------

HOLDER = (
    "import sys; from pathlib import Path; from oneshot.lightning_modules.run_safety import lock_run_dir; "
    "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()"
)


@pytest.mark.parametrize("name", ["oneshot-search", "oneshot-retrain"])
def test_a_second_process_is_refused_with_the_holders_pid_and_a_killed_holder_frees_the_dir(
    tmp_path, name
):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"  # waits on what the holder writes
        line = one_error_line(app(name, *TINY_ARGS[name], f"run_dir={run_dir}", cwd=tmp_path))
        assert f"PID {holder.pid}" in line and str(run_dir) in line and "in use" in line
        assert sorted(p.name for p in run_dir.iterdir()) == [
            ".lock"
        ]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(run_dir)  # the OS released the killed holder's lock
    lock_run_dir(run_dir)  # and a process may take its own lock again (the API resumes in-process)
    assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


# ---- 6. nothing written outside the run directory ------------------------------------------------------


@pytest.mark.parametrize(
    "cell_type", ["../../../../../escaped", "x/../../../../../escaped", "..", "/tmp/escaped"]
)
def test_oneshot_plot_keeps_names_from_run_files_inside_the_run_dir(tmp_path, cell_type):
    run_dir = tmp_path / "a" / "b" / "c" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,1,2.0\n")
    rows = [{"round": 0, "stage": "op", "cell_type": cell_type, "edge": "1<-0", "op": op, "ntk": 1.0, "regions": 2.0,
             "ntk_change": 0.1 * i, "regions_change": -0.1 * i, "pruned": i == 0} for i, op in enumerate(["none", "skip_connect"])]  # fmt: skip
    (run_dir / "warmstart.json").write_text(json.dumps({"history": rows}))
    before = set(tmp_path.rglob("*"))
    assert plots.main([str(run_dir), "--no-dot"]) == 0
    new = set(tmp_path.rglob("*")) - before
    plots_dir = run_dir / "plots"
    assert new and all(p == plots_dir or plots_dir in p.parents for p in new), sorted(map(str, new))
    assert [p.name for p in plots_dir.glob("tenas_*.png")] == [
        f"tenas_{plots.safe_name(cell_type)}.png"
    ]
    assert not Path("/tmp/escaped.png").exists()


# ---- 7. error messages do not echo other files ----------------------------------------------------------

SECRET = "SECRET-TOKEN-4242"


@pytest.mark.parametrize(
    "content",
    [
        SECRET,
        f"|{SECRET}~0|",
        f"Genotype(normal={SECRET})",
        f'{{"genotype": "{SECRET}"}}',
        f'{{"key": "{SECRET}"}}',
        b"\xff\xfe" + SECRET.encode(),
        f"| user | {SECRET} |\n|---|---|",
    ],  # fmt: skip
)
def test_a_file_that_is_not_a_genotype_is_named_not_shown(tmp_path, content):
    path = tmp_path / "credentials"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(GenotypeError) as e:
        resolve(str(path))
    assert (
        SECRET not in str(e.value)
        and str(path) in str(e.value)
        and "not a genotype file" in str(e.value)
    )


@pytest.mark.parametrize("content", [SECRET, f"|{SECRET}~0|"])
def test_oneshot_retrain_never_prints_a_files_contents(tmp_path, content):
    path = tmp_path / "credentials"
    path.write_text(content)
    proc = app(
        "oneshot-retrain",
        f"genotype={path}",
        "data=digits",
        f"run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = one_error_line(proc)
    assert (
        SECRET not in proc.stderr + proc.stdout
        and str(path) in line
        and "not a genotype file" in line
    )
