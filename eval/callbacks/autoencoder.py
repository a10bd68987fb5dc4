"""Autoencoder stage: reconstruction grids and the reconstruction FID (rFID).

Both read the reconstructions `AutoencoderModule.validation_step` / `test_step` return (float32, clamped
to [-1, 1]), so nothing is decoded twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import Tensor

from core.images import make_grid_png, to_uint8_nhwc
from eval.callbacks.media import log_wandb_image
from eval.features import DomainFeatures
from eval.metrics import fid_from_features
from lightning_modules.autoencoder import PERCEPTUAL_ROLE
from lightning_modules.nets.perceptual import autocast_off

SPLITS = ("val", "test")


class ReconstructionGrid(Callback):
    """On the first validation batch (rank 0): top row inputs, bottom row reconstructions, written to
    `<dirpath>/recon_step{N}.png` and logged to W&B as `val/reconstructions`.

    Args:
        num_images: images per row (capped by the batch size).
        dirpath: where the grids go; None: `<trainer.default_root_dir>/samples`.
    """

    def __init__(self, num_images: int = 8, dirpath: str | None = None) -> None:
        self.num_images = num_images
        self.dirpath = dirpath

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if batch_idx == 0 and dataloader_idx == 0 and trainer.is_global_zero:
            self.save(trainer, batch["image"], outputs)

    def save(self, trainer: pl.Trainer, inputs: Tensor, recons: Tensor) -> Path:
        n = min(self.num_images, len(inputs))
        images = to_uint8_nhwc(torch.cat([inputs[:n], recons[:n]]))
        root = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "samples"
        path = make_grid_png(images, nrow=n, path=root / f"recon_step{trainer.global_step}.png")
        log_wandb_image(trainer, "val/reconstructions", path, "top: inputs, bottom: reconstructions")
        return path


def gather_rows(pl_module: pl.LightningModule, x: Tensor) -> Tensor:
    """Concatenate (N_r, D) tensors of every rank, N_r possibly different (uneven eval shards)."""
    if pl_module.trainer.world_size == 1:
        return x
    counts = pl_module.all_gather(torch.tensor([len(x)], device=x.device)).reshape(-1).tolist()
    padded = F.pad(x, (0, 0, 0, max(counts) - len(x)))
    gathered = pl_module.all_gather(padded)  # (world, max N, D)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


class ReconstructionFID(Callback):
    """`val/rfid`, `test/rfid`: FID between the pooled features of the inputs and of their reconstructions,
    over the whole split (every rank's rows gathered), logged through the module so that it reaches
    `trainer.callback_metrics` (and so metrics.json and DONE).

    Features are computed in float32 with autocast off whatever `trainer.precision`, like the module's own
    reconstruction metrics: the score must not depend on the training precision.

    Args:
        checkpoint: feature_net checkpoint whose pooled features are compared; None: no rFID.
        role: the role that checkpoint must have been trained for (refused otherwise). The perceptual net:
            the eval net scores the final samples and stays unseen by every training stage.
    """

    def __init__(self, checkpoint: str | None, role: str = PERCEPTUAL_ROLE) -> None:
        self.checkpoint = checkpoint
        self.features: DomainFeatures | None = None
        if checkpoint:
            self.features = DomainFeatures(checkpoint, role=role, user="the autoencoder's rFID")
        self._parts: dict[str, list[tuple[Tensor, Tensor]]] = {split: [] for split in SPLITS}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # A config error before any compute, as the module's own data checks.
        channels = getattr(trainer.datamodule, "channels", None) if trainer.datamodule is not None else None
        if (
            self.features is not None
            and channels is not None
            and int(channels) != self.features.net.in_channels
        ):
            raise ValueError(
                f"data.channels={channels} but the feature net of callbacks.reconstruction_fid.checkpoint "
                f"({self.checkpoint}) takes {self.features.net.in_channels} channels"
            )

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts["val"] = []

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts["test"] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._collect("val", pl_module, batch["image"], outputs)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        self._collect("test", pl_module, batch["image"], outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("val", pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log("test", pl_module)

    def _collect(self, split: str, pl_module: pl.LightningModule, inputs: Tensor, recons: Tensor) -> None:
        if self.features is None:
            return
        if self.features.device != pl_module.device:
            self.features.to(pl_module.device)
        x = inputs.float()
        with torch.no_grad(), autocast_off(x.device):
            feats = self.features(torch.cat([x, recons.float()]))["pooled"].float()
        real, fake = feats.chunk(2)
        self._parts[split].append((real, fake))

    def _log(self, split: str, pl_module: pl.LightningModule) -> None:
        if self.features is None:
            return
        parts, self._parts[split] = self._parts[split], []
        empty = torch.zeros(0, self.features.feature_dim, device=pl_module.device)
        real = torch.cat([p[0] for p in parts]) if parts else empty
        fake = torch.cat([p[1] for p in parts]) if parts else empty
        # Every rank reaches the gathers, an empty shard included, so uneven shards cannot hang DDP.
        real, fake = gather_rows(pl_module, real), gather_rows(pl_module, fake)
        if len(real) >= 2:
            pl_module.log(f"{split}/rfid", fid_from_features(real.cpu(), fake.cpu()))
