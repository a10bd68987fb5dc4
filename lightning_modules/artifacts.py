"""What one stage hands to the next: the writers, the one loader per artifact and every upstream check.

Each stage's checkpoint carries, at its top level besides Lightning's own keys, the artifact that the next
stages rebuild their networks from without any config. This file is the whole contract: the stage modules'
`artifacts()` call the writers below (their dicts are merged into every checkpoint, `final.ckpt`
included), tests and `debug=fdr` placeholders write standalone files with the same writers through
`save_artifact`, and everything that reads one goes through the loaders below.

Contract (top-level keys; every stage also writes `stage`, its name):

- feature_net: `feature_net_hparams`, `feature_net_state_dict`, `feature_net_role` ("eval" | "perceptual").
- autoencoder: `autoencoder_hparams`, `autoencoder_state_dict` (EMA weights when EMA is on),
  `latent_scale_factor` (float), `latent_shape` ([C, h, w]), `image_shape` ([C, H, W]).
- diffusion: `unet_hparams`, `unet_state_dict` (EMA), `conditioner` ({"target", "hparams",
  "state_dict"}), `schedule` (NoiseSchedule.to_dict()), `prediction_type`, `latent_shape`,
  `autoencoder_checkpoint` (path), `autoencoder_fingerprint`, `latent_scale_factor`, `num_classes`,
  `variance_type` ("fixed_small" | "learned_range": the U-Net also outputs its variance, Improved DDPM;
  absent in older files, which are "fixed_small").
- classifier: `classifier_hparams`, `classifier_state_dict` (EMA), `classifier_is_ema`, `schedule`,
  `latent_shape`, `autoencoder_fingerprint`, `autoencoder_checkpoint`, `diffusion_checkpoint`,
  `latent_scale_factor`, `num_classes`.

Safety: every file is read with `torch.load(weights_only=True)`; our checkpoints hold tensors and plain
containers only (`lightning_modules.base.StageModule` saves hyper-parameters as plain containers). A file
that needs the full unpickler is refused (`UnsafeCheckpointError`): nothing in it is executed. The
conditioner class a diffusion checkpoint names is resolved from the allowlist `CONDITIONERS`, never imported
by path.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.io import atomic_open
from lightning_modules.diffusion.schedules import NoiseSchedule
from lightning_modules.diffusion.variance import VARIANCE_TYPES
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.classifier import NoisyLatentClassifier
from lightning_modules.nets.conditioners import ClassConditioner, Conditioner, TextConditioner
from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.unet import UNet

STAGES = ("feature_net", "autoencoder", "diffusion", "classifier")
FEATURE_NET_ROLES = ("eval", "perceptual")
FEATURE_NET_KEYS = ("feature_net_hparams", "feature_net_state_dict", "feature_net_role")
AUTOENCODER_KEYS = ("autoencoder_hparams", "autoencoder_state_dict", "latent_scale_factor")
DIFFUSION_KEYS = ("unet_hparams", "unet_state_dict", "conditioner", "schedule", "prediction_type", "latent_shape",
                  "autoencoder_checkpoint", "autoencoder_fingerprint", "latent_scale_factor", "num_classes")  # fmt: skip
CLASSIFIER_KEYS = ("classifier_hparams", "classifier_state_dict", "schedule", "latent_shape",
                   "autoencoder_fingerprint", "num_classes")  # fmt: skip

# The conditioner classes a diffusion checkpoint may name (its `conditioner.target`), by dotted path.
CONDITIONERS: dict[str, type[Conditioner]] = {
    f"{cls.__module__}.{cls.__qualname__}": cls for cls in (ClassConditioner, TextConditioner)
}


class StageMismatchError(ValueError):
    """A checkpoint from another stage, or one incompatible with its partner stage."""


class UnsafeCheckpointError(ValueError):
    """A file that `torch.load(weights_only=True)` refuses: it holds pickled objects beyond tensors and
    plain containers, which would run code on loading. Nothing in it was executed."""


# --- reading and writing files ---------------------------------------------------------------------


def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`; a file that needs the full unpickler is
    refused with UnsafeCheckpointError naming it and saying what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({reason}): it holds pickled objects "
            "besides tensors and plain containers, and loading those would execute code from the file, so it "
            "is refused. Checkpoints written by this pipeline's stages hold none; re-create this one by "
            "re-running the stage that wrote it (`python -m pipeline.train stage=<name> force=true`)."
        ) from err


def load_stage_checkpoint(path: str | os.PathLike, stage: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a stage's checkpoint weights-only on CPU and check it is from `stage` and holds `keys`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: run stage={stage} first (or fix the path)")
    ckpt = safe_load(path)
    found = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if found != stage:
        what = f"stage {found!r}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}, not a stage checkpoint"
        raise StageMismatchError(f"{path} is a checkpoint of {what}, expected stage {stage!r}")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise StageMismatchError(f"{path} (stage {stage}) lacks {missing}: was it written by an older version?")
    return ckpt


def save_artifact(path: str | os.PathLike, stage: str, artifact: Mapping[str, Any]) -> Path:
    """Write a standalone stage file `{"stage": stage, **artifact}` (atomically), as a stage's final.ckpt
    holds it: for tiny test checkpoints and `debug=fdr` placeholders built with the writers below."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({"stage": stage, **artifact}, f)
    return path


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes: identifies trained weights independent of file paths."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


# --- writers: what each stage puts into its checkpoints --------------------------------------------


def feature_net_artifacts(net: FeatureNet, role: str) -> dict[str, Any]:
    """The feature_net stage's artifact: the net and the role it was trained for."""
    if role not in FEATURE_NET_ROLES:
        raise ValueError(f"feature net role must be one of {list(FEATURE_NET_ROLES)}, got {role!r}")
    return {"feature_net_hparams": net.hparams(), "feature_net_state_dict": _cpu_state(net),
            "feature_net_role": str(role)}  # fmt: skip


def autoencoder_artifacts(
    net: AutoencoderKL,
    latent_scale_factor: float | None = None,
    image_shape: list[int] | None = None,
    latent_shape: list[int] | None = None,
) -> dict[str, Any]:
    """The autoencoder stage's artifact (pass the exported, i.e. EMA, weights). The scale factor and shapes
    are only known once training ended / the data was seen: None leaves them out (intermediate checkpoints)."""
    out: dict[str, Any] = {"autoencoder_hparams": net.hparams(), "autoencoder_state_dict": _cpu_state(net)}
    if image_shape is not None:
        out["image_shape"] = [int(s) for s in image_shape]
    if latent_shape is not None:
        out["latent_shape"] = [int(s) for s in latent_shape]
    if latent_scale_factor is not None:
        out["latent_scale_factor"] = float(latent_scale_factor)
    return out


def conditioner_spec(cond: Conditioner, weights: nn.Module | None = None) -> dict[str, Any]:
    """What rebuilds a conditioner: its allowlisted class, constructor args and trainable weights, taken
    from `weights` (e.g. its EMA copy; default `cond`). A frozen text encoder is re-loaded from its own
    path, not copied into every checkpoint."""
    target = f"{type(cond).__module__}.{type(cond).__qualname__}"
    conditioner_class(target)  # refuse at save time what could not be loaded
    trainable = [n for n, p in cond.named_parameters() if p.requires_grad]
    source = (weights if weights is not None else cond).state_dict()
    state = {k: source[k].detach().cpu().clone() for k in trainable}
    return {"target": target, "hparams": dict(cond.hparams()), "state_dict": state}


def diffusion_artifacts(
    unet: UNet,
    conditioner: Conditioner,
    conditioner_weights: nn.Module | None,
    schedule: NoiseSchedule,
    prediction_type: str,
    latent_shape: tuple[int, ...] | list[int],
    autoencoder_checkpoint: str | os.PathLike,
    autoencoder_fingerprint: str,
    latent_scale_factor: float,
    num_classes: int,
    variance_type: str = "fixed_small",
) -> dict[str, Any]:
    """The diffusion stage's artifact: pass the exported (EMA) U-Net and conditioner weights."""
    return {
        "unet_hparams": unet.hparams(),
        "unet_state_dict": _cpu_state(unet),
        "conditioner": conditioner_spec(conditioner, conditioner_weights),
        "schedule": schedule.to_dict(),
        "prediction_type": str(prediction_type),
        "latent_shape": [int(s) for s in latent_shape],
        "autoencoder_checkpoint": str(autoencoder_checkpoint),
        "autoencoder_fingerprint": str(autoencoder_fingerprint),
        "latent_scale_factor": float(latent_scale_factor),
        "num_classes": int(num_classes),
        "variance_type": str(variance_type),
    }


def classifier_artifacts(
    net: NoisyLatentClassifier,
    is_ema: bool,
    schedule: NoiseSchedule,
    latent_shape: list[int],
    autoencoder_checkpoint: str | os.PathLike,
    autoencoder_fingerprint: str,
    diffusion_checkpoint: str | os.PathLike,
    latent_scale_factor: float,
    num_classes: int,
) -> dict[str, Any]:
    """The classifier stage's artifact: pass the exported (EMA when on) classifier."""
    return {
        "classifier_hparams": net.hparams(),
        "classifier_state_dict": _cpu_state(net),
        "classifier_is_ema": bool(is_ema),
        "schedule": schedule.to_dict(),
        "latent_shape": [int(s) for s in latent_shape],
        "autoencoder_fingerprint": str(autoencoder_fingerprint),
        "autoencoder_checkpoint": str(autoencoder_checkpoint),
        "diffusion_checkpoint": str(diffusion_checkpoint),
        "latent_scale_factor": float(latent_scale_factor),
        "num_classes": int(num_classes),
    }


# --- checks: roles and upstream compatibility, all of them --------------------------------------------


def check_role(path: str | os.PathLike, found: str | None, wanted: str, user: str) -> None:
    """Refuse a feature net trained for another role than `user` needs (the `eval` net scores samples and
    must never be what a model is trained against; the `perceptual` net must not score)."""
    if found != wanted:
        raise StageMismatchError(
            f"{path} is the feature net of role {found!r}, but {user} needs role {wanted!r}: train it with "
            f"`python -m pipeline.train stage=feature_net stage.role={wanted}` (the 'eval' net scores samples "
            "and must never be trained against; the 'perceptual' net is what the autoencoder's loss used)"
        )


def check_same_autoencoder(
    autoencoder_path: str | os.PathLike, fingerprint: str, other: str | os.PathLike, expected: str, hint: str = ""
) -> None:
    """Refuse an autoencoder whose weights are not the ones checkpoint `other` was trained on."""
    if fingerprint != expected:
        raise StageMismatchError(
            f"autoencoder {autoencoder_path} (weights {fingerprint[:12]}) is not the one diffusion checkpoint "
            f"{other} was trained on (weights {expected[:12]}){hint}"
        )


def check_classes(num_classes: int, path: str | os.PathLike, found: int) -> None:
    """Refuse a diffusion model trained on another number of classes than the data's (data.num_classes)."""
    if int(found) != int(num_classes):
        raise StageMismatchError(
            f"data has {num_classes} classes but diffusion checkpoint {path} was trained on {found} "
            "(data.num_classes must be the diffusion model's)"
        )


def check_classifier_matches(
    path: str | os.PathLike, ckpt: Mapping[str, Any], diffusion: DiffusionBundle
) -> None:
    """Refuse a classifier trained under another noise schedule, latent shape, autoencoder or class count
    than `diffusion` (the message names both sides)."""
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


def check_eval_feature_net(
    checkpoint: str | os.PathLike, perceptual_checkpoint: str | os.PathLike | None
) -> None:
    """Refuse a scoring net that is not the feature_net stage's `eval` role, or that has the weights of
    the perceptual net the autoencoder was trained against (the scoring network is never the one a model
    was trained or guided against). Raises StageMismatchError naming the files."""
    ckpt = load_stage_checkpoint(checkpoint, "feature_net", ("feature_net_state_dict",))
    role = ckpt.get("feature_net_role")
    if role is not None:
        check_role(checkpoint, role, "eval", "scoring samples (model.features.checkpoint_path)")
    if perceptual_checkpoint and Path(perceptual_checkpoint).is_file():
        other = load_stage_checkpoint(perceptual_checkpoint, "feature_net", ("feature_net_state_dict",))
        if state_fingerprint(other["feature_net_state_dict"]) == state_fingerprint(ckpt["feature_net_state_dict"]):
            raise StageMismatchError(
                f"the evaluation feature net {checkpoint} has the same weights as the perceptual net "
                f"{perceptual_checkpoint}: the scoring network must not be the one the autoencoder was "
                f"trained against. Train stage feature_net with stage.role=eval (its own seed)."
            )


# --- loaders: one per artifact ---------------------------------------------------------------------


def load_feature_net(path: str | os.PathLike, role: str | None = None, user: str = "this stage") -> FeatureNet:
    """The FeatureNet of a feature_net checkpoint, in eval mode; with `role`, refuse another role."""
    keys = FEATURE_NET_KEYS if role is not None else FEATURE_NET_KEYS[:2]
    ckpt = load_stage_checkpoint(path, "feature_net", keys)
    if role is not None:
        check_role(path, ckpt["feature_net_role"], role, user)
    net = FeatureNet(**ckpt["feature_net_hparams"])
    net.load_state_dict(ckpt["feature_net_state_dict"])
    return net.eval()


def load_autoencoder(path: str | os.PathLike) -> tuple[AutoencoderKL, float, str]:
    """-> (frozen autoencoder in eval mode, latent scale factor, weights fingerprint)."""
    ckpt = load_stage_checkpoint(path, "autoencoder", AUTOENCODER_KEYS)
    ae = AutoencoderKL(**ckpt["autoencoder_hparams"])
    ae.load_state_dict(ckpt["autoencoder_state_dict"])
    ae.eval().requires_grad_(False)
    return ae, float(ckpt["latent_scale_factor"]), state_fingerprint(ckpt["autoencoder_state_dict"])


def conditioner_class(target: str) -> type[Conditioner]:
    """The allowlisted conditioner class of a checkpoint's `conditioner.target`; anything else is refused."""
    cls = CONDITIONERS.get(target)
    if cls is None:
        raise StageMismatchError(
            f"conditioner {target!r} is not a known conditioner class; allowed: {sorted(CONDITIONERS)} "
            "(a new conditioner class must be added to lightning_modules.artifacts.CONDITIONERS)"
        )
    return cls


def build_conditioner(spec: Mapping[str, Any]) -> Conditioner:
    """Rebuild a conditioner from `conditioner_spec`'s dict (class from the allowlist)."""
    cond = conditioner_class(spec["target"])(**spec["hparams"])
    result = cond.load_state_dict(spec["state_dict"], strict=False)
    if result.unexpected_keys:
        raise StageMismatchError(f"conditioner {spec['target']} does not know weights {result.unexpected_keys}")
    params = dict(cond.named_parameters())
    trainable_missing = [k for k in result.missing_keys if k in params and params[k].requires_grad]
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
    variance_type: str = "fixed_small"


def load_diffusion(path: str | os.PathLike, autoencoder_path: str | os.PathLike | None = None) -> DiffusionBundle:
    """Rebuild the EMA U-Net, conditioner, schedule and frozen autoencoder of a diffusion checkpoint.

    The autoencoder is read from `autoencoder_path` or the path recorded in the checkpoint; its weights
    must be the ones the U-Net was trained on (fingerprint check), else StageMismatchError.
    """
    ckpt = load_stage_checkpoint(path, "diffusion", DIFFUSION_KEYS)
    ae_path = autoencoder_path or ckpt["autoencoder_checkpoint"]
    ae, _, fingerprint = load_autoencoder(ae_path)
    check_same_autoencoder(ae_path, fingerprint, path, ckpt["autoencoder_fingerprint"])
    conditioner = build_conditioner(ckpt["conditioner"]).requires_grad_(False)
    variance_type = ckpt.get("variance_type", "fixed_small")
    if variance_type not in VARIANCE_TYPES:
        raise StageMismatchError(
            f"{path}: unknown variance_type {variance_type!r} (known: {list(VARIANCE_TYPES)}); re-create it by "
            "re-running stage diffusion"
        )
    unet = UNet(**ckpt["unet_hparams"])
    unet.load_state_dict(ckpt["unet_state_dict"])
    unet.eval().requires_grad_(False)
    return DiffusionBundle(
        unet=unet,
        conditioner=conditioner,
        schedule=NoiseSchedule.from_dict(ckpt["schedule"]),
        prediction_type=ckpt["prediction_type"],
        autoencoder=ae,
        scale_factor=float(ckpt["latent_scale_factor"]),
        latent_shape=tuple(ckpt["latent_shape"]),
        num_classes=int(ckpt["num_classes"]),
        autoencoder_fingerprint=fingerprint,
        path=str(path),
        variance_type=variance_type,
    )


def load_diffusion_upstream(
    path: str | os.PathLike, autoencoder_path: str | os.PathLike, autoencoder_fingerprint: str, num_classes: int
) -> dict[str, Any]:
    """What the classifier stage reads from the diffusion checkpoint (the U-Net is not built):
    {"schedule": NoiseSchedule.to_dict(), "latent_shape": [C, h, w]}, after checking that it was trained on
    the autoencoder `autoencoder_path` (by weights) and on `num_classes` classes."""
    ckpt = load_stage_checkpoint(path, "diffusion", ("schedule", "latent_shape", "autoencoder_fingerprint"))
    check_same_autoencoder(
        autoencoder_path, autoencoder_fingerprint, path, ckpt["autoencoder_fingerprint"],
        hint=": retrain the diffusion stage or point stage.module.autoencoder_checkpoint at its autoencoder",
    )  # fmt: skip
    if "num_classes" in ckpt:
        check_classes(num_classes, path, int(ckpt["num_classes"]))
    return {"schedule": dict(ckpt["schedule"]), "latent_shape": [int(s) for s in ckpt["latent_shape"]]}


def load_classifier(path: str | os.PathLike, diffusion: DiffusionBundle | None = None) -> NoisyLatentClassifier:
    """Rebuild the EMA noisy-latent classifier; with `diffusion`, refuse one trained under another
    noise schedule, latent shape or autoencoder (the message names both)."""
    ckpt = load_stage_checkpoint(path, "classifier", CLASSIFIER_KEYS)
    if diffusion is not None:
        check_classifier_matches(path, ckpt, diffusion)
    clf = NoisyLatentClassifier(**ckpt["classifier_hparams"])
    clf.load_state_dict(ckpt["classifier_state_dict"])
    return clf.eval().requires_grad_(False)
