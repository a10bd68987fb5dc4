"""Tiny stage checkpoints written directly per the contract in `lightning_modules/artifacts.py`.

For tests of later stages that must not wait for (or spend CPU time on) training the earlier ones:
random weights, the exact top-level keys the loaders read, 32x32 grey images, 4x8x8 latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.artifacts import conditioner_spec, state_fingerprint
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.classifier import NoisyLatentClassifier
from lightning_modules.nets.conditioners import ClassConditioner
from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.unet import UNet

NUM_CLASSES = 10
IMAGE_SHAPE = [1, 32, 32]
LATENT_SHAPE = [4, 8, 8]
TINY_SCHEDULE = {
    "kind": "linear",
    "num_timesteps": 100,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "cosine_s": 0.008,
}
AE_HPARAMS = {"in_channels": 1, "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 4,
              "attn_mid": False}  # fmt: skip
UNET_HPARAMS = {"in_channels": 4, "out_channels": 4, "model_channels": 16, "channel_mult": [1, 2],
                "num_res_blocks": 1, "attention_resolutions": [2], "num_head_channels": 16,
                "context_dim": 16}  # fmt: skip
CLASSIFIER_HPARAMS = {"in_channels": 4, "num_classes": NUM_CLASSES, "latent_size": 8, "model_channels": 16,
                      "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [2],
                      "num_head_channels": 16}  # fmt: skip


def _save(path: Path, ckpt: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def write_autoencoder(path: Path, seed: int = 0, scale_factor: float = 0.5) -> tuple[Path, str]:
    """-> (path, weights fingerprint)."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(**AE_HPARAMS)
    state = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    _save(path, {"stage": "autoencoder", "autoencoder_hparams": ae.hparams(), "autoencoder_state_dict": state,
                 "latent_scale_factor": scale_factor, "latent_shape": LATENT_SHAPE,
                 "image_shape": IMAGE_SHAPE})  # fmt: skip
    return path, state_fingerprint(state)


def write_diffusion(
    path: Path,
    autoencoder_path: Path,
    fingerprint: str,
    schedule: dict[str, Any] | None = None,
    latent_shape: list[int] | None = None,
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
) -> Path:
    torch.manual_seed(seed)
    unet = UNet(**UNET_HPARAMS)
    cond = ClassConditioner(num_classes=num_classes, embed_dim=UNET_HPARAMS["context_dim"])
    return _save(path, {
        "stage": "diffusion", "unet_hparams": unet.hparams(), "unet_state_dict": unet.state_dict(),
        "conditioner": conditioner_spec(cond, {"num_classes": num_classes, "embed_dim": cond.context_dim}),
        "schedule": dict(schedule or TINY_SCHEDULE), "prediction_type": "eps",
        "latent_shape": list(latent_shape or LATENT_SHAPE), "autoencoder_checkpoint": str(autoencoder_path),
        "autoencoder_fingerprint": fingerprint, "latent_scale_factor": 0.5, "num_classes": num_classes,
    })  # fmt: skip


def write_feature_net(path: Path, seed: int = 0, role: str = "eval") -> Path:
    torch.manual_seed(seed)
    net = FeatureNet(in_channels=1, num_classes=NUM_CLASSES, widths=(8, 16))
    return _save(path, {"stage": "feature_net", "feature_net_hparams": net.hparams(),
                        "feature_net_state_dict": net.state_dict(), "feature_net_role": role})  # fmt: skip


def write_classifier(
    path: Path, fingerprint: str, schedule: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    clf = NoisyLatentClassifier(**CLASSIFIER_HPARAMS)
    return _save(path, {"stage": "classifier", "classifier_hparams": clf.hparams(),
                        "classifier_state_dict": clf.state_dict(), "schedule": dict(schedule or TINY_SCHEDULE),
                        "latent_shape": LATENT_SHAPE, "autoencoder_fingerprint": fingerprint,
                        "num_classes": NUM_CLASSES})  # fmt: skip


def write_upstream_run(run_dir: Path) -> dict[str, Any]:
    """autoencoder/, diffusion/ and feature_net_eval/ final.ckpt under `run_dir`, as the real stages lay
    them out. Returns their paths and the autoencoder fingerprint."""
    ae_path, fingerprint = write_autoencoder(run_dir / "autoencoder" / "checkpoints" / "final.ckpt")
    diff_path = write_diffusion(run_dir / "diffusion" / "checkpoints" / "final.ckpt", ae_path, fingerprint)
    fn_path = write_feature_net(run_dir / "feature_net_eval" / "checkpoints" / "final.ckpt")
    return {"autoencoder": ae_path, "diffusion": diff_path, "feature_net_eval": fn_path,
            "fingerprint": fingerprint}  # fmt: skip
