"""Checks that refuse a sweep before any sampling: a scoring net that is not the evaluation one, a
diffusion model whose samples cannot be compared with the data."""

from __future__ import annotations

import os
from pathlib import Path

from lightning_modules.artifacts import (
    DiffusionBundle,
    StageMismatchError,
    load_stage_checkpoint,
    state_fingerprint,
)
from lightning_modules.codec import LatentCodec

__all__ = ["check_data_compatible", "check_eval_feature_net"]


def check_eval_feature_net(
    checkpoint: str | os.PathLike, perceptual_checkpoint: str | os.PathLike | None
) -> None:
    """Refuse a scoring net that is not the feature_net stage's `eval` role, or that has the weights of
    the perceptual net the autoencoder was trained against (docs/ARCHITECTURE.md: the scoring network is never the
    one a model was trained or guided against). Raises StageMismatchError / ValueError naming the files."""
    ckpt = load_stage_checkpoint(checkpoint, "feature_net", ("feature_net_state_dict",))
    role = ckpt.get("feature_net_role")
    if role is not None and role != "eval":
        raise ValueError(
            f"model.features.checkpoint_path={checkpoint} is the feature net of role {role!r}; samples must "
            f"be scored by the role 'eval' net (stage feature_net stage.role=eval), not the one the "
            f"autoencoder's perceptual loss used"
        )
    if perceptual_checkpoint and Path(perceptual_checkpoint).is_file():
        other = load_stage_checkpoint(perceptual_checkpoint, "feature_net", ("feature_net_state_dict",))
        if state_fingerprint(other["feature_net_state_dict"]) == state_fingerprint(
            ckpt["feature_net_state_dict"]
        ):
            raise ValueError(
                f"the evaluation feature net {checkpoint} has the same weights as the perceptual net "
                f"{perceptual_checkpoint}: the scoring network must not be the one the autoencoder was "
                f"trained against. Train stage feature_net with stage.role=eval (its own seed)."
            )


def check_data_compatible(
    diffusion: DiffusionBundle, channels: int, image_size: int, num_classes: int
) -> None:
    """Refuse a diffusion model whose decoded samples cannot be compared with the data's real images:
    the latent channels must be the autoencoder's and the decoded (C, H, W) the data's
    (`LatentCodec.check_latents`), the classes the data's."""
    where = f"diffusion checkpoint {diffusion.path}"
    codec = LatentCodec.of(diffusion)
    codec.check_latents(diffusion.latent_shape, where, channels, image_size)
    if diffusion.num_classes != num_classes:
        raise StageMismatchError(
            f"{where}: {diffusion.num_classes} classes, the data (data.num_classes) {num_classes}"
        )

