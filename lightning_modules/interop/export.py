"""A trained diffusion stage (its final.ckpt and the autoencoder it names) -> a diffusers pipeline directory.

    out/
      model_index.json       GuidedLDMPipeline (lightning_modules.interop.diffusers_pipeline)
      vae/                   AutoencoderKL, scaling_factor = the latent scale factor
      unet/                  UNet2DConditionModel (the EMA weights by default), safetensors
      scheduler/             DDIMScheduler or DPMSolverMultistepScheduler: the training schedule and
                             prediction type
      conditioner/           ClassEmbedder (class models), or text_encoder/ + tokenizer/ (text models)
      pipeline.py            a two-line loader for DiffusionPipeline.from_pretrained(out, custom_pipeline=out)

Everything is converted and checked before anything is written; the directory is written beside `out`
under a temporary name, synced, and renamed into place (`core.io.publish_directory`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.io import check_publishable, publish_directory
from lightning_modules.artifacts import DiffusionBundle, StageMismatchError, load_diffusion, safe_load
from lightning_modules.interop.convert import (
    UnsupportedByDiffusers,
    autoencoder_config,
    autoencoder_to_diffusers,
)
from lightning_modules.interop.convert_unet import unet_config, unet_to_diffusers
from lightning_modules.interop.schedulers import SCHEDULERS, scheduler_config
from lightning_modules.nets.conditioners import ClassConditioner, TextConditioner

__all__ = ["WEIGHTS", "build_pipeline", "export_diffusers", "require_diffusers"]

WEIGHTS = ("ema", "raw")
# So that plain diffusers finds the pipeline class too:
# DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True, local_files_only=True).
# It only imports the class from this (installed) project.
LOADER_SHIM = "pipeline.py"
LOADER_SHIM_TEXT = (
    '"""GuidedLDMPipeline of the guided-LDM project (which must be installed): lets\n'
    "DiffusionPipeline.from_pretrained(this_dir, custom_pipeline=this_dir, trust_remote_code=True) find it.\"\"\"\n"
    "from lightning_modules.interop.diffusers_pipeline import ClassEmbedder, GuidedLDMPipeline  # noqa: F401\n"
)


def require_diffusers() -> None:
    """Raise ImportError with the install command when diffusers is missing (a dev dependency here)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "exporting to or importing from diffusers needs the diffusers package: pip install diffusers "
            "(or the project's dev extras: pip install -e '.[dev]')"
        ) from err


def raw_unet_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The U-Net's trained (non-EMA) weights of a diffusion final.ckpt: Lightning's `state_dict`, `unet.*`."""
    state = safe_load(checkpoint).get("state_dict") or {}
    raw = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    if not raw:
        raise StageMismatchError(
            f"{checkpoint} holds no raw U-Net weights (state_dict unet.*); use weights=ema"
        )
    return raw


def build_pipeline(
    bundle: DiffusionBundle, *, scheduler: str = "ddim", spacing: str = "leading", unet_state: Any = None
) -> Any:
    """The GuidedLDMPipeline of a loaded diffusion model (`load_diffusion`), in float32 on the CPU.

    unet_state: U-Net weights to export instead of the bundle's (EMA) ones. Raises UnsupportedByDiffusers
    naming an option with no diffusers equivalent.
    """
    require_diffusers()
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

    from lightning_modules.interop.diffusers_pipeline import ClassEmbedder, GuidedLDMPipeline

    if scheduler not in SCHEDULERS:
        raise UnsupportedByDiffusers(f"scheduler={scheduler!r}: expected one of {list(SCHEDULERS)}")
    sched_cls = DDIMScheduler if scheduler == "ddim" else DPMSolverMultistepScheduler
    sched = sched_cls(**scheduler_config(bundle.schedule, bundle.prediction_type, scheduler, spacing))

    ae = bundle.autoencoder
    image_size = bundle.latent_shape[-1] * ae.downsample_factor
    vae = AutoencoderKL(**autoencoder_config(ae, sample_size=image_size, scaling_factor=bundle.scale_factor))
    vae.load_state_dict(autoencoder_to_diffusers(ae.state_dict(), ae.hparams()), strict=True)

    ours = bundle.unet
    if ours.hparams()["in_channels"] != bundle.latent_shape[0]:
        raise StageMismatchError(f"{bundle.path}: U-Net in_channels differ from the latent shape")
    unet = UNet2DConditionModel(**unet_config(ours, sample_size=int(bundle.latent_shape[-1])))
    state = ours.state_dict() if unet_state is None else unet_state
    unet.load_state_dict(unet_to_diffusers(state, ours.hparams()), strict=True)

    cond = bundle.conditioner
    components: dict[str, Any] = {}
    if isinstance(cond, ClassConditioner):
        embedder = ClassEmbedder(num_classes=cond.num_classes, embed_dim=cond.context_dim,
                                 num_tokens=cond.num_tokens)  # fmt: skip
        embedder.load_state_dict(cond.state_dict(), strict=True)
        components["conditioner"] = embedder
    elif isinstance(cond, TextConditioner):
        components.update(_text_components(cond))
    else:
        raise UnsupportedByDiffusers(f"conditioner {type(cond).__name__}: export knows ClassConditioner and "
                                     "TextConditioner")  # fmt: skip
    pipe = GuidedLDMPipeline(vae=vae.eval(), unet=unet.eval(), scheduler=sched, **components)
    return pipe


def _text_components(cond: TextConditioner) -> dict[str, Any]:
    from transformers import PreTrainedModel

    encoder = cond.encoder
    if not isinstance(encoder, PreTrainedModel) or getattr(encoder.config, "is_encoder_decoder", False):
        raise UnsupportedByDiffusers(
            f"text conditioner {cond.model_path or 'MiniLM'}: its token encoder ({type(encoder).__name__}) is "
            "not a stand-alone transformers model; export supports encoder-only models (BERT-like, as the "
            "packaged MiniLM), not CLIP's or T5's towers yet"
        )
    tokenizer = cond.tokenizer
    tokenizer.model_max_length = int(cond.max_length)  # the pipeline pads captions to it, as training did
    return {"text_encoder": encoder.eval(), "tokenizer": tokenizer}


def export_diffusers(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    autoencoder_checkpoint: str | os.PathLike | None = None,
    scheduler: str = "ddim",
    spacing: str = "leading",
    weights: str = "ema",
    force: bool = False,
) -> Path:
    """Write the diffusers directory of diffusion checkpoint `checkpoint` to `out`; returns `out`.

    An existing non-empty `out` is refused unless `force`; then it is replaced only once the new directory
    is complete. weights: "ema" (the checkpoint's EMA U-Net, what our sampling uses) or "raw".
    """
    out = Path(out)
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {list(WEIGHTS)}")
    check_publishable(out, force)  # before loading anything
    bundle = load_diffusion(checkpoint, autoencoder_checkpoint)
    unet_state = raw_unet_state(checkpoint) if weights == "raw" else None
    pipe = build_pipeline(bundle, scheduler=scheduler, spacing=spacing, unet_state=unet_state)

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / LOADER_SHIM).write_text(LOADER_SHIM_TEXT)

    return publish_directory(out, write, force=force)
