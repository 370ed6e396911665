"""W&B tracking through real offline runs: what lands in the run's files is read back.

wandb 0.31 ships no Python reader of its transaction log (``run-<id>.wandb``), so ``records``
below reads it: the LevelDB log format wandb writes (a 7-byte header, 32 KiB blocks of records,
each a 7-byte header - CRC, length, type full/first/middle/last - and a protobuf ``Record``).
"""

import base64
import csv
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from oneshot.lightning_modules.base import NonFiniteLossError
from oneshot.lightning_modules.runs import _wandb_mode
from test_plots import TINY, pixels
from wandb.proto import wandb_internal_pb2 as pb

import oneshot

SEARCH = Path(sys.executable).parent / "oneshot-search"


def records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def offline_run(run_dir: Path, teardown: bool = True) -> tuple[Path, dict]:
    """The run's records, read once the file is complete. ``wandb.finish()`` only asks the
    wandb-core process to close the run's stream; its writer keeps the last 32 KiB block in memory
    until that stream closes, which a busy machine delays past finish() (the artifact records,
    logged last, were then missing). ``wandb.teardown()`` returns when wandb-core has closed
    every stream and exited, so the file is whole: a wait on an event, not on time. (Runs made
    in a subprocess are whole once it exits: its atexit teardown does the same.)"""
    import wandb

    if teardown:
        wandb.teardown()
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    by_kind: dict = {}
    for r in records(next(run.glob("run-*.wandb"))):
        by_kind.setdefault(r.WhichOneof("record_type"), []).append(r)
    return run, by_kind


def history(rec: dict) -> dict:
    """Every logged key's values in order (W&B's summary shows each key's last one)."""
    out: dict = {}
    for r in rec.get("history", []):
        for item in r.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            out.setdefault(key, []).append(json.loads(item.value_json))
    return out


def md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.slow
def test_offline_run_holds_pictures_genotype_table_and_artifacts(tmp_path):
    report = oneshot.search(
        oneshot.compose("search", [f"run_dir={tmp_path}", "logger=wandb", *TINY])
    )
    run, rec = offline_run(tmp_path)
    retrain_run, retrain_rec = offline_run(tmp_path / "retrain", teardown=False)
    files = run / "files" / "media"

    # Images: each epoch's heatmap and cell picture, decoded, equal to the run directory's PNGs.
    for what in ("alphas", "cell"):
        logged = sorted(
            (files / "images" / "pictures" / what).glob("cell_*.png"),
            key=lambda p: int(p.name.split("_")[1]),
        )
        assert len(logged) == 2
        for epoch, png in enumerate(logged):
            pixels(png)
            assert (
                png.read_bytes()
                == (
                    tmp_path / "plots" / "epochs" / f"epoch_{epoch:03d}_{what}_cell.png"
                ).read_bytes()
            )
    for media, name in ((files, "curves"), (retrain_run / "files" / "media", "retrain_curves"), (files, "alpha_evolution_cell")):
        (png,) = (media / "images" / "plots").glob(f"{name}_*.png")
        pixels(png)

    # The genotype table: the last one logged lists every epoch's genotype, as report.json does.
    tables = sorted(
        (files / "table" / "arch").glob("genotypes_*.table.json"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["epoch", "genotype"]
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert table["data"] == [[e, g] for e, g in enumerate(on_disk["genotypes_per_epoch"])]
    assert on_disk["genotypes_per_epoch"] == report["genotypes_per_epoch"]

    # Artifacts: the manifests name the run's files with their MD5 digests; staged copies match.
    arts = {  # the genotype is the search run's artifact, the network the retraining run's
        a.artifact.type: a.artifact
        for r, kind in ((rec, "genotype"), (retrain_rec, "model"))
        for a in r["artifact"]
        if a.artifact.type == kind
    }
    entries = {t: {e.path: e for e in a.manifest.contents} for t, a in arts.items()}
    assert set(entries["genotype"]) == {"genotype.txt", "genotype.json"}
    # the retrained network with its deployable exports (retrain.export's default: both formats)
    assert set(entries["model"]) == {"network.pt", "model.onnx", "model.pt"} - (
        set() if (tmp_path / "retrain" / "model.onnx").is_file() else {"model.onnx"}
    )
    assert (tmp_path / "retrain" / "model.pt").is_file()
    exported = json.loads((tmp_path / "retrain" / "report.json").read_text())["export"]
    metadata = json.loads(arts["model"].metadata)
    assert metadata["export"]["torchscript"]["parity_max_abs_diff"] == exported["torchscript"]["parity_max_abs_diff"]
    assert metadata["export"]["torchscript"]["latency_ms"] == exported["torchscript"]["latency"]["median_ms"]
    for t, source in (("genotype", tmp_path), ("model", tmp_path / "retrain")):
        for name, entry in entries[t].items():
            assert entry.digest == md5_b64(source / name)
            assert entry.size == (source / name).stat().st_size
            assert Path(entry.local_path).read_bytes() == (source / name).read_bytes()
    model_meta = json.loads(arts["model"].metadata)
    assert model_meta["test_acc"] == report["retrain"]["test_acc"]
    assert (
        json.loads(arts["genotype"].metadata)["genotype"]
        == (tmp_path / "genotype.txt").read_text().strip()
    )

    # Both runs' config is the resolved Hydra config, exactly (no datamodule values merged in).
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for r in (rec, retrain_rec):
        updates = [u for x in r["run"] for u in x.run.config.update] + [u for x in r.get("config", []) for u in x.config.update]
        config = {u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"}
        assert config == resolved
    assert resolved["run_dir"] == str(tmp_path) and resolved["strategy"]["_target_"].endswith("DartsSearch")

    # Two runs in one group: the search and its retraining, named after it, each ended cleanly.
    search, retrain = rec["run"][0].run, retrain_rec["run"][0].run
    assert (search.job_type, retrain.job_type) == ("search", "retrain")
    assert search.run_group == retrain.run_group == f"search-{tmp_path.name}"
    assert retrain.display_name == f"{search.display_name or search.run_id}-retrain"
    assert [r.exit.exit_code for r in rec["exit"]] == [0] == [r.exit.exit_code for r in retrain_rec["exit"]]

    # Summaries mean what they say: each run's last val/acc is its own stage's (metrics.csv).
    def last_val_acc(path):
        with open(path, newline="") as f:
            return [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")][-1]

    h, hr = history(rec), history(retrain_rec)
    assert h["val/acc"][-1] == pytest.approx(last_val_acc(tmp_path / "metrics.csv"))
    assert hr["val/acc"][-1] == pytest.approx(last_val_acc(tmp_path / "retrain" / "metrics.csv"))
    assert hr["test/acc"][-1] == pytest.approx(report["retrain"]["test_acc"], abs=1e-4)
    assert "test/acc" not in h and not any(k.startswith("alpha/") for k in hr)
    for steps in (h["trainer/global_step"], hr["trainer/global_step"]):
        assert steps == sorted(steps)  # one step axis per run, never restarting


@pytest.mark.slow
def test_failed_run_is_finished_with_a_nonzero_exit_code(tmp_path):
    # The search logs to W&B, then retraining fails (lr 1e30: its second step's loss is not
    # finite; bad values that config validation catches would stop the run before W&B starts):
    # the error propagates and the W&B run is still finished, marked failed.
    overrides = [
        f"run_dir={tmp_path}",
        "logger=wandb",
        *TINY,
        "trainer.max_epochs=1",
        "retrain.optimizer.lr=1e30",
    ]
    with pytest.raises(NonFiniteLossError, match="retraining loss"):
        oneshot.search(oneshot.compose("search", overrides))
    _, rec = offline_run(tmp_path)
    _, retrain_rec = offline_run(tmp_path / "retrain", teardown=False)
    assert [r.exit.exit_code for r in rec["exit"]] == [0]  # the search itself succeeded
    assert [r.exit.exit_code for r in retrain_rec["exit"]] == [1]
    assert (tmp_path / "genotype.txt").exists()  # what the search produced is kept


@pytest.mark.slow
def test_multirun_jobs_share_a_group_and_are_named_by_their_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [str(SEARCH), "-m", "seed=0,1", "logger=wandb", "retrain.enabled=false", "data=digits", "data.batch_size=16",
           "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [offline_run(sweep / str(job))[1]["run"][0].run for job in (0, 1)]
    assert runs[0].run_group == runs[1].run_group == f"search-{sweep.name}"
    # Named by Hydra's override_dirname: the job's overrides, the swept one included.
    assert "seed=0" in runs[0].display_name.split(",") and "seed=1" in runs[1].display_name.split(
        ","
    )
    assert runs[0].display_name.replace("seed=0", "seed=1") == runs[1].display_name
    assert all(r.job_type == "search" for r in runs)
    assert "wandb sync" in done.stderr + done.stdout


def test_auto_mode_is_offline_without_key_or_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_API_KEY", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", os.environ["WANDB_DIR"])  # no netrc login from the user
    monkeypatch.setenv("NETRC", os.path.join(os.environ["WANDB_DIR"], "no-netrc"))
    assert _wandb_mode("auto") == ("offline", "no API key")
    # A key but a server that does not answer (a closed local port): offline, not a stalled init.
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert _wandb_mode("auto") == ("offline", "127.0.0.1 unreachable")
    assert _wandb_mode("online") == ("online", "logger.wandb.mode")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert _wandb_mode("auto") == ("disabled", "WANDB_MODE")


def test_offline_hint_names_the_sync_command(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="oneshot")
    overrides = [f"run_dir={tmp_path}", "logger=wandb", "+trainer.fast_dev_run=true", "data=digits",
                 "data.batch_size=8", "retrain.enabled=false"]  # fmt: skip
    oneshot.search(oneshot.compose("search", overrides))
    run, _ = offline_run(tmp_path)
    assert f"wandb sync {run}" in caplog.text
