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
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.classifier import NoisyLatentClassifier
from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.unet import UNet


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


def _import(target: str) -> type:
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def conditioner_spec(cond: torch.nn.Module, hparams: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds a conditioner: its class, constructor args and trainable weights (a frozen text
    encoder is re-loaded from its own path, not copied into every checkpoint)."""
    trainable = {n for n, p in cond.named_parameters() if p.requires_grad}
    state = {k: v.detach().cpu() for k, v in cond.state_dict().items() if k in trainable}
    return {"target": f"{type(cond).__module__}.{type(cond).__qualname__}", "hparams": hparams, "state_dict": state}


def build_conditioner(spec: dict[str, Any]) -> torch.nn.Module:
    cond = _import(spec["target"])(**spec["hparams"])
    result = cond.load_state_dict(spec["state_dict"], strict=False)
    if result.unexpected_keys:
        raise StageMismatchError(f"conditioner {spec['target']} does not know weights {result.unexpected_keys}")
    trainable_missing = [k for k in result.missing_keys if k in dict(cond.named_parameters()) and
                         dict(cond.named_parameters())[k].requires_grad]  # fmt: skip
    if trainable_missing:
        raise StageMismatchError(f"conditioner {spec['target']} checkpoint lacks weights {trainable_missing}")
    return cond.eval()


@dataclass
class DiffusionBundle:
    """Everything sampling needs, rebuilt from a diffusion checkpoint alone."""

    unet: UNet
    conditioner: torch.nn.Module
    schedule: NoiseSchedule
    prediction_type: str
    autoencoder: AutoencoderKL
    scale_factor: float
    latent_shape: tuple[int, int, int]
    num_classes: int
    autoencoder_fingerprint: str
    path: str


def load_diffusion(path: str | os.PathLike, autoencoder_path: str | os.PathLike | None = None) -> DiffusionBundle:
    """Rebuild the EMA U-Net, conditioner, schedule and frozen autoencoder of a diffusion checkpoint.

    The autoencoder is read from `autoencoder_path` or the path recorded in the checkpoint; its weights
    must be the ones the U-Net was trained on (fingerprint check), else StageMismatchError.
    """
    keys = ("unet_hparams", "unet_state_dict", "conditioner", "schedule", "prediction_type", "latent_shape",
            "autoencoder_checkpoint", "autoencoder_fingerprint", "latent_scale_factor", "num_classes")  # fmt: skip
    ckpt = load_stage_checkpoint(path, "diffusion", keys)
    unet = UNet(**ckpt["unet_hparams"])
    unet.load_state_dict(ckpt["unet_state_dict"])
    unet.eval().requires_grad_(False)
    ae_path = autoencoder_path or ckpt["autoencoder_checkpoint"]
    ae, _, fingerprint = load_autoencoder(ae_path)
    if fingerprint != ckpt["autoencoder_fingerprint"]:
        raise StageMismatchError(
            f"autoencoder {ae_path} (weights {fingerprint[:12]}) is not the one diffusion checkpoint {path} was "
            f"trained on (weights {ckpt['autoencoder_fingerprint'][:12]})"
        )
    return DiffusionBundle(
        unet=unet,
        conditioner=build_conditioner(ckpt["conditioner"]).requires_grad_(False),
        schedule=NoiseSchedule.from_dict(ckpt["schedule"]),
        prediction_type=ckpt["prediction_type"],
        autoencoder=ae,
        scale_factor=float(ckpt["latent_scale_factor"]),
        latent_shape=tuple(ckpt["latent_shape"]),
        num_classes=int(ckpt["num_classes"]),
        autoencoder_fingerprint=fingerprint,
        path=str(path),
    )


def load_classifier(path: str | os.PathLike, diffusion: DiffusionBundle | None = None) -> NoisyLatentClassifier:
    """Rebuild the EMA noisy-latent classifier; with `diffusion`, refuse one trained under another
    noise schedule, latent shape or autoencoder (the message names both)."""
    keys = ("classifier_hparams", "classifier_state_dict", "schedule", "latent_shape", "autoencoder_fingerprint",
            "num_classes")  # fmt: skip
    ckpt = load_stage_checkpoint(path, "classifier", keys)
    if diffusion is not None:
        checks = {
            "noise schedule": (ckpt["schedule"], diffusion.schedule.to_dict()),
            "latent shape": (list(ckpt["latent_shape"]), list(diffusion.latent_shape)),
            "autoencoder weights": (ckpt["autoencoder_fingerprint"][:12], diffusion.autoencoder_fingerprint[:12]),
            "number of classes": (ckpt["num_classes"], diffusion.num_classes),
        }
        for what, (mine, theirs) in checks.items():
            if mine != theirs:
                raise StageMismatchError(
                    f"classifier {path} does not match diffusion checkpoint {diffusion.path}: {what} "
                    f"{mine} (classifier) vs {theirs} (diffusion)"
                )
    clf = NoisyLatentClassifier(**ckpt["classifier_hparams"])
    clf.load_state_dict(ckpt["classifier_state_dict"])
    return clf.eval().requires_grad_(False)
