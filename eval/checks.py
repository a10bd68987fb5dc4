"""Checks that refuse a sweep before any sampling: a diffusion model whose samples cannot be compared
with the data. (A scoring net that is not the evaluation one: `lightning_modules.artifacts.check_eval_feature_net`,
next to every other check of a stage's output.)"""

from __future__ import annotations

from lightning_modules.artifacts import DiffusionBundle, check_classes
from lightning_modules.codec import LatentCodec

__all__ = ["check_data_compatible"]


def check_data_compatible(
    diffusion: DiffusionBundle, channels: int, image_size: int, num_classes: int
) -> None:
    """Refuse a diffusion model whose decoded samples cannot be compared with the data's real images:
    the latent channels must be the autoencoder's and the decoded (C, H, W) the data's
    (`LatentCodec.check_latents`), the classes the data's."""
    where = f"diffusion checkpoint {diffusion.path}"
    codec = LatentCodec.of(diffusion)
    codec.check_latents(diffusion.latent_shape, where, channels, image_size)
    check_classes(num_classes, diffusion.path, diffusion.num_classes)

