"""KL-regularised convolutional autoencoder (the first stage of latent diffusion).

Architecture after CompVis latent-diffusion (`ldm/modules/diffusionmodules/model.py` Encoder/Decoder,
`ldm/modules/distributions/distributions.py`), Rombach et al. 2022 section 3.1: ResNet blocks with
GroupNorm + SiLU, one self-attention block in the middle, downsampling factor f = 2 ** (len(ch_mult) - 1).
Per-resolution attention is left out: at the small f used here it costs much and the mid block suffices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.nets.attention import dot_product_attention

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
MAX_NORM_GROUPS = 32


def norm_groups(channels: int, max_groups: int = MAX_NORM_GROUPS) -> int:
    """Number of GroupNorm groups for `channels`: LDM's 32 where possible, fewer for narrow layers.

    Picks the largest divisor of `channels` that is at most `max_groups` and leaves at least two channels
    per group, so that statistics are never taken over a single channel (narrow test-size networks).
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(channels: int, num_groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with `num_groups` groups (None: `norm_groups(channels)`); eps 1e-6 as LDM's `Normalize`."""
    groups = norm_groups(channels) if num_groups is None else num_groups
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def check_norm_num_groups(norm_num_groups: int | None, ch: int) -> None:
    """Raise ValueError unless `norm_num_groups` is None or a positive int dividing the base width `ch` (then it
    divides every GroupNorm width: they are ch and its multiples ch * ch_mult[i])."""
    if norm_num_groups is None:
        return
    key = "model.autoencoder.norm_num_groups"
    if isinstance(norm_num_groups, bool) or not isinstance(norm_num_groups, int) or norm_num_groups < 1:
        raise ValueError(
            f"norm_num_groups={norm_num_groups!r} ({key}): expected a positive integer, or null for the "
            "per-width rule"
        )
    if ch % norm_num_groups:
        raise ValueError(
            f"norm_num_groups={norm_num_groups} ({key}) does not divide the width {ch} (ch, the encoder's first "
            "and the decoder's last GroupNorm width; the others are its multiples ch * ch_mult[i]): choose a "
            f"divisor of {ch}, or null for the per-width rule"
        )


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W): two (norm, SiLU, 3x3 conv) layers plus a skip connection."""

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_num_groups: int | None = None
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, (B, C, H, W) -> (B, C, H, W).

    Uses `dot_product_attention` (SDPA, or explicit products with a float32 softmax at small sizes on CPU):
    the softmax stays in float32 under fp16/bf16 autocast (LDM's explicit bmm/softmax overflows in fp16).
    """

    def __init__(self, channels: int, norm_num_groups: int | None = None) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(dim=1)
        out = dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, (B, C, H, W) -> (B, C, H/2, W/2); asymmetric pad as LDM so H/2 is exact."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv, (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(channels: int, attn: bool, dropout: float, groups: int | None) -> nn.Sequential:
    return nn.Sequential(
        ResnetBlock(channels, channels, dropout, groups),
        AttnBlock(channels, groups) if attn else nn.Identity(),
        ResnetBlock(channels, channels, dropout, groups),
    )


def _out_head(in_channels: int, out_channels: int, groups: int | None) -> nn.Sequential:
    return nn.Sequential(
        group_norm(in_channels, groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
    )


class Encoder(nn.Module):
    """Image (B, C_in, H, W) -> posterior parameters (B, 2 * z_channels, H / f, W / f), mean then logvar.

    Args:
        in_channels: image channels.
        ch: base width; level i has ch * ch_mult[i] channels.
        ch_mult: width multipliers, one per resolution level; f = 2 ** (len(ch_mult) - 1).
        num_res_blocks: ResNet blocks per level.
        z_channels: latent channels.
        attn_mid: self-attention in the middle block.
        dropout: dropout inside ResNet blocks.
        norm_num_groups: GroupNorm groups of every layer; None: `norm_groups` of each width (LDM's 32 where
            the width allows). One count for all layers is what diffusers' AutoencoderKL can represent.
    """

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        attn_mid: bool = True,
        dropout: float = 0.0,
        norm_num_groups: int | None = None,
    ) -> None:
        super().__init__()
        check_norm_num_groups(norm_num_groups, ch)
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        block_in = ch
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(block_in, width, dropout, norm_num_groups))
                block_in = width
            if level != len(widths) - 1:
                layers.append(Downsample(block_in))
        self.down = nn.Sequential(*layers)
        self.mid = _mid_block(block_in, attn_mid, dropout, norm_num_groups)
        self.out = _out_head(block_in, 2 * z_channels, norm_num_groups)
        # LDM's `quant_conv`: a 1x1 mixing of mean and logvar channels.
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.out(self.mid(self.down(self.conv_in(x)))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, C_out, h * f, w * f); mirror of `Encoder`."""

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        attn_mid: bool = True,
        dropout: float = 0.0,
        norm_num_groups: int | None = None,
    ) -> None:
        super().__init__()
        check_norm_num_groups(norm_num_groups, ch)
        widths = [ch * m for m in ch_mult]
        block_in = widths[-1]
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid_block(block_in, attn_mid, dropout, norm_num_groups)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            # num_res_blocks + 1 per level, as LDM's decoder (inherited from the DDPM U-Net's up path).
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(block_in, widths[level], dropout, norm_num_groups))
                block_in = widths[level]
            if level != 0:
                layers.append(Upsample(block_in))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(self.post_quant_conv(z))))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))).

    Args:
        parameters: (B, 2C, h, w), mean in the first C channels, log-variance in the last C.
            The log-variance is clamped to [-30, 20] as LDM, so exp() never overflows.
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw mean + std * eps, (B, C, h, w) (Kingma & Welling 2014 eq. 10)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed per sample, (B,), in float32.

        Kingma & Welling 2014 appendix B: KL = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2).
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) summed per sample, (B,), in float32; x: (B, C, h, w)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        sq = (x.float() - mean).square() / logvar.exp()
        return 0.5 * (math.log(2.0 * math.pi) + logvar + sq).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    Args:
        in_channels: image channels C.
        out_channels: decoded channels; defaults to `in_channels`.
        ch, ch_mult, num_res_blocks, attn_mid, dropout, norm_num_groups: see `Encoder`.
        z_channels: latent channels; latents are (B, z_channels, H / f, W / f).

    `hparams()` holds `norm_num_groups` only when it is set, so the checkpoints of the per-width rule are
    what they were before the option existed (and load without it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 4,
        attn_mid: bool = True,
        dropout: float = 0.0,
        norm_num_groups: int | None = None,
    ) -> None:
        super().__init__()
        check_norm_num_groups(norm_num_groups, ch)
        self._hparams = {
            "in_channels": in_channels,
            "out_channels": in_channels if out_channels is None else out_channels,
            "ch": ch,
            "ch_mult": [int(m) for m in ch_mult],
            "num_res_blocks": num_res_blocks,
            "z_channels": z_channels,
            "attn_mid": attn_mid,
            "dropout": dropout,
        }
        if norm_num_groups is not None:
            self._hparams["norm_num_groups"] = norm_num_groups
        self.in_channels = in_channels
        self.z_channels = z_channels
        shared = {
            "ch": ch,
            "ch_mult": tuple(ch_mult),
            "num_res_blocks": num_res_blocks,
            "z_channels": z_channels,
            "attn_mid": attn_mid,
            "dropout": dropout,
            "norm_num_groups": norm_num_groups,
        }
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_channels=self._hparams["out_channels"], **shared)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self._hparams["ch_mult"]) - 1)

    def latent_shape(self, image_size: int) -> list[int]:
        """[z_channels, h, w] of the latents of square images of `image_size` (h = w = image_size / f)."""
        f = self.downsample_factor
        return [self.z_channels, int(image_size) // f, int(image_size) // f]

    @property
    def last_layer(self) -> nn.Parameter:
        """Weight of the decoder's final conv: the layer the adaptive GAN weight differentiates against."""
        return self.decoder.conv_out.weight

    def hparams(self) -> dict:
        """Constructor arguments, so a checkpoint can rebuild the autoencoder without a config."""
        return dict(self._hparams)

    def validate_input_shape(self, channels: int, height: int, width: int) -> None:
        """Raise ValueError unless an image (C, H, W) fits: C == in_channels, H and W divisible by f."""
        f = self.downsample_factor
        if channels != self.in_channels:
            raise ValueError(f"autoencoder expects {self.in_channels} input channels, got {channels}")
        if height % f or width % f:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor f={f} "
                f"(ch_mult={self._hparams['ch_mult']}); resize or pad the images, or change ch_mult"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, C, H, W) in [-1, 1] -> posterior over (B, z_channels, H / f, W / f)."""
        self.validate_input_shape(*x.shape[1:])
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, h, w) -> (B, C_out, h * f, w * f)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """x: (B, C, H, W) -> (reconstruction (B, C_out, H, W), posterior)."""
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
