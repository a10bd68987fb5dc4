"""Shared building blocks of the latent U-Net and the noisy-latent classifier.

After guided-diffusion's ``unet.py`` (Dhariwal & Nichol 2021) and CompVis latent-diffusion's
``openaimodel.py`` (Rombach et al. 2022). Both networks are assembled from these blocks only, so a
fix here reaches both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal timestep features (Vaswani et al. 2017 Sec. 3.5; guided-diffusion's ordering).

    ``emb[b, i] = cos(t_b * f_i)`` and ``emb[b, half + i] = sin(t_b * f_i)`` with
    ``f_i = max_period ** (-i / half)``, ``half = dim // 2``; an odd ``dim`` gets a zero last column.

    Args:
        t: (B,) timesteps, integer or fractional.
        dim: output feature size D.
        max_period: controls the lowest frequency.

    Returns:
        (B, D) float32 embedding.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or the largest divisor of ``channels`` below 32 for narrow layers."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters so a residual branch starts as the identity (guided-diffusion ``zero_module``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpoint(function: Callable[..., Tensor], *args: Any, enabled: bool) -> Tensor:
    """Run ``function(*args)``, recomputing activations in the backward pass when ``enabled``.

    Trades compute for memory (Chen et al. 2016); non-reentrant so it composes with DDP and
    inputs that need no grad.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def ada_group_norm(h: Tensor, norm_layer: nn.GroupNorm, scale: Tensor, shift: Tensor) -> Tensor:
    """Adaptive group normalisation, AdaGN(h, y) = y_s GroupNorm(h) + y_b (Dhariwal & Nichol 2021, Sec. 3).

    Written ``norm(h) * (1 + scale) + shift`` so a zero embedding projection leaves plain GroupNorm.

    Args:
        h: (B, C, H, W) features.
        norm_layer: GroupNorm over C.
        scale, shift: (B, C, 1, 1) from the timestep embedding.
    """
    return norm_layer(h) * (1 + scale) + shift


class TimestepBlock(nn.Module):
    """A layer that takes the timestep embedding: ``forward(x, emb)``."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ContextBlock(nn.Module):
    """A layer that takes conditioning tokens: ``forward(x, context, context_mask)``."""

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands each layer the extra inputs its kind needs (LDM ``openaimodel.py``)."""

    def forward(  # type: ignore[override]
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, C, H, W), emb: (B, E), context: (B, L, D), context_mask: (B, L) bool (True = keep)."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, ContextBlock):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a two-layer SiLU MLP (guided-diffusion ``time_embed``).

    Args:
        model_channels: size of the sinusoidal features.
        emb_dim: output size E (4 x model_channels in LDM and ADM).
    """

    def __init__(self, model_channels: int, emb_dim: int) -> None:
        super().__init__()
        self.model_channels = model_channels
        self.mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: Tensor) -> Tensor:
        """t: (B,) -> (B, E)."""
        features = timestep_embedding(t, self.model_channels)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv, or 2x2 average pooling when ``use_conv`` is False."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Downsample without conv cannot change the channel count")
        self.op = (
            nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
            if use_conv
            else nn.AvgPool2d(2, stride=2)
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))."""
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation, followed by a 3x3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C_out, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning, optionally resampling (guided-diffusion ``ResBlock``).

    ``out = skip(x) + conv(drop(SiLU(AdaGN(conv(SiLU(GN(x))), emb))))``; the last conv starts at zero so
    the block starts as the (resampled, projected) identity.

    Args:
        in_channels, out_channels: C_in, C_out.
        emb_dim: size E of the timestep embedding.
        dropout: dropout before the last conv.
        use_scale_shift_norm: AdaGN scale-shift (True, ADM) or add the embedding to h (False, DDPM).
        up, down: resample H and W by 2 inside the block (BigGAN-style, ADM's ``resblock_updown``).
        use_checkpoint: gradient checkpointing of this block.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        if up:
            self.resample: nn.Module = Upsample(in_channels, use_conv=False)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False)
        else:
            self.resample = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H', W') with H' = 2H, H/2 or H."""
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Resample between the activation and the conv, as ADM does, so the conv runs at the new size.
        h = self.in_layers[:-1](x)
        h = self.in_layers[-1](self.resample(h))
        x = self.resample(x)
        emb_out = self.emb_layers(emb)[..., None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](ada_group_norm(h, self.out_layers[0], scale, shift))
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class RebuildableModule(nn.Module):
    """A network that records its constructor arguments so a checkpoint can rebuild it without a config."""

    _hparams: dict[str, Any]

    def _record_hparams(self, **hparams: Any) -> None:
        self._hparams = hparams

    def hparams(self) -> dict[str, Any]:
        """Constructor keyword arguments: ``type(self)(**self.hparams())`` builds the same architecture."""
        return copy.deepcopy(self._hparams)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar parameters (only those with ``requires_grad`` when ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
