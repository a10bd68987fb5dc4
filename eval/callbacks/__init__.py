"""Lightning callbacks that render and score what the stage modules compute: reconstruction grids and
rFID (autoencoder), guided sample grids (diffusion), the accuracy-vs-t plot (classifier), each with its
W&B media. They sit in `eval` because rFID needs its metrics and feature extractors; the modules only
compute and log scalars. Configured in `conf/callbacks/<stage>.yaml`, built by `pipeline.builders`."""

from eval.callbacks.autoencoder import ReconstructionFID, ReconstructionGrid, gather_rows
from eval.callbacks.classifier import AccuracyVsTimestepPlot, plot_accuracy_vs_t
from eval.callbacks.diffusion import SampleGrids, grid_conditions
from eval.callbacks.media import log_wandb_image

__all__ = [
    "AccuracyVsTimestepPlot",
    "ReconstructionFID",
    "ReconstructionGrid",
    "SampleGrids",
    "gather_rows",
    "grid_conditions",
    "log_wandb_image",
    "plot_accuracy_vs_t",
]
