"""The one latent codec: images <-> scaled latents through the frozen first-stage autoencoder.

Like NVlabs/edm2's `Encoder`, one object owns the frozen autoencoder and the latent scale factor, so every
stage encodes, decodes and checks shapes the same way: z = scale_factor * (a draw from, or the mean of)
q(z | x) (Rombach et al. 2022, Sec. 4.3 and Appendix G: latents rescaled to unit variance), and
x = D(z / scale_factor) clamped to [-1, 1].

Hiding the autoencoder: `LatentCodec` is a plain object, not an `nn.Module`, so a LightningModule that
holds one as an attribute does not register the autoencoder as a submodule: it is never in that stage's
state_dict or checkpoint (its weight fingerprint is), never handed to the optimiser, never wrapped by DDP,
and not moved by `module.to(...)`. Instead it follows its input: every call moves it to the device of the
tensor it is given (once; a no-op after that).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.images import to_uint8_nhwc
from lightning_modules.artifacts import DiffusionBundle, StageMismatchError, load_autoencoder
from lightning_modules.nets.autoencoder import AutoencoderKL, DiagonalGaussian

__all__ = ["LatentCodec"]


class LatentCodec:
    """Frozen autoencoder + latent scale factor.

    Args:
        autoencoder: the first stage; put in eval mode with gradients off here.
        scale_factor: the autoencoder stage's `latent_scale_factor` (1 / std of its latents).
        fingerprint: the autoencoder's weight fingerprint (`state_fingerprint`), for stage checks; None
            when unknown.
    """

    def __init__(
        self, autoencoder: AutoencoderKL, scale_factor: float, fingerprint: str | None = None
    ) -> None:
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.fingerprint = fingerprint

    @classmethod
    def load(cls, autoencoder_checkpoint: str | os.PathLike) -> LatentCodec:
        """The codec of an autoencoder stage's final.ckpt (weights, scale factor, fingerprint)."""
        return cls(*load_autoencoder(autoencoder_checkpoint))

    @classmethod
    def of(cls, diffusion: DiffusionBundle) -> LatentCodec:
        """The codec of a loaded diffusion model (`load_diffusion`): its autoencoder and scale factor."""
        return cls(diffusion.autoencoder, diffusion.scale_factor, diffusion.autoencoder_fingerprint)

    # --- shapes --------------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.autoencoder.z_channels

    @property
    def image_channels(self) -> int:
        return int(self.autoencoder.hparams()["out_channels"])

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of square images of `image_size` (refused when the autoencoder cannot
        encode them: wrong input channels, or a size its downsampling does not divide)."""
        ae = self.autoencoder
        ae.validate_input_shape(ae.in_channels, image_size, image_size)
        return tuple(ae.latent_shape(image_size))

    def decoded_shape(self, latent_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
        """(C, H, W) of the images decoded from latents of `latent_shape` (C, h, w)."""
        _, h, w = latent_shape
        f = self.autoencoder.downsample_factor
        return (self.image_channels, h * f, w * f)

    def check_latents(
        self,
        latent_shape: tuple[int, ...] | list[int],
        where: str,
        channels: int | None = None,
        image_size: int | None = None,
    ) -> None:
        """Refuse latents of `latent_shape` (C, h, w) (e.g. a diffusion checkpoint's) that are not this
        autoencoder's; with the data's `channels` and `image_size`, also latents that decode to another
        shape than (channels, image_size, image_size): samples of another shape cannot be compared with the
        real images. `where` names the source in the message (StageMismatchError)."""
        z_channels = int(latent_shape[0])
        if z_channels != self.latent_channels:
            raise StageMismatchError(
                f"{where}: latents have {z_channels} channels, its autoencoder {self.latent_channels}"
            )
        if channels is None or image_size is None:
            return
        decoded = self.decoded_shape(latent_shape)
        if decoded != (channels, image_size, image_size):
            raise StageMismatchError(
                f"{where}: decoded samples are {decoded} (C, H, W), but the data (data.channels, "
                f"data.image_size) are {(channels, image_size, image_size)}: FID against them is meaningless"
            )

    # --- images -> latents ---------------------------------------------------------------------------
    def _follow(self, x: Tensor) -> AutoencoderKL:
        """The autoencoder, on x's device."""
        if next(self.autoencoder.parameters()).device != x.device:
            self.autoencoder.to(x.device)
        return self.autoencoder

    def to(self, device: torch.device | str) -> LatentCodec:
        self.autoencoder.to(device)
        return self

    @torch.no_grad()
    def posterior(self, images: Tensor) -> DiagonalGaussian:
        """q(z | x) of images (B, C, H, W) in [-1, 1] (unscaled latents)."""
        return self._follow(images).encode(images)

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """Posterior parameters (B, 2C, h, w) = mean and log-variance of q(z | x), unscaled: what the latent
        cache stores, so training can still draw z from the posterior (`encode_moments`)."""
        posterior = self.posterior(images)
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    @torch.no_grad()
    def scale(self, posterior: DiagonalGaussian, generator: torch.Generator | None = None,
              sample: bool = True) -> Tensor:  # fmt: skip
        """scale_factor * (a draw from, or the mean of) the posterior, float32 (B, C, h, w)."""
        z = posterior.sample(generator) if sample else posterior.mode()
        return z.float() * self.scale_factor

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> scaled latents float32 (B, c, h, w); `sample` draws from
        q(z | x) with `generator` (on the images' device), else takes its mean."""
        return self.scale(self.posterior(images), generator, sample)

    def encode_moments(self, moments: Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> Tensor:  # fmt: skip
        """Cached posterior moments (B, 2c, h, w) (see `moments`) -> scaled latents, as `encode`."""
        return self.scale(DiagonalGaussian(moments.float()), generator, sample)

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                     sample: bool = True) -> Tensor:  # fmt: skip
        """A DataModule batch -> scaled latents: from `batch["moments"]` (a latent-cache batch) when it has
        them, else by encoding `batch["image"]`."""
        if "moments" in batch:
            return self.encode_moments(batch["moments"], generator, sample)
        return self.encode(batch["image"], generator, sample)

    # --- latents -> images ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, c, h, w) -> images float32 (B, C, H, W), x = D(z / scale_factor) clamped to
        [-1, 1]; decoding runs in float32 whatever dtype z has."""
        return self._follow(z).decode(z.float() / self.scale_factor).float().clamp(-1.0, 1.0)

    def decode_uint8(self, z: Tensor) -> np.ndarray:
        """Scaled latents (B, c, h, w) -> uint8 images (B, H, W, C) (the samples.npz / PNG layout)."""
        return to_uint8_nhwc(self.decode(z))
