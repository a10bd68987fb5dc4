"""What every stage's LightningModule shares: optimiser construction and stage artefacts."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from core.io import plain_container


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stops before the bad update is applied."""


class StageModule(pl.LightningModule):
    """Base class of the stage modules.

    Subclasses put what the next stage needs to rebuild their networks without a config into
    `artifacts()`; it is stored at the top level of every checkpoint (`final.ckpt` included).

    Every stage passes its loss terms through `finite_or_skip` before the optimiser step (the non-finite
    guard, docs/ARCHITECTURE.md "Checkpoints"). `nonfinite_tolerance` (set by `pipeline.train` from the
    config's `nonfinite_tolerance`) is how many such batches a run may skip before it stops.
    """

    stage_name: str = "stage"
    nonfinite_tolerance: int = 0
    nonfinite_skipped: int = 0  # batches skipped so far in this process
    skipped_batch: bool = False  # the last batch's update was skipped (the EMA must not count it)

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

    def finite_or_skip(self, terms: Mapping[str, torch.Tensor], which: str = "loss") -> bool:
        """True when every loss term is finite on every rank. Otherwise the update must not be applied: False
        (skip this batch, logged as `train/nonfinite_skipped` and a printed line) while at most
        `nonfinite_tolerance` batches were skipped, else NonFiniteLossError naming the step and the terms.

        Call it on every rank at the same point (the flags are summed over ranks, so all decide alike).
        """
        names = list(terms)
        bad = torch.stack([~torch.isfinite(terms[n].detach()).all() for n in names]).float()
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        self.skipped_batch = bool(bad.any())
        if not self.skipped_batch:
            return True
        values = {n: float(terms[n].detach().float().mean()) for n, b in zip(names, bad.tolist(), strict=True) if b}
        what = f"non-finite {which} term(s) at step {self.global_step}: {values} (values on rank {self.global_rank})"
        self.nonfinite_skipped += 1
        if self.nonfinite_skipped > self.nonfinite_tolerance:
            raise NonFiniteLossError(
                f"{what}. The update was not applied and no checkpoint is written after it: the last checkpoint is "
                f"from before ({self.nonfinite_skipped - 1} bad batch(es) skipped, nonfinite_tolerance="
                f"{self.nonfinite_tolerance}). Lower the learning rate, clip gradients, use trainer.precision="
                "32-true, or allow a few bad batches with nonfinite_tolerance=K; then run the stage again to resume."
            )
        if self.global_rank == 0:
            print(f"[train] {what}: batch skipped ({self.nonfinite_skipped}/{self.nonfinite_tolerance} allowed)",
                  flush=True)  # fmt: skip
        if self._trainer is not None:
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
        return False

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
