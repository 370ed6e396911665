"""Retraining a derived architecture from scratch: SGD with cosine decay per epoch, the
auxiliary-head loss, a drop-path probability that grows linearly over training, and (in the data
module) Cutout. The values are a recipe (conf/retrain/): DARTS' evaluation protocol (sec. 3.2;
the defaults here) or NAS-Bench-201's (Nesterov SGD, no auxiliary loss, no drop path). Validation
runs on images held out of the training set; the test set only in ``test_step``, once.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from oneshot.lightning_modules.base import (
    NonFiniteLossError,
    accuracy_metric,
    epoch_summary,
    info,
    num_classes_of,
)
from oneshot.lightning_modules.checkpoint_hparams import RebuildFromConfig
from torch.optim.lr_scheduler import CosineAnnealingLR
from torchmetrics import MeanMetric


class Retrain(RebuildFromConfig, pl.LightningModule):
    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: Callable | None = None,
        lr_min: float = 0.0,
        auxiliary_weight: float = 0.4,
        drop_path_prob: float = 0.2,
    ):
        super().__init__()
        self.network = network
        self.optimizer = optimizer or (lambda params: torch.optim.SGD(params, 0.025, 0.9, weight_decay=3e-4))
        self.lr_min, self.auxiliary_weight, self.drop_path_prob = lr_min, auxiliary_weight, drop_path_prob
        # One metric object per stage (torchmetrics): epoch values over all batches and DDP ranks.
        classes = num_classes_of(network)
        self.train_acc, self.val_acc, self.test_acc = (accuracy_metric(classes) for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()

    def forward(self, x):
        out = self.network(x)
        return out[0] if isinstance(out, tuple) else out

    def on_train_epoch_start(self):
        self.train_loss.reset()
        self.train_acc.reset()
        # Drop path grows linearly from 0 to its maximum over training (DARTS' train.py).
        if hasattr(self.network, "drop_path_prob"):
            epochs = max(1, self.trainer.max_epochs or 1)
            self.network.drop_path_prob = self.drop_path_prob * self.current_epoch / epochs

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.network(x)
        logits, logits_aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits, y)
        if logits_aux is not None and self.auxiliary_weight > 0:
            loss = loss + self.auxiliary_weight * F.cross_entropy(logits_aux, y)
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(
                f"retraining loss is {float(loss)} at epoch {self.current_epoch}, step {self.global_step}; "
                "stopping; the last good checkpoint is kept"
            )
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc(logits.detach(), y), prog_bar=True)
        return loss

    def _evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        loss, acc = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_acc")
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        acc.update(logits, y)
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/acc", acc, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self._validated_epoch = self.current_epoch

    def on_train_epoch_end(self):
        """One plain line per epoch (what a piped run shows instead of a progress bar)."""
        info(f"retrain epoch {self.current_epoch}: {epoch_summary(self)}")

    def configure_optimizers(self):
        opt = self.optimizer(params=self.network.parameters())
        epochs = max(1, self.trainer.max_epochs or 1)
        return {"optimizer": opt, "lr_scheduler": CosineAnnealingLR(opt, T_max=epochs, eta_min=self.lr_min)}


def export_retrained(network: torch.nn.Module, out_dir, cfg, formats, input_shape, fast_dev_run=False) -> dict | None:
    """Issue 17: the retrained network as ``model.onnx`` and ``model.pt`` (TorchScript) beside its
    ``network.pt``, each checked against it on the run's test images and timed with the latency
    protocol (``cost.device``, ``cost.batch_size``, ``cost.threads``, ``cost.warmup``,
    ``cost.repeats`` where the config has them). ``retrain.export=[]`` turns it off, and a
    ``trainer.fast_dev_run`` (a debugging run, which writes no checkpoints either) skips it. A
    format that fails, or ONNX without the ``onnx`` extra, is said and recorded, never fatal: the
    weights are already saved."""
    from omegaconf import OmegaConf

    from oneshot.export import PARITY_IMAGES, export_network, missing_onnx_packages
    from oneshot.result_cost import latency_protocol
    from oneshot.run_network import real_inputs

    formats = list(formats or [])
    if formats and fast_dev_run:
        info("exports skipped: trainer.fast_dev_run is a debugging run (oneshot-export RUN_DIR writes them)")
        return {"skipped": "trainer.fast_dev_run"}
    missing = missing_onnx_packages() if "onnx" in formats else []
    skipped = {}
    if missing:
        info(f"ONNX export skipped: it needs {', '.join(missing)} (pip install 'oneshot[onnx]'; "
             "retrain.export=[torchscript] to export TorchScript only)")  # fmt: skip
        formats.remove("onnx")
        skipped["onnx"] = {"file": None, "error": f"not installed: {', '.join(missing)}"}
    if not formats:
        return skipped or None

    data = OmegaConf.to_container(cfg.data, resolve=True)
    inputs, described = real_inputs(data, PARITY_IMAGES, input_shape)
    report = export_network(network, out_dir, inputs, formats, inputs_description=described, keep_going=True,
                            **latency_protocol(cfg))  # fmt: skip
    return {**report, **skipped}
