"""W&B media from the rendering callbacks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import WandbLogger


def log_wandb_image(trainer: pl.Trainer, key: str, path: str | Path, caption: str | None = None) -> None:
    """Log the PNG at `path` under `key` at the trainer's global step, to every W&B logger (none: no-op)."""
    extra = {"caption": [caption]} if caption is not None else {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step, **extra)
