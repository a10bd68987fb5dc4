"""Stage `diffusion`: a latent U-Net trained for classifier-free guidance (Ho & Salimans 2022, Algorithm 1).

Latents come from the frozen autoencoder of stage `autoencoder` (re-loaded from its `final.ckpt` into a
`LatentCodec`, never part of this module's state), either encoded on the fly or read as cached posterior
moments. Conditions are dropped to the conditioner's null condition with probability `p_uncond`, so one
network learns p(z | y) and p(z). An EMA of the U-Net (and of a trainable conditioner) is what validation,
`sample_images` (`lightning_modules.generation.generate`) and `artifacts()` use; the training-time sample
grids are a callback (`eval.callbacks.SampleGrids`, `conf/callbacks/diffusion.yaml`) around it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from lightning_modules.artifacts import diffusion_artifacts
from lightning_modules.base import StageModule, build_optimizer, warmup_cosine
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import (
    PREDICTION_TYPES,
    VARIANCE_TYPES,
    NoiseSchedule,
    Sampler,
    bucket_centres,
    hybrid_vlb_term,
    min_snr_weight,
    q_sample,
    seeded_noise,
    split_model_output,
    timestep_buckets,
    training_target,
)
from lightning_modules.ema import EMA
from lightning_modules.generation import GuidanceSetting, generate
from lightning_modules.interop.pretrained import init_unet_from_diffusers
from lightning_modules.nets.conditioners import Conditioner
from lightning_modules.nets.unet import UNet

DenoiserNet = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def diffusion_loss(
    model: DenoiserNet,
    schedule: NoiseSchedule,
    prediction_type: str,
    z0: Tensor,
    t: Tensor,
    noise: Tensor,
    context: Tensor,
    mask: Tensor | None,
    min_snr_gamma: float | None = None,
    variance_type: str = "fixed_small",
    vlb_weight: float = 1e-3,
) -> Tensor:
    """Per-sample denoising loss w(t) * mean_pixels (f(z_t, t, c) - target)^2, shape (B,).

    z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4); target is noise, v or z0 for
    prediction_type "eps" (Ho et al. eq. 14, L_simple), "v" (Salimans & Ho 2022) or "x0"; w(t) = 1, or the
    min-SNR-gamma weight (Hang et al. 2023, Sec. 3.4). z0, noise: (B, C, h, w); t: long (B,);
    context: (B, L, D); mask: (B, L) bool or None. The squared error is taken in float32.
    variance_type "learned_range": the model also outputs its variance values and the loss is Improved
    DDPM's hybrid L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Sec. 3.1; lambda = vlb_weight), the VLB
    term training the variance only (`lightning_modules.diffusion.variance.hybrid_vlb_term`).
    """
    z_t = q_sample(schedule, z0, t, noise)
    pred, var_values = split_model_output(model(z_t, t, context, mask), z0.shape[1], variance_type)
    target = training_target(schedule, prediction_type, z0, noise, t)
    loss = (pred.float() - target.float()).square().flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(schedule, t, min_snr_gamma, prediction_type)
    if var_values is not None:
        loss = loss + hybrid_vlb_term(schedule, prediction_type, pred, var_values, z0, z_t, t, vlb_weight)
    return loss


def key_seeds(keys: Sequence[str]) -> list[int]:
    """A noise seed per sample from its shard key (crc32): independent of rank, batch and loader order."""
    return [zlib.crc32(str(k).encode()) for k in keys]




class DiffusionModule(StageModule):
    """Latent diffusion with label dropout, EMA, per-timestep-bucket losses and guided sampling.

    Args:
        unet: U-Net constructor (a Hydra `_partial_`); called with in/out_channels = the autoencoder's latent
            channels and context_dim = the conditioner's.
        conditioner: class or text conditioner (knows its null condition).
        schedule: noise schedule (T = schedule.num_timesteps).
        sampler: DDIM/DDPM sampler of `sample_images` (the training-time sample grids).
        optimizer: `_partial_` optimiser factory (AdamW).
        autoencoder_checkpoint: the autoencoder stage's `final.ckpt`.
        image_size: data image size H = W; latents are (z_channels, H / f, W / f).
        num_classes: classes of the dataset (sample grid rows; recorded for the classifier stage).
        prediction_type: "eps", "v" or "x0".
        p_uncond: label-dropout probability.
        min_snr_gamma: min-SNR-gamma loss weighting, or None for the plain MSE.
        variance_type: "fixed_small" (the U-Net predicts only the target) or "learned_range" (Improved
            DDPM: 2C output channels, the hybrid loss with lambda = vlb_weight; sample with sampler=iddpm).
        warmup_steps, total_steps, min_lr_ratio: linear LR warm-up, then cosine decay to min_lr_ratio
            (1.0 = constant LR, the LDM recipe).
        ema_decay, ema_warmup: EMA of the U-Net (`lightning_modules.ema.EMA`).
        num_loss_buckets: timestep buckets of the logged losses.
        seed: seeds the training noise per (seed, rank, step), so ranks draw different t and noise.
        init_from_diffusers: a local diffusers UNet2DConditionModel directory (or a pipeline directory: its
            `unet/`, or `init_subfolder`) whose weights the U-Net (and its EMA) start from; the configured
            U-Net must be the one it describes (`lightning_modules.interop.pretrained`).
    """

    stage_name = "diffusion"

    def __init__(
        self,
        unet: Callable[..., UNet],
        conditioner: Conditioner,
        schedule: NoiseSchedule,
        sampler: Sampler,
        optimizer: Callable[..., torch.optim.Optimizer],
        autoencoder_checkpoint: str,
        image_size: int,
        num_classes: int,
        prediction_type: str = "eps",
        p_uncond: float = 0.1,
        min_snr_gamma: float | None = None,
        variance_type: str = "fixed_small",
        vlb_weight: float = 1e-3,
        warmup_steps: int = 200,
        total_steps: int = 1000,
        min_lr_ratio: float = 1.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        num_loss_buckets: int = 10,
        seed: int = 0,
        init_from_diffusers: str | None = None,
        init_subfolder: str | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {list(VARIANCE_TYPES)}, got {variance_type!r}")
        self.save_hyperparameters(ignore=["unet", "conditioner", "schedule", "sampler", "optimizer"])
        # A plain object, not a submodule: the frozen autoencoder stays out of state_dict and optimiser.
        self.codec = LatentCodec.load(autoencoder_checkpoint)
        self.autoencoder_fingerprint = self.codec.fingerprint
        self.autoencoder_checkpoint = os.path.abspath(autoencoder_checkpoint)
        self.latent_shape = self.codec.latent_shape(image_size)
        self.conditioner = conditioner
        z_channels = self.codec.latent_channels
        out_channels = 2 * z_channels if variance_type == "learned_range" else z_channels
        self.unet = unet(in_channels=z_channels, out_channels=out_channels, context_dim=conditioner.context_dim)
        if init_from_diffusers:
            init_unet_from_diffusers(self.unet, init_from_diffusers, init_subfolder)
        self.ema = EMA(self.unet, decay=ema_decay, warmup=ema_warmup)
        trainable_cond = any(p.requires_grad for p in conditioner.parameters())
        self.conditioner_ema = EMA(conditioner, decay=ema_decay, warmup=ema_warmup) if trainable_cond else None
        self.schedule, self.sampler = schedule, sampler
        self.optimizer_factory = optimizer
        self.val_timesteps = bucket_centres(schedule.num_timesteps, num_loss_buckets)
        self.val_losses = nn.ModuleList([torchmetrics.MeanMetric() for _ in range(num_loss_buckets)])
        # Frozen text-encoder weights are left out of our checkpoints; on_load_checkpoint checks the rest.
        self.strict_loading = False
        self._rng: torch.Generator | None = None

    # --- the frozen first stage ----------------------------------------------------------------------
    def encode_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       sample_posterior: bool = True) -> Tensor:  # fmt: skip
        """z0 = scale_factor * (a draw from, or the mean of) q(z | x), float32 (B, C, h, w), from cached
        posterior moments or the batch's images (`LatentCodec.encode_batch`)."""
        return self.codec.encode_batch(batch, generator, sample_posterior)

    # --- training ----------------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """The training RNG, seeded from (seed, rank, step): ranks differ, a resumed run is reproducible."""
        if self._rng is None or self._rng.device != self.device:
            state = np.random.SeedSequence([self.hparams.seed, self.global_rank, self.global_step])
            self._rng = torch.Generator(device=self.device).manual_seed(int(state.generate_state(1)[0]))
        return self._rng

    def draw_timesteps_and_noise(self, z0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """t ~ U{0, ..., T-1} (B,) and noise ~ N(0, I) like z0."""
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
        return t, torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        rng = self._generator()
        z0 = self.encode_latents(batch, rng)
        t, noise = self.draw_timesteps_and_noise(z0, rng)
        condition = self.conditioner.condition_from_batch(batch)
        context, mask = self.conditioner(self.conditioner.drop(condition, self.hparams.p_uncond, rng))
        per_sample = diffusion_loss(self.unet, self.schedule, self.hparams.prediction_type, z0, t, noise,
                                    context, mask, self.hparams.min_snr_gamma, **self._variance_kwargs())  # fmt: skip
        loss = per_sample.mean()
        if not self.finite_or_skip({"diffusion_loss": loss}):
            return None  # no backward, no update
        self.log("train/loss", loss, prog_bar=True)
        self._log_buckets("train", per_sample.detach(), t)
        if self._trainer is not None and self.lr_schedulers() is not None:
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def _variance_kwargs(self) -> dict[str, Any]:
        return {"variance_type": self.hparams.variance_type, "vlb_weight": self.hparams.vlb_weight}

    def _log_buckets(self, prefix: str, per_sample: Tensor, t: Tensor) -> None:
        k = self.hparams.num_loss_buckets
        buckets = timestep_buckets(t, self.schedule.num_timesteps, k)
        sums = torch.zeros(k, device=per_sample.device).scatter_add_(0, buckets, per_sample.float())
        counts = torch.bincount(buckets, minlength=k)
        for b, n in enumerate(counts.tolist()):
            if n:
                self.log(f"{prefix}/loss_bucket{b}", sums[b] / n)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step, then update the EMA: here (not in on_train_batch_end, which runs after the checkpoint
        callback) the EMA saved with step N has seen exactly N updates, so a resumed run continues it exactly.
        Called once per optimiser step, so gradient accumulation does not over-count. A batch the non-finite
        guard skipped changed no weight and is not counted."""
        super().optimizer_step(*args, **kwargs)
        if self.skipped_batch:
            return
        self.ema.update(self.unet)
        if self.conditioner_ema is not None:
            self.conditioner_ema.update(self.conditioner)

    def on_train_start(self) -> None:
        self._rng = None  # reseed from the (possibly resumed) global step

    def on_train_epoch_end(self) -> None:
        self.log_data_health()

    def configure_optimizers(self) -> dict[str, Any]:
        opt = build_optimizer(self.optimizer_factory, [*self.unet.parameters(), *self.conditioner.parameters()])
        sched = warmup_cosine(opt, self.hparams.warmup_steps, self.hparams.total_steps, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- validation: EMA loss at fixed t per bucket, seeded noise ------------------------------------------
    def ema_conditioner(self) -> Conditioner:
        return self.conditioner if self.conditioner_ema is None else self.conditioner_ema.shadow

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        z0 = self.encode_latents(batch, sample_posterior=False)
        noise = seeded_noise(key_seeds(batch["key"]), z0.shape[1:], device=z0.device)
        cond = self.ema_conditioner()
        context, mask = cond(cond.condition_from_batch(batch))
        for metric, t_fixed in zip(self.val_losses, self.val_timesteps):
            t = torch.full((z0.shape[0],), t_fixed, dtype=torch.long, device=z0.device)
            loss = diffusion_loss(self.ema.shadow, self.schedule, self.hparams.prediction_type, z0, t, noise,
                                  context, mask, **self._variance_kwargs())  # fmt: skip
            metric.update(loss)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics sync over ranks in compute(): every rank calls it, whatever its number of batches.
        values = [m.compute() for m in self.val_losses]
        for b, value in enumerate(values):
            self.log(f"val/loss_bucket{b}", value)
        self.log("val/loss", torch.stack(values).mean(), prog_bar=True)
        for m in self.val_losses:
            m.reset()

    # --- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, condition: Any, scale: float, seeds: Sequence[int]) -> np.ndarray:
        """EMA samples, uint8 (B, H, W, C), for B conditions at classifier-free guidance scale `scale`; the
        unconditional half uses the conditioner's null condition, the very input label dropout trains."""
        return generate(self.ema.shadow, self.codec, self.ema_conditioner(), GuidanceSetting("cfg", cfg_scale=scale),
                        self.sampler, self.schedule, self.hparams.prediction_type, condition, seeds,
                        latent_shape=self.latent_shape, device=self.device,
                        variance_type=self.hparams.variance_type)  # fmt: skip

    # --- checkpoints ---------------------------------------------------------------------------------------
    def _frozen_keys(self) -> set[str]:
        """state_dict keys of the conditioner's frozen part (re-loaded from its own files, not saved)."""
        trainable = {n for n, p in self.conditioner.named_parameters() if p.requires_grad}
        return {f"conditioner.{k}" for k in self.conditioner.state_dict() if k not in trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        frozen = self._frozen_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        ours = set(self.state_dict())
        found = set(checkpoint["state_dict"])
        missing, unexpected = ours - self._frozen_keys() - found, found - ours
        if missing or unexpected:
            raise RuntimeError(
                f"diffusion checkpoint does not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]} (was the U-Net or conditioner config changed?)"
            )

    def artifacts(self) -> dict[str, Any]:
        return diffusion_artifacts(self.ema.shadow, self.conditioner, self.ema_conditioner(), self.schedule,
                                   self.hparams.prediction_type, self.latent_shape, self.autoencoder_checkpoint,
                                   self.autoencoder_fingerprint, self.codec.scale_factor, self.hparams.num_classes,
                                   self.hparams.variance_type)  # fmt: skip
