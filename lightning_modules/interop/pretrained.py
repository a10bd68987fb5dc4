"""Start our autoencoder or U-Net from a diffusers model saved on disk (`stage.module.init_from_diffusers`).

The directory is a model directory (config.json + weights, e.g. Stable Diffusion's `vae/`) or a pipeline
directory whose `vae/` or `unet/` subfolder is taken. Offline only: nothing is downloaded. The network our
config builds must be the one the diffusers config describes: a mismatch is refused with the overrides
that fix it (`model.autoencoder.ch=128 ...`), before any weight is copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from core.io import config_hash, sha256_file
from lightning_modules.interop.convert import (
    UnsupportedByDiffusers,
    autoencoder_from_diffusers,
    autoencoder_hparams_from_config,
)
from lightning_modules.interop.convert_unet import unet_from_diffusers, unet_hparams_from_config
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.unet import UNet

__all__ = [
    "init_autoencoder_from_diffusers",
    "init_unet_from_diffusers",
    "model_dir_content_hash",
    "resolve_model_dir",
]

KEY = "stage.module.init_from_diffusers"


def resolve_model_dir(path: str | os.PathLike, subfolder: str | None, default_subfolder: str) -> Path:
    """The model directory (holding config.json) of `path`: `path/subfolder` when a subfolder is given, else
    `path` itself or, for a pipeline directory, `path/default_subfolder`. FileNotFoundError names the key."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"{KEY}={path}: no such directory (a local diffusers model or pipeline directory)"
        )
    candidates = [root / subfolder] if subfolder else [root, root / default_subfolder]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    looked = " or ".join(str(c / "config.json") for c in candidates)
    raise FileNotFoundError(f"{KEY}={path}: found no {looked}; point it at a diffusers model directory")


def model_dir_content_hash(
    path: str | os.PathLike, subfolder: str | None, default_subfolder: str
) -> str | None:
    """sha256 over the names and sha256s of the files of the resolved model directory (what a stage hash
    records of a pretrained start), or None when the path does not resolve (the stage's build says why)."""
    try:
        model_dir = resolve_model_dir(path, subfolder, default_subfolder)
    except FileNotFoundError:
        return None
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    return config_hash([[str(p.relative_to(model_dir)), sha256_file(p)] for p in files])


def _load(model_dir: Path, cls_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, state dict) of a diffusers model directory, loaded with diffusers, offline."""
    from lightning_modules.interop.export import require_diffusers

    require_diffusers()
    import diffusers

    model = getattr(diffusers, cls_name).from_pretrained(model_dir, local_files_only=True)
    return dict(model.config), model.state_dict()


def _check_same(
    ours: dict[str, Any], theirs: dict[str, Any], prefix: str, model_dir: Path, what: str
) -> None:
    bad = {k: v for k, v in theirs.items() if k in ours and ours[k] != v}
    if bad:
        fix = " ".join(f"{prefix}.{k}={_override(v)}" for k, v in bad.items())
        mine = ", ".join(f"{k}={ours[k]}" for k in bad)
        raise UnsupportedByDiffusers(
            f"{KEY}: the {what} at {model_dir} has another architecture than the configured one ({mine}); "
            f"set: {fix}"
        )


def _override(value: Any) -> str:
    """A value as a Hydra command-line override writes it: [1,2,4], true, 0.5, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


def _check_groups(net: nn.Module, config: dict[str, Any], model_dir: Path, what: str, fix: str) -> None:
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    want = int(config.get("norm_num_groups", 32))
    if groups != {want}:
        raise UnsupportedByDiffusers(
            f"{KEY}: the {what} at {model_dir} normalises with {want} groups everywhere, the configured one with "
            f"{sorted(groups)}: {fix.format(want=want, double=2 * want)}"
        )


def init_autoencoder_from_diffusers(
    net: AutoencoderKL, path: str | os.PathLike, subfolder: str | None = None
) -> Path:
    """Copy a diffusers AutoencoderKL's weights into `net` (built from our config); returns the model dir."""
    model_dir = resolve_model_dir(path, subfolder, "vae")
    config, state = _load(model_dir, "AutoencoderKL")
    _check_same(
        {"norm_num_groups": None, **net.hparams()},  # the per-width rule when unset
        autoencoder_hparams_from_config(config),
        "model.autoencoder",
        model_dir,
        "AutoencoderKL",
    )
    _check_groups(net, config, model_dir, "AutoencoderKL", "set model.autoencoder.norm_num_groups={want}")
    net.load_state_dict(autoencoder_from_diffusers(state, net.hparams()), strict=True)
    return model_dir


def init_unet_from_diffusers(net: UNet, path: str | os.PathLike, subfolder: str | None = None) -> Path:
    """Copy a diffusers UNet2DConditionModel's weights into `net` (built from our config); returns the model
    dir. in/out channels come from the autoencoder and context_dim from the conditioner: a mismatch there
    names those keys."""
    model_dir = resolve_model_dir(path, subfolder, "unet")
    config, state = _load(model_dir, "UNet2DConditionModel")
    theirs = unet_hparams_from_config(config)
    ours = net.hparams()
    derived = {
        "in_channels": "the autoencoder's z_channels (model.autoencoder.z_channels of the autoencoder stage)",
        "out_channels": "z_channels (x2 with stage.module.variance_type=learned_range)",
        "context_dim": "the conditioner's token size (model.conditioner.embed_dim for class tokens)",
    }
    for key, source in derived.items():
        if ours[key] != theirs[key]:
            raise UnsupportedByDiffusers(
                f"{KEY}: the UNet2DConditionModel at {model_dir} has {key}={theirs[key]}, this stage builds "
                f"{ours[key]} from {source}"
            )
    _check_same(ours, {k: v for k, v in theirs.items() if k not in derived}, "model.unet", model_dir,
                "UNet2DConditionModel")  # fmt: skip
    _check_groups(net, config, model_dir, "UNet2DConditionModel",
                  "choose widths where every layer gets {want} groups (multiples of {double})")  # fmt: skip
    net.load_state_dict(unet_from_diffusers(state, net.hparams()), strict=True)
    return model_dir
