"""Multi-process search: 2 real CPU DDP processes (gloo, through the real ``oneshot-search``
app) against 1 process, for DARTS first and second order, ENAS, GDAS and DrNAS (SPOS:
tests/test_spos.py, which also checks its evolution).

The reference. DDP with per-rank batch B/2 averages the ranks' gradients, which is the gradient
of the mean loss over the whole batch B *except* for BatchNorm: in train mode each rank
normalises by its own half's statistics. So the exact 1-process reference is batch B with each
half normalised separately ("ghost batch norm"), the halves being the ranks' shards (every 2nd
image, see ``oneshot.data.shard_sampler``). ``trainer.sync_batchnorm=true`` would make plain
batch B the reference, but torch's SyncBatchNorm runs on GPUs only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oneshot.lightning_modules import pipeline

import oneshot

BIN = Path(sys.executable).parent
WORLD = 2
BATCH = 16  # the 1-process batch; each DDP rank gets BATCH // WORLD
TINY = [
    "data=digits", "data.augment=false", "space=nb201", "space.supernet.C=4", "space.supernet.N=1",
    "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=0",
    "retrain.enabled=false", "logger.pictures=false", "seed=3",
]  # fmt: skip
STRATEGIES = {
    "darts1": ["strategy=darts", "strategy.order=1"],
    # Second order in float64: its finite-difference Hessian-vector product divides by 2*eps
    # (eps = 0.01/||v||), which lifts float32 rounding (the ranks sum half batches) to ~1e-4 on
    # some CPUs' kernels; in float64 that noise is ~1e-12 and any real difference still shows.
    "darts2": ["strategy=darts", "strategy.order=2", "trainer.precision=64-true"],
    "enas": ["strategy=enas", "strategy.derive_samples=0"],
    "gdas": ["strategy=gdas"],
    "drnas": ["strategy=drnas"],
}
# What the architecture is made of: DARTS' alphas, ENAS' controller.
ARCH_KEYS = ("supernet.alphas.", "controller.")


def arch_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(ARCH_KEYS)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def ddp_search(tmp_path, args) -> Path:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run(
        [str(BIN / "oneshot-search"), "trainer=ddp_cpu", f"trainer.devices={WORLD}", f"data.batch_size={BATCH // WORLD}",
         *TINY, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # one Hydra run directory for both ranks
    assert (run_dirs[0] / "train_ddp_process_1.log").exists()  # rank 1 ran there, not elsewhere
    return run_dirs[0]


def one_process_search(run_dir: Path, args, monkeypatch, ghost_bn: bool) -> dict:
    """The reference run, in this process; ``ghost_bn``: BatchNorm per would-be rank shard."""
    build = pipeline.build_supernet

    def build_with_ghost_bn(*a, **k):
        net = build(*a, **k)
        forward = net.forward

        def per_shard_forward(x, weights=None):
            # Rank r's images are x[r::WORLD]; interleave the shards' logits back into place.
            parts = [forward(x[r::WORLD], weights) for r in range(WORLD)]
            return torch.stack(parts, dim=1).reshape(len(x), -1)

        net.forward = per_shard_forward
        return net

    if ghost_bn:
        monkeypatch.setattr(pipeline, "build_supernet", build_with_ghost_bn)
    cfg = oneshot.compose("search", [*TINY, *args, f"data.batch_size={BATCH}", f"run_dir={run_dir}"])
    report = oneshot.search(cfg)
    monkeypatch.setattr(pipeline, "build_supernet", build)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_end_with_the_architecture_of_one(strategy, tmp_path, monkeypatch):
    args = STRATEGIES[strategy]
    ddp_dir = ddp_search(tmp_path, args)
    report = json.loads((ddp_dir / "report.json").read_text())
    # The run checked that every rank ended with rank 0's parameters (alphas, controller,
    # weights) and genotype; it fails loudly otherwise.
    assert report["ddp"] == {"world_size": WORLD, "max_parameter_diff_across_ranks": 0.0}

    ref = one_process_search(tmp_path / "ref", args, monkeypatch, ghost_bn=True)
    diff = max_diff(arch_state(ddp_dir), arch_state(tmp_path / "ref"))
    print(f"{strategy}: max |arch(2 processes) - arch(1 process, ghost BN)| = {diff:.3g}")
    assert diff < 1e-5
    assert ref["genotype"] == report["genotype"]
    assert (ddp_dir / "genotype.txt").read_text().strip() == report["genotype"]

    if strategy == "darts1":  # without per-shard BN statistics the runs part: the test can tell
        plain = one_process_search(tmp_path / "plain", args, monkeypatch, ghost_bn=False)
        plain_diff = max_diff(arch_state(ddp_dir), arch_state(tmp_path / "plain"))
        print(f"{strategy}: max |arch(2 processes) - arch(1 process, full-batch BN)| = {plain_diff:.3g}")
        assert plain_diff > 10 * max(diff, 1e-7) and plain["genotype"]
