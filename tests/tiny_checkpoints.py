"""Tiny stage checkpoints built with the stages' own writers (`lightning_modules/artifacts.py`).

For tests of later stages that must not wait for (or spend CPU time on) training the earlier ones:
random-weight tiny nets saved by `save_artifact` with the artifact dicts the stage modules' `artifacts()`
produce (`feature_net_artifacts`, `autoencoder_artifacts`, `diffusion_artifacts`, `classifier_artifacts`);
32x32 grey images, 4x8x8 latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_modules.artifacts import (
    autoencoder_artifacts,
    classifier_artifacts,
    diffusion_artifacts,
    feature_net_artifacts,
    save_artifact,
    state_fingerprint,
)
from lightning_modules.diffusion.schedules import NoiseSchedule
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


def write_autoencoder(path: Path, seed: int = 0, scale_factor: float = 0.5) -> tuple[Path, str]:
    """-> (path, weights fingerprint)."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(**AE_HPARAMS)
    art = autoencoder_artifacts(ae, scale_factor, IMAGE_SHAPE, LATENT_SHAPE)
    return save_artifact(path, "autoencoder", art), state_fingerprint(art["autoencoder_state_dict"])


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
    art = diffusion_artifacts(unet, cond, None, NoiseSchedule.from_dict(schedule or TINY_SCHEDULE), "eps",
                              latent_shape or LATENT_SHAPE, autoencoder_path, fingerprint, 0.5, num_classes)  # fmt: skip
    return save_artifact(path, "diffusion", art)


def write_feature_net(path: Path, seed: int = 0, role: str = "eval") -> Path:
    torch.manual_seed(seed)
    net = FeatureNet(in_channels=1, num_classes=NUM_CLASSES, widths=(8, 16))
    return save_artifact(path, "feature_net", feature_net_artifacts(net, role))


def write_classifier(
    path: Path, fingerprint: str, schedule: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    torch.manual_seed(seed)
    clf = NoisyLatentClassifier(**CLASSIFIER_HPARAMS)
    art = classifier_artifacts(clf, False, NoiseSchedule.from_dict(schedule or TINY_SCHEDULE), LATENT_SHAPE,
                               "", fingerprint, "", 0.5, NUM_CLASSES)  # fmt: skip
    return save_artifact(path, "classifier", art)


def write_upstream_run(run_dir: Path) -> dict[str, Any]:
    """autoencoder/, diffusion/ and feature_net_eval/ final.ckpt under `run_dir`, as the real stages lay
    them out. Returns their paths and the autoencoder fingerprint."""
    ae_path, fingerprint = write_autoencoder(run_dir / "autoencoder" / "checkpoints" / "final.ckpt")
    diff_path = write_diffusion(run_dir / "diffusion" / "checkpoints" / "final.ckpt", ae_path, fingerprint)
    fn_path = write_feature_net(run_dir / "feature_net_eval" / "checkpoints" / "final.ckpt")
    return {"autoencoder": ae_path, "diffusion": diff_path, "feature_net_eval": fn_path,
            "fingerprint": fingerprint}  # fmt: skip


def conditioned_bundle(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """`load_diffusion` of a tiny upstream run in `run_dir`, its U-Net's zero-initialised output conv given
    small seeded weights so that the condition (and so guidance) changes the samples; and the run's paths."""
    from lightning_modules.artifacts import load_diffusion

    paths = write_upstream_run(run_dir)
    bundle = load_diffusion(paths["diffusion"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in bundle.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return bundle, paths
