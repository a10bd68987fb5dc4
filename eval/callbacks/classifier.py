"""Classifier stage: accuracy of p(y | z_t, t) against the timestep, as a PNG and W&B media."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytorch_lightning as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback

from core.io import atomic_write_bytes
from eval.callbacks.media import log_wandb_image

PLOT_NAMES = {"val": "accuracy_vs_t.png", "test": "test_accuracy_vs_t.png"}


def plot_accuracy_vs_t(
    centres: list[float], accuracy: list[float], chance: float, path: str | Path, title: str
) -> Path:
    """PNG of accuracy against the bucket centre timestep, with the chance level; written atomically.
    Buckets with NaN accuracy (no samples) are not drawn."""
    points = [(c, a) for c, a in zip(centres, accuracy, strict=True) if math.isfinite(a)]
    fig = Figure(figsize=(5, 3.6))
    FigureCanvasAgg(fig)  # a bare Agg canvas: no pyplot global state, safe in any process
    ax = fig.subplots()
    if points:
        ax.plot(*zip(*points, strict=True), marker="o", label="accuracy")
    ax.axhline(chance, color="grey", linestyle="--", label=f"chance (1/{round(1 / chance)})")
    ax.set(title=title, xlabel="timestep t (bucket centre)", ylabel="accuracy", ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


class AccuracyVsTimestepPlot(Callback):
    """After each validation and test (rank 0): the per-bucket accuracy the module has just computed
    (`ClassifierModule.bucket_accuracy`) against the bucket centres, with chance 1/K, written to
    `<dirpath>/accuracy_vs_t.png` (validation) or `test_accuracy_vs_t.png`, and logged to W&B as
    `val/accuracy_vs_t` / `test/accuracy_vs_t`.

    Args:
        dirpath: where the plots go; None: `<trainer.default_root_dir>/plots`.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath

    # The *_end hooks, not *_epoch_end: Lightning calls callbacks' epoch-end hooks before the module's,
    # which is where this epoch's accuracy is computed.
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plot(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.plot(trainer, pl_module, "test")

    def plot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> Path | None:
        accuracy = pl_module.bucket_accuracy.get(split)
        if accuracy is None or not trainer.is_global_zero:
            return None
        root = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "plots"
        path = plot_accuracy_vs_t(pl_module.bucket_centres(), accuracy, 1.0 / int(pl_module.hparams.num_classes),
                                  root / PLOT_NAMES[split],
                                  f"{split} accuracy of p(y | z_t, t), step {trainer.global_step}")  # fmt: skip
        log_wandb_image(trainer, f"{split}/accuracy_vs_t", path)
        return path
