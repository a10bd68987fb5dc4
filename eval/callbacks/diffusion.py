"""Diffusion stage: guided sample grids during training.

Sampling goes through `DiffusionModule.sample_images(condition, scale, seeds)` (EMA weights, uint8
images from `lightning_modules.generation.generate`); this callback only chooses the rows, the seeds and the cadence, and renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from core.images import make_grid_png
from eval.callbacks.media import log_wandb_image


def grid_conditions(
    num_classes: int, max_rows: int, per_row: int, class_names: Sequence[str] | None, template: str | None
) -> tuple[dict[str, Any], list[str]]:
    """A batch-like dict (`label` (R * per_row,), `caption`) for a sample grid of R = min(K, max_rows)
    evenly spaced classes, one class per row (captions from `template`), and the R class names."""
    rows = torch.linspace(0, num_classes - 1, min(num_classes, max_rows)).round().long().unique()
    names = [class_names[k] if class_names else f"class {k}" for k in rows.tolist()]
    captions = [template.format(n) if template else n for n in names]
    batch = {
        "label": rows.repeat_interleave(per_row),
        "caption": [c for c in captions for _ in range(per_row)],
    }
    return batch, names


class SampleGrids(Callback):
    """Every `every_n_steps` optimiser steps and once at the end of training, on rank 0 only (outside any
    collective): one grid per guidance scale, `<dirpath>/step{N}_s{scale}.png`, logged to W&B as
    `samples/scale_{scale}`. Rows are classes (or their captions, from the dataset manifest's first
    caption template), the seeds the same at every scale and step so that grids compare.

    Args:
        dirpath: where the grids go; None: no grids.
        every_n_steps: cadence in optimiser steps; 0: at the end of training only.
        scales: classifier-free guidance scales (1 = no guidance).
        per_row, max_rows: up to max_rows classes, per_row samples each.
        seed: sample i of a grid is drawn with seed `seed + i`.
    """

    def __init__(self, dirpath: str | None, every_n_steps: int = 1000, scales: Sequence[float] = (1.0, 3.0),
                 per_row: int = 8, max_rows: int = 10, seed: int = 0) -> None:  # fmt: skip
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.scales = [float(s) for s in scales]
        self.per_row, self.max_rows, self.seed = per_row, max_rows, seed
        self._sampled_at = -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_grids(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_grids(trainer, pl_module)

    def rows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Any], list[str]]:
        dm = trainer.datamodule
        names = getattr(dm, "class_names", None)
        templates = (getattr(dm, "manifest", None) or {}).get("caption_templates") or [None]
        return grid_conditions(
            int(pl_module.hparams.num_classes), self.max_rows, self.per_row, names, templates[0]
        )

    def log_grids(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Path]:
        """Write (and log) the grids of this step, once per step; returns their paths ([] on other ranks)."""
        step = trainer.global_step
        if self.dirpath is None or step == self._sampled_at or not trainer.is_global_zero:
            return []
        self._sampled_at = step
        batch, titles = self.rows(trainer, pl_module)
        batch["label"] = batch["label"].to(pl_module.device)
        condition = pl_module.ema_conditioner().condition_from_batch(batch)
        seeds = [self.seed + i for i in range(len(batch["label"]))]
        labels = [titles[i // self.per_row] if i % self.per_row == 0 else "" for i in range(len(seeds))]
        paths = []
        for scale in self.scales:
            images = pl_module.sample_images(condition, scale, seeds)  # uint8 (B, H, W, C)
            path = make_grid_png(images, nrow=self.per_row, path=Path(self.dirpath) / f"step{step}_s{scale:g}.png",
                                 labels=labels)  # fmt: skip
            log_wandb_image(trainer, f"samples/scale_{scale:g}", path, f"step {step}, scale {scale}")
            paths.append(path)
        return paths
