"""Load what one stage hands to the next from its `final.ckpt`, without any config.

Contract (top-level keys of each stage's checkpoint, besides Lightning's own):

- every stage: `stage` (its name).
- feature_net: `feature_net_hparams`, `feature_net_state_dict`, `feature_net_role`.
- autoencoder: `autoencoder_hparams`, `autoencoder_state_dict` (EMA weights when EMA is on),
  `latent_scale_factor` (float), `latent_shape` ([C, h, w]), `image_shape` ([C, H, W]).
- diffusion: `unet_hparams`, `unet_state_dict` (EMA), `conditioner` ({"target", "hparams",
  "state_dict"}), `schedule` (NoiseSchedule.to_dict()), `prediction_type`, `latent_shape`,
  `autoencoder_checkpoint` (path), `autoencoder_fingerprint`, `latent_scale_factor`, `num_classes`.
- classifier: `classifier_hparams`, `classifier_state_dict` (EMA), `schedule`, `latent_shape`,
  `autoencoder_fingerprint`, `num_classes`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.feature_net import FeatureNet


class StageMismatchError(ValueError):
    """A checkpoint from another stage, or one incompatible with its partner stage."""


def load_stage_checkpoint(path: str | os.PathLike, stage: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """torch.load a stage's checkpoint on CPU and check it is from `stage` and holds `keys`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: run stage={stage} first (or fix the path)")
    # Our own run outputs: Lightning checkpoints hold config objects, so full unpickling is needed.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    found = ckpt.get("stage")
    if found != stage:
        raise StageMismatchError(f"{path} is a checkpoint of stage {found!r}, expected stage {stage!r}")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise StageMismatchError(f"{path} (stage {stage}) lacks {missing}: was it written by an older version?")
    return ckpt


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes: identifies trained weights independent of file paths."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def load_feature_net(path: str | os.PathLike) -> FeatureNet:
    ckpt = load_stage_checkpoint(path, "feature_net", ("feature_net_hparams", "feature_net_state_dict"))
    net = FeatureNet(**ckpt["feature_net_hparams"])
    net.load_state_dict(ckpt["feature_net_state_dict"])
    return net.eval()


def load_autoencoder(path: str | os.PathLike) -> tuple[AutoencoderKL, float, str]:
    """-> (frozen autoencoder in eval mode, latent scale factor, weights fingerprint)."""
    ckpt = load_stage_checkpoint(
        path, "autoencoder", ("autoencoder_hparams", "autoencoder_state_dict", "latent_scale_factor")
    )
    ae = AutoencoderKL(**ckpt["autoencoder_hparams"])
    ae.load_state_dict(ckpt["autoencoder_state_dict"])
    ae.eval().requires_grad_(False)
    return ae, float(ckpt["latent_scale_factor"]), state_fingerprint(ckpt["autoencoder_state_dict"])
