"""The one generation function: condition -> guided denoiser -> reverse process -> decode -> uint8.

Every sample of the project is drawn by `generate`: the training stage's sample grids
(`DiffusionModule.sample_images`), the evaluation sweep (`eval.generator.SampleGenerator`) and the bench
scripts. A `GuidanceSetting` says how the chain is guided.

Scale conventions (docs/ARCHITECTURE.md): classifier-free `eps_u + s (eps_c - eps_u)` (Ho & Salimans
2022, eq. 6 with w = s - 1), s = 1 no guidance; classifier guidance (Dhariwal & Nichol 2021, Algorithms
1-2) s_cls = 0 no guidance. Kind `classifier` samples the diffusion model with the null condition
(unconditionally) and steers it with the classifier alone.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import CFGDenoiser, NoiseSchedule, Sampler, classifier_cond_fn, sample

__all__ = ["AUTOCAST_DTYPES", "GUIDANCE_KINDS", "GuidanceSetting", "generate"]

GUIDANCE_KINDS = ("cfg", "classifier", "both")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

DenoiserNet = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def _fmt(x: float) -> str:
    """Short stable number text for directory names: 3.0 -> "3", 1.5 -> "1.5", 1e-3 -> "0.001"."""
    return f"{x:g}" if abs(x) >= 1e-4 or x == 0 else f"{x:.3e}"


def _slug(value: Any) -> str:
    text = str(value)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:24]
    return slug if slug == text else f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class GuidanceSetting:
    """How one batch is guided (and one point of an evaluation sweep).

    kind: "cfg" (classifier-free guidance at `cfg_scale`), "classifier" (null condition, classifier
    guidance at `cls_scale`) or "both". rescale_phi: guidance rescale (Lin et al. 2023, eq. 15-16).
    negative: the condition the unconditional half uses instead of the null one (a class index/name or a
    prompt; resolved to a conditioner input by the caller, see `generate`'s `negative_condition`).
    """

    kind: str
    cfg_scale: float = 1.0
    cls_scale: float = 0.0
    rescale_phi: float = 0.0
    negative: int | str | None = None

    @property
    def conditional(self) -> bool:
        """Whether the diffusion model sees the requested class (all kinds but "classifier")."""
        return self.kind != "classifier"

    @property
    def name(self) -> str:
        """Stable directory name, e.g. cfg_s3, cls_s10, both_s3_c1, cfg_s5_phi0.7_neg2."""
        base = {
            "cfg": f"cfg_s{_fmt(self.cfg_scale)}",
            "classifier": f"cls_s{_fmt(self.cls_scale)}",
            "both": f"both_s{_fmt(self.cfg_scale)}_c{_fmt(self.cls_scale)}",
        }[self.kind]
        if self.rescale_phi:
            base += f"_phi{_fmt(self.rescale_phi)}"
        if self.negative is not None:
            base += f"_neg{_slug(self.negative)}"
        return base

    def as_row(self) -> dict[str, Any]:
        """The setting's columns of a results row (cfg_scale is None for kind "classifier": no CFG at all)."""
        return {
            "setting": self.name,
            "guidance": self.kind,
            "cfg_scale": self.cfg_scale if self.conditional else None,
            "cls_scale": self.cls_scale,
            "rescale_phi": self.rescale_phi,
            "negative": self.negative,
        }


def _context(conditioner: Any, condition: Any, device: torch.device) -> tuple[Tensor, Tensor | None]:
    context, mask = conditioner(condition)
    return context.to(device), None if mask is None else mask.to(device)


@torch.no_grad()
def generate(
    unet: DenoiserNet,
    codec: LatentCodec,
    conditioner: Any,
    guidance: GuidanceSetting,
    sampler: Sampler,
    schedule: NoiseSchedule,
    prediction_type: str,
    condition: Any,
    seeds: Sequence[int],
    *,
    latent_shape: Sequence[int],
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    negative_condition: Any = None,
    classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    variance_type: str = "fixed_small",
) -> np.ndarray:
    """B samples -> uint8 images (B, H, W, C), x = D(z_0 / scale_factor) of the reverse chain's z_0.

    unet(x, t, context, mask) -> prediction of `prediction_type`; conditioner: condition -> (context, mask),
    with `null_condition(1)`; condition: what the conditioner takes for the B requested samples (labels
    (B,) or B captions), unused by kind "classifier"; seeds: one per sample (sample i depends on seeds[i]
    alone, `sample`). The unconditional half of classifier-free guidance uses `negative_condition` (a
    batch-1 conditioner input) when given, else the conditioner's null condition, the very input label
    dropout trains. labels: long (B,) class indices that classifier guidance (guidance.cls_scale != 0,
    with `classifier(x, t) -> logits`) steers towards. autocast_dtype: bf16/fp16 autocast for the
    conditioner, U-Net and classifier calls (None: float32); decoding always runs in float32.
    variance_type: the checkpoint's ("learned_range": the U-Net also outputs its variance, `sample`).
    """
    device = torch.device(device)
    if guidance.cls_scale and classifier is None:
        raise ValueError(f"setting {guidance.name} needs a classifier (guidance.classifier_checkpoint)")
    if guidance.cls_scale and labels is None:
        raise ValueError(f"setting {guidance.name} (classifier guidance) needs the labels to guide towards")
    cond_fn = None
    if guidance.cls_scale:
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
        cond_fn = classifier_cond_fn(classifier, y, guidance.cls_scale)
    enabled = autocast_dtype is not None
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=enabled):
        null = conditioner.null_condition(1)
        cond = _context(conditioner, condition if guidance.conditional else null, device)
        uncond = _context(conditioner, null if negative_condition is None else negative_condition, device)
        denoiser = CFGDenoiser(
            unet, *cond, *uncond, scale=guidance.cfg_scale, rescale_phi=guidance.rescale_phi,
            learned_variance=variance_type == "learned_range",
        )
        z = sample(denoiser, (len(seeds), *latent_shape), schedule, sampler, prediction_type=prediction_type,
                   seeds=list(seeds), cond_fn=cond_fn, progress=progress, device=device,
                   variance_type=variance_type)  # fmt: skip
    return codec.decode_uint8(z)
