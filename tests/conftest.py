"""Shared test set-up: a quiet, offline W&B confined to a temp dir, deterministic torch."""

import os
import tempfile

import pytest
import torch

_WANDB_TMP = tempfile.mkdtemp(prefix="oneshot-wandb-")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
    os.environ.setdefault(var, _WANDB_TMP)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One thread for the tests and the apps they start: the nets here are tiny (a second thread buys
# nothing), and on this 2-core machine a long pytest process ended up with tiny convolutions
# taking minutes inside OpenMP regions (seen in oneDNN's 1x1 conv backward, both cores busy)
# after a few hundred tests; one thread per process has no such parallel region at all.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny nets gain nothing from a second one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
