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
from torch.optim.lr_scheduler import CosineAnnealingLR

from lightning_modules.base import NonFiniteLossError, accuracy


class Retrain(pl.LightningModule):
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

    def forward(self, x):
        out = self.network(x)
        return out[0] if isinstance(out, tuple) else out

    def on_train_epoch_start(self):
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
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", accuracy(logits, y), prog_bar=True)
        return loss

    def _evaluate(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", accuracy(logits, y), prog_bar=True, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        opt = self.optimizer(params=self.network.parameters())
        epochs = max(1, self.trainer.max_epochs or 1)
        return {"optimizer": opt, "lr_scheduler": CosineAnnealingLR(opt, T_max=epochs, eta_min=self.lr_min)}
