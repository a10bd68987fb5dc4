"""The project's diffusers pipeline: `GuidedLDMPipeline`, and `ClassEmbedder`, the class-token component.

Imports diffusers at module level: import this module only where diffusers is installed (it is a dev
dependency; `lightning_modules.interop.export.require_diffusers` says how to install it). Load an exported
directory with

    from lightning_modules.interop.diffusers_pipeline import GuidedLDMPipeline
    pipe = GuidedLDMPipeline.from_pretrained(out, local_files_only=True)
    images = pipe(class_labels=[3, 7], guidance_scale=3.0, num_inference_steps=10, seeds=[0, 1]).images

The pipeline draws what our `lightning_modules.generation.generate` draws: the same initial noise per seed
(one torch.Generator per sample, seeded with seed mod 2^32, on the execution device), the same
classifier-free guidance `eps_u + s (eps_c - eps_u)` (s = 1: the conditional model alone; docs/ARCHITECTURE.md,
"Guidance scales") with the conditional and unconditional halves in one batch, the unconditional half on
the null condition (class index `num_classes`, or the empty prompt) or on a negative condition, and
x = D(z / scaling_factor) clamped to [-1, 1].
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from lightning_modules.diffusion.sampling import make_generators, seeded_noise

__all__ = ["ClassEmbedder", "GuidedLDMPipeline"]


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Learned class tokens (our ClassConditioner's weights): labels (B,) -> context (B, num_tokens, embed_dim).

    Index `num_classes` is the null class (the unconditional input that label dropout trained).
    """

    @register_to_config
    def __init__(self, num_classes: int, embed_dim: int, num_tokens: int = 1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes + 1, embed_dim * num_tokens)

    @property
    def null_index(self) -> int:
        return int(self.config.num_classes)

    def forward(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """labels (B,) long in [0, num_classes] -> context (B, L, D), mask (B, L) bool (all True)."""
        bad = labels[(labels < 0) | (labels > self.null_index)]
        if bad.numel():
            raise ValueError(
                f"class label {int(bad[0])} out of range: expected 0..{self.null_index - 1} "
                f"or the null index {self.null_index}"
            )
        tokens, dim = int(self.config.num_tokens), int(self.config.embed_dim)
        context = self.embedding(labels).view(len(labels), tokens, dim)
        return context, torch.ones(len(labels), tokens, dtype=torch.bool, device=labels.device)


def _text_tower(model: nn.Module) -> nn.Module:
    """The token encoder of a text model (as our TextConditioner): CLIP's text tower, T5's encoder, or it."""
    if hasattr(model, "text_model"):
        return model.text_model
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return model.get_encoder()
    return model


class GuidedLDMPipeline(DiffusionPipeline):
    """Class- or text-conditional latent diffusion with classifier-free guidance.

    Components: `vae` (AutoencoderKL; `scaling_factor` is the latent scale factor), `unet`
    (UNet2DConditionModel; an output of 2x the latent channels is a learned variance, ignored here),
    `scheduler` (DDIMScheduler or DPMSolverMultistepScheduler) and either `conditioner` (ClassEmbedder) or
    `text_encoder` + `tokenizer` (captions padded to `tokenizer.model_max_length` tokens).
    """

    model_cpu_offload_seq = "text_encoder->conditioner->unet->vae"
    _optional_components = ["conditioner", "text_encoder", "tokenizer"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        scheduler: Any,
        conditioner: ClassEmbedder | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
    ) -> None:
        super().__init__()
        if (conditioner is None) == (text_encoder is None):
            raise ValueError(
                "GuidedLDMPipeline needs exactly one of conditioner (class labels) or text_encoder"
            )
        if text_encoder is not None and tokenizer is None:
            raise ValueError("GuidedLDMPipeline: a text_encoder needs its tokenizer")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, conditioner=conditioner,
                              text_encoder=text_encoder, tokenizer=tokenizer)  # fmt: skip
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # --- conditions ------------------------------------------------------------------------------------
    def _encode(self, condition: Any, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.conditioner is not None:
            labels = torch.as_tensor(condition, dtype=torch.long, device=device).reshape(-1)
            return self.conditioner(labels)
        tokens = self.tokenizer(list(condition), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        hidden = _text_tower(self.text_encoder)(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()

    def _null(self, batch: int) -> Any:
        return [self.conditioner.null_index] * batch if self.conditioner is not None else [""] * batch

    def _conditions(
        self, class_labels: Any, prompt: Any, negative_class_labels: Any, negative_prompt: Any
    ) -> tuple[Any, Any]:
        if self.conditioner is not None:
            if prompt is not None or negative_prompt is not None:
                raise ValueError("this pipeline is class-conditional: pass class_labels, not prompt")
            if class_labels is None:
                raise ValueError("pass class_labels (B class indices)")
            cond = [int(c) for c in np.asarray(class_labels).reshape(-1)]
            neg = negative_class_labels
            neg = None if neg is None else [int(c) for c in np.asarray(neg).reshape(-1)]
        else:
            if class_labels is not None or negative_class_labels is not None:
                raise ValueError("this pipeline is text-conditional: pass prompt, not class_labels")
            if prompt is None:
                raise ValueError("pass prompt (a string or B strings)")
            cond = [prompt] if isinstance(prompt, str) else list(prompt)
            neg = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        if neg is not None and len(neg) not in (1, len(cond)):
            raise ValueError(f"{len(neg)} negative conditions for {len(cond)} samples: give 1 or {len(cond)}")
        return cond, neg

    def _initial_latents(
        self, batch: int, seeds: Sequence[int] | None, generator: Any, latents: Tensor | None,
        device: torch.device, dtype: torch.dtype,
    ) -> tuple[Tensor, list[torch.Generator] | None]:  # fmt: skip
        """x_T, and the per-sample generators of `seeds` (None without seeds or with `latents` given), whose
        streams a stochastic scheduler's step noise continues (`_step_noise`)."""
        channels, size = int(self.unet.config.in_channels), int(self.unet.config.sample_size)
        shape = (batch, channels, size, size)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents of shape {tuple(latents.shape)}, expected {shape}")
            return latents.to(device=device, dtype=dtype), None
        if seeds is not None:
            seeds = [int(s) for s in seeds]
            if len(seeds) != batch:
                raise ValueError(f"{len(seeds)} seeds for {batch} samples")
            # Our sampling.seeded_noise: one generator per sample, so a sample depends on its seed alone.
            generators = make_generators(seeds, device)
            return seeded_noise(seeds, shape[1:], generators, dtype=dtype), generators
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype), None

    def _step_noise(self, step: int, seeds: Sequence[int] | None, generators: list[torch.Generator] | None,
                    x: Tensor) -> dict[str, Tensor]:  # fmt: skip
        """variance_noise for a stochastic DPM-Solver++ step with per-sample seeds, drawn in our loop's order
        (sampling.sample: one draw per step that does not land on sigma = 0), so seeded samples equal ours;
        nothing for other schedulers or without seeds (diffusers then draws from `generator`)."""
        if generators is None or not str(getattr(self.scheduler.config, "algorithm_type", "")).startswith("sde"):
            return {}
        if float(self.scheduler.sigmas[step + 1]) == 0.0:
            return {"variance_noise": torch.zeros_like(x)}  # its coefficient is 0 there; our loop draws nothing
        return {"variance_noise": seeded_noise(seeds, x.shape[1:], generators, dtype=x.dtype)}

    # --- sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | Tensor | None = None,
        prompt: str | Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        negative_class_labels: Sequence[int] | Tensor | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        guidance_rescale: float = 0.0,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label (or prompt).

        guidance_scale: s of eps_u + s (eps_c - eps_u); 1 = no guidance (one forward per step).
        negative_class_labels / negative_prompt: the unconditional half's condition instead of the null one
        (one for all samples, or one per sample). guidance_rescale: phi of Lin et al. 2023 (eq. 15-16).
        seeds: one per sample (our per-sample noise); else `generator` or `latents` as in diffusers.
        eta: DDIM's eta (DDIMScheduler only). output_type: "pil", "np" (B, H, W, C) or "pt" (B, C, H, W),
        both in [0, 1], or "latent" (the final z).
        """
        device = self._execution_device
        cond, neg = self._conditions(class_labels, prompt, negative_class_labels, negative_prompt)
        batch = len(cond)
        context_c, mask_c = self._encode(cond, device)
        guided = guidance_scale != 1.0
        if guided:
            context_u, mask_u = self._encode(neg if neg is not None else self._null(1), device)
            context_u = context_u.expand(batch, *context_u.shape[1:]) if len(context_u) == 1 else context_u
            mask_u = mask_u.expand(batch, *mask_u.shape[1:]) if len(mask_u) == 1 else mask_u
            context = torch.cat([context_c, context_u])
            mask = torch.cat([mask_c, mask_u])
        else:
            context, mask = context_c, mask_c
        # diffusers masks by an additive bias; a mask with no padding is left out (the same attention).
        attention_mask = None if bool(mask.all()) else mask

        dtype = self.unet.dtype
        x, seed_generators = self._initial_latents(batch, seeds, generator, latents, device, dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(eta, generator)
        channels = int(self.unet.config.in_channels)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = torch.cat([x, x]) if guided else x
            inp = self.scheduler.scale_model_input(inp, t)
            out = self.unet(inp, t, encoder_hidden_states=context.to(dtype),
                            encoder_attention_mask=attention_mask).sample[:, :channels]  # fmt: skip
            if guided:
                eps_c, eps_u = out.chunk(2)
                out = eps_u + guidance_scale * (eps_c - eps_u)
                if guidance_rescale:
                    out = _rescale(out, eps_c, guidance_rescale)
            x = self.scheduler.step(out, t, x, **step_kwargs, **self._step_noise(i, seeds, seed_generators, x)).prev_sample

        if output_type == "latent":
            images: Any = x
        else:
            decoded = self.vae.decode(x.float() / self.vae.config.scaling_factor).sample.float().clamp(-1, 1)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _step_kwargs(self, eta: float, generator: Any) -> dict[str, Any]:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict[str, Any] = {}
        if "eta" in params:
            kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta={eta} is a DDIM option; {type(self.scheduler).__name__} has none")
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs


def _rescale(guided: Tensor, eps_c: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16), per sample as our `cfg_combine`."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (eps_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided
