"""The evaluation sample generator: `generate` bound to a loaded diffusion model, a sampler and the
dataset's class names, plus the fingerprint of everything that determines the samples (the sweep's
resume hashes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lightning_modules.artifacts import DiffusionBundle, state_fingerprint
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import Sampler
from lightning_modules.diffusion.variance import check_sampler_variance
from lightning_modules.generation import AUTOCAST_DTYPES, generate

# What the generator is called with: a guidance setting, or a sweep point (`eval.sampler_sweep.SweepSetting`:
# `guidance` and its own `sampler`, None for the generator's).
Setting = Any

__all__ = ["SampleGenerator"]


def _sampler_description(sampler: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else dict(vars(sampler))
    return {"type": type(sampler).__name__, **fields}


class SampleGenerator:
    """Decoded samples of one guidance setting (`generate`), and the fingerprint that identifies them.

    Args:
        diffusion: the bundle of `load_diffusion` (EMA U-Net, conditioner, schedule, autoencoder).
        sampler: a DDIM/DDPM/DPM-Solver++ sampler (its step count and spacing define the chain); a sweep
            point with a sampler of its own (`eval.sampler_sweep.SweepSetting`) is drawn with that one.
        classifier: the noisy-latent classifier, needed by settings with s_cls != 0.
        class_names: for text conditioners: captions are `caption_template.format(class_name)`.
        device: where sampling runs.
        dtype: "fp32", or "bf16"/"fp16" autocast for the U-Net and classifier calls (the latent state,
            the sampler arithmetic and decoding stay float32).
        progress_steps: a progress bar over the sampling steps of every batch.
    """

    def __init__(
        self,
        diffusion: DiffusionBundle,
        sampler: Sampler,
        classifier: torch.nn.Module | None = None,
        class_names: Sequence[str] | None = None,
        caption_template: str = "a photo of a {}",
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        progress_steps: bool = False,
    ) -> None:
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"sampling_dtype must be one of {list(AUTOCAST_DTYPES)}, got {dtype!r}")
        check_sampler_variance(sampler, diffusion.variance_type)
        self.diffusion = diffusion
        self.dtype = dtype
        self.sampler = sampler
        self.classifier = classifier
        self.class_names = list(class_names) if class_names is not None else None
        self.caption_template = caption_template
        self.device = torch.device(device)
        self.progress_steps = progress_steps
        for module in (diffusion.unet, diffusion.conditioner, diffusion.autoencoder, classifier):
            if module is not None:
                module.to(self.device).eval()
        self.codec = LatentCodec.of(diffusion)
        self._fingerprints: dict[str, Any] | None = None

    def sampler_of(self, setting: Setting) -> Sampler:
        """The sampler that draws `setting`: its own (a sampler sweep's point) or the generator's."""
        return getattr(setting, "sampler", None) or self.sampler

    def describe(self, setting: Setting = None) -> dict[str, Any]:
        """Sampler columns of a results row (of `setting`'s sampler)."""
        sampler = self.sampler_of(setting)
        return {"sampler": type(sampler).__name__, "num_steps": getattr(sampler, "num_steps", None),
                "spacing": getattr(sampler, "spacing", None), "dtype": self.dtype}  # fmt: skip

    @property
    def text_conditioned(self) -> bool:
        return not isinstance(self.diffusion.conditioner.null_condition(1), torch.Tensor)

    def fingerprint(self, setting: Setting) -> dict[str, Any]:
        """What determines the samples of `setting` besides indices and seeds (weights by content)."""
        if self._fingerprints is None:
            d = self.diffusion
            self._fingerprints = {
                "unet": state_fingerprint(d.unet.state_dict()),
                "conditioner": state_fingerprint(d.conditioner.state_dict()),
                "autoencoder": d.autoencoder_fingerprint,
                "schedule": d.schedule.to_dict(),
                "prediction_type": d.prediction_type,
                "scale_factor": d.scale_factor,
                "sampler": _sampler_description(self.sampler),
                "dtype": self.dtype,
                "captions": self.caption_template if self.text_conditioned else None,
                "classifier": state_fingerprint(self.classifier.state_dict()) if self.classifier else None,
            }
        out = dict(self._fingerprints)
        if getattr(setting, "sampler", None) is not None:
            out["sampler"] = _sampler_description(setting.sampler)
        if setting.cls_scale == 0:
            out["classifier"] = None  # an unused classifier does not change the samples
        return out

    def condition(self, labels: torch.Tensor) -> Any:
        """Labels (B,) -> what the conditioner takes: the labels, or one caption per label."""
        if not self.text_conditioned:
            return labels
        names = self.class_names or [str(i) for i in range(self.diffusion.num_classes)]
        return [self.caption_template.format(names[int(y)]) for y in labels]

    def negative_condition(self, negative: int | str) -> Any:
        """A batch-1 negative condition: a class index (or name) for class conditioners, else a prompt."""
        if self.text_conditioned:
            return [str(negative)]
        if isinstance(negative, str) and self.class_names and negative in self.class_names:
            negative = self.class_names.index(negative)
        try:
            index = int(negative)
        except (TypeError, ValueError):
            raise ValueError(
                f"guidance.negative={negative!r}: a class-conditioned model takes a class index or class name"
            ) from None
        return torch.tensor([index], device=self.device)

    @torch.no_grad()
    def __call__(self, setting: Setting, labels: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """labels (B,), seeds (B,) -> uint8 images (B, H, W, C) of `generate`."""
        sampler = self.sampler_of(setting)
        setting = getattr(setting, "guidance", setting)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        negative = None if setting.negative is None else self.negative_condition(setting.negative)
        d = self.diffusion
        return generate(d.unet, self.codec, d.conditioner, setting, sampler, d.schedule, d.prediction_type,
                        self.condition(y), seeds, latent_shape=d.latent_shape, labels=y,
                        negative_condition=negative, classifier=self.classifier, device=self.device,
                        autocast_dtype=AUTOCAST_DTYPES[self.dtype], progress=self.progress_steps,
                        variance_type=d.variance_type)  # fmt: skip

