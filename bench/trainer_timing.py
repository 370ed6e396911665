"""The timing harness both sides of ``bench/vs_nni.py`` share: a bilevel batch and a real
Lightning ``Trainer`` whose callback times every ``training_step``. Imports neither oneshot nor
NNI, so it runs under either venv's python."""

from __future__ import annotations

import resource
import time


def bilevel_pair(batch: int) -> dict:
    """One ``{"train", "val"}`` pair of random CIFAR-shaped batches (10 classes)."""
    import torch

    def one():
        return torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    return {"train": one(), "val": one()}


def timed_fit(module, batch: int, steps: int, warmup: int) -> dict:
    """Fit ``module`` for ``warmup + steps`` steps on one repeated pair; per-step wall and CPU
    seconds after the warm-up, peak RSS of this process and the thread count."""
    import pytorch_lightning as pl
    import torch

    class Timer(pl.Callback):
        def __init__(self):
            self.times, self.cpu = [], []

        def on_train_batch_start(self, *a):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, *a):
            self.times.append(time.perf_counter() - self._t)
            self.cpu.append(time.process_time() - self._c)

    timer = Timer()
    loader = torch.utils.data.DataLoader([bilevel_pair(batch)] * (warmup + steps), batch_size=None)
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
        accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": timer.times[warmup:], "cpu": timer.cpu[warmup:],
            "peak_rss_mb": round(peak_kb / 1024, 1), "threads": torch.get_num_threads()}  # fmt: skip
