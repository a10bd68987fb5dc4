"""What every stage's LightningModule shares: optimiser construction and stage artefacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch

from core.io import plain_container


class StageModule(pl.LightningModule):
    """Base class of the stage modules.

    Subclasses put what the next stage needs to rebuild their networks without a config into
    `artifacts()`; it is stored at the top level of every checkpoint (`final.ckpt` included).
    """

    stage_name: str = "stage"

    def artifacts(self) -> dict[str, Any]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["stage"] = self.stage_name
        checkpoint.update(self.artifacts())
        # Hyper-parameters as plain containers (no OmegaConf objects, no type object): every checkpoint
        # of ours loads with torch.load(weights_only=True), as lightning_modules.artifacts requires.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_container(checkpoint["hyper_parameters"])
        checkpoint.pop("hparams_type", None)

    def log_data_health(self) -> None:
        """Log how many corrupt samples the data pipeline has skipped so far (summed over ranks)."""
        dm = getattr(self.trainer, "datamodule", None)
        counter = getattr(dm, "skipped", None)
        if counter is not None:
            self.log("data/skipped_samples", float(counter.value), reduce_fx="sum", sync_dist=True,
                     on_step=False, on_epoch=True)  # fmt: skip


def build_optimizer(
    factory: Callable[..., torch.optim.Optimizer], params: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """Call a Hydra `_partial_` optimiser factory on the trainable parameters."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters given to the optimiser")
    return factory(params)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up then cosine decay to `min_ratio` of the base LR, stepped every optimiser step."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
