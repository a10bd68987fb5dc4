"""Time-conditioned noisy-latent classifier p(y | z_t, t) for classifier guidance.

ADM's classifier (Dhariwal & Nichol 2021, Sec. 4) is the U-Net's encoder half with an attention-pool
head; here it is literally the same ``UNetEncoder`` class the U-Net uses, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_modules.nets.attention import dot_product_attention
from lightning_modules.nets.blocks import RebuildableModule, TimestepEmbedder, norm
from lightning_modules.nets.unet import UNetEncoder


class AttentionPool2d(nn.Module):
    """Pool a feature map into one vector by attending from its mean to all positions (CLIP; ADM).

    The query is the spatial mean token, keys/values are the mean plus every position, all with a
    learned positional embedding (Radford et al. 2021, Sec. 2.4).

    Args:
        spacial_dim: side S of the (S, S) feature map.
        embed_dim: channels C.
        num_heads_channels: channels per head (heads = C // num_heads_channels).
        output_dim: size of the output vector.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int) -> None:
        super().__init__()
        if embed_dim % num_heads_channels:
            raise ValueError(
                f"embed_dim {embed_dim} is not divisible by num_heads_channels {num_heads_channels}"
            )
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, output_dim)."""
        x = x.flatten(2)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        q, k, v = (self._split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=1))
        # Only the mean token's output is kept, so only its query is computed.
        out = dot_product_attention(q[:, :, :1], k, v)
        return self.c_proj(out.transpose(-1, -2).flatten(1, 2))[:, :, 0]

    def _split_heads(self, t: Tensor) -> Tensor:
        """(B, heads*d, T) -> (B, heads, T, d), heads taking contiguous channel chunks as in ADM."""
        return t.unflatten(1, (self.num_heads, -1)).transpose(-1, -2)


class NoisyLatentClassifier(RebuildableModule):
    """Classifier of noisy latents: time embedding, U-Net encoder (no context), attention pool -> logits.

    Args:
        in_channels: latent channels C.
        num_classes: K.
        latent_size: latent side S (inputs are (B, C, S, S)).
        model_channels, channel_mult, num_res_blocks, attention_resolutions, num_head_channels,
        dropout, use_checkpoint, use_scale_shift_norm, resblock_updown: see ``UNetEncoder``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        latent_size: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
    ) -> None:
        super().__init__()
        self._record_hparams(
            in_channels=in_channels,
            num_classes=num_classes,
            latent_size=latent_size,
            model_channels=model_channels,
            channel_mult=[int(m) for m in channel_mult],
            num_res_blocks=num_res_blocks,
            attention_resolutions=[int(r) for r in attention_resolutions],
            num_head_channels=num_head_channels,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
        )
        self.in_channels = in_channels
        self.latent_size = latent_size
        emb_dim = 4 * model_channels
        self.time_embed = TimestepEmbedder(model_channels, emb_dim)
        self.encoder = UNetEncoder(
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_head_channels,
            context_dim=None,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            emb_dim=emb_dim,
        )
        factor = self.encoder.downsample_factor
        if latent_size % factor:
            raise ValueError(
                f"latent_size {latent_size} is not divisible by the downsampling factor {factor}"
            )
        ch = self.encoder.out_channels
        self.out = nn.Sequential(
            norm(ch), nn.SiLU(), AttentionPool2d(latent_size // factor, ch, num_head_channels, num_classes)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits of p(y | z_t, t).

        Args:
            x: (B, in_channels, latent_size, latent_size) noisy latents.
            t: (B,) timesteps (a 0-dim tensor is broadcast over the batch).

        Returns:
            (B, num_classes) logits.
        """
        expected = (self.in_channels, self.latent_size, self.latent_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"latent shape {tuple(x.shape)} does not match the classifier's "
                f"(B, in_channels={self.in_channels}, latent_size={self.latent_size}, {self.latent_size})"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h, _ = self.encoder(x, self.time_embed(t))
        return self.out(h)
