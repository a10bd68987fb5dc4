"""Latent U-Net with timestep scale-shift ResBlocks and cross-attention spatial transformers.

After CompVis latent-diffusion's ``UNetModel`` (Rombach et al. 2022, Sec. 3.3) and guided-diffusion's
ADM U-Net (Dhariwal & Nichol 2021, Sec. 3). The encoder half (input blocks + middle block) is its own
module, ``UNetEncoder``, which the noisy-latent classifier reuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_modules.nets.attention import SpatialTransformer
from lightning_modules.nets.blocks import (
    Downsample,
    RebuildableModule,
    ResBlock,
    TimestepEmbedder,
    TimestepEmbedSequential,
    Upsample,
    norm,
    zero_module,
)


@dataclass(frozen=True)
class BlockSpec:
    """Settings shared by every block of one network, so encoder and decoder build blocks alike."""

    emb_dim: int
    num_head_channels: int
    context_dim: int | None
    transformer_depth: int = 1
    dropout: float = 0.0
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True

    def resblock(self, in_channels: int, out_channels: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            in_channels,
            out_channels,
            self.emb_dim,
            dropout=self.dropout,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
            use_checkpoint=self.use_checkpoint,
        )

    def attention(self, channels: int) -> SpatialTransformer:
        if channels % self.num_head_channels:
            raise ValueError(
                f"channels {channels} are not divisible by num_head_channels {self.num_head_channels}"
            )
        return SpatialTransformer(
            channels,
            num_heads=channels // self.num_head_channels,
            head_dim=self.num_head_channels,
            context_dim=self.context_dim,
            depth=self.transformer_depth,
            dropout=self.dropout,
            use_checkpoint=self.use_checkpoint,
        )


class UNetEncoder(nn.Module):
    """Input blocks and middle block of the U-Net (everything before the skip-connected decoder).

    Level ``i`` runs ``num_res_blocks`` ResBlocks at ``model_channels * channel_mult[i]`` channels, each
    followed by a SpatialTransformer when the level's downsampling factor ``ds = 2**i`` is in
    ``attention_resolutions``; every level but the last ends with a downsampling. The middle block is
    ResBlock, SpatialTransformer, ResBlock.

    Args:
        in_channels: latent channels C.
        model_channels: base width.
        channel_mult: width multiplier per level.
        num_res_blocks: ResBlocks per level.
        attention_resolutions: downsampling factors ds (1, 2, 4, ...) that get attention.
        num_head_channels: channels per attention head (heads = channels // num_head_channels).
        context_dim: feature size of the conditioning tokens, or None (self-attention only).
        transformer_depth: transformer blocks per SpatialTransformer.
        dropout: dropout in ResBlocks and transformers.
        use_checkpoint: gradient checkpointing of every ResBlock and SpatialTransformer.
        use_scale_shift_norm: AdaGN timestep conditioning in the ResBlocks.
        resblock_updown: resample with ResBlocks (ADM) instead of strided conv (LDM).
        emb_dim: size of the timestep embedding it receives; default 4 * model_channels.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        context_dim: int | None,
        transformer_depth: int = 1,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        emb_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = BlockSpec(
            emb_dim=emb_dim or 4 * model_channels,
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            transformer_depth=transformer_depth,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
        )
        self.channel_mult = tuple(channel_mult)
        self.attention_resolutions = tuple(attention_resolutions)
        self.downsample_factor = 2 ** (len(self.channel_mult) - 1)

        ch = model_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [self.spec.resblock(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self.spec.attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = self.spec.resblock(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            self.spec.resblock(ch, ch), self.spec.attention(ch), self.spec.resblock(ch, ch)
        )
        self.out_channels = ch

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the input and middle blocks.

        Args:
            x: (B, C, H, W) with H, W divisible by ``downsample_factor``.
            emb: (B, E) timestep embedding.
            context: (B, L, D) conditioning tokens, or None.
            context_mask: (B, L) bool, True = attend to this token.

        Returns:
            h: (B, out_channels, H / downsample_factor, W / downsample_factor), the middle block output.
            skips: output of every input block, in order (channels ``skip_channels``).
        """
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        return self.middle_block(h, emb, context, context_mask), skips


class UNet(RebuildableModule):
    """Conditional latent U-Net predicting (B, out_channels, H, W) from z_t, t and context tokens.

    Args:
        in_channels, out_channels: latent channels in and out.
        model_channels, channel_mult, num_res_blocks, attention_resolutions, num_head_channels,
        context_dim, transformer_depth, dropout, use_checkpoint, use_scale_shift_norm,
        resblock_updown: see ``UNetEncoder``; the decoder mirrors the encoder.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_head_channels: int,
        context_dim: int | None,
        transformer_depth: int = 1,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
    ) -> None:
        super().__init__()
        self._record_hparams(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=[int(m) for m in channel_mult],
            num_res_blocks=num_res_blocks,
            attention_resolutions=[int(r) for r in attention_resolutions],
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            transformer_depth=transformer_depth,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
        )
        self.in_channels = in_channels
        self.context_dim = context_dim
        emb_dim = 4 * model_channels
        self.time_embed = TimestepEmbedder(model_channels, emb_dim)
        self.encoder = UNetEncoder(
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_head_channels,
            context_dim,
            transformer_depth=transformer_depth,
            dropout=dropout,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            emb_dim=emb_dim,
        )
        self.output_blocks = self._build_decoder(model_channels, num_res_blocks, resblock_updown)
        self.out = nn.Sequential(
            norm(model_channels * self.encoder.channel_mult[0]),
            nn.SiLU(),
            zero_module(nn.Conv2d(model_channels * self.encoder.channel_mult[0], out_channels, 3, padding=1)),
        )

    def _build_decoder(
        self, model_channels: int, num_res_blocks: int, resblock_updown: bool
    ) -> nn.ModuleList:
        """Mirror of the encoder: each level takes one more skip than the encoder level produced."""
        spec, skip_channels = self.encoder.spec, list(self.encoder.skip_channels)
        ch, ds = self.encoder.out_channels, self.encoder.downsample_factor
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.encoder.channel_mult))):
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [spec.resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in self.encoder.attention_resolutions:
                    layers.append(spec.attention(ch))
                if level and i == num_res_blocks:
                    layers.append(spec.resblock(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        return blocks

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict the diffusion target (e.g. epsilon) for noisy latents.

        Args:
            x: (B, in_channels, H, W) noisy latents, H and W divisible by 2**(len(channel_mult) - 1).
            t: (B,) timesteps, long or float (a 0-dim tensor is broadcast over the batch).
            context: (B, L, context_dim) conditioning tokens; required iff ``context_dim`` is set.
            context_mask: (B, L) bool, True = attend to this token; None attends to all.

        Returns:
            (B, out_channels, H, W).
        """
        t = self._check_inputs(x, t, context, context_mask)
        emb = self.time_embed(t)
        h, skips = self.encoder(x, emb, context, context_mask)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    def _check_inputs(
        self, x: Tensor, t: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        factor = self.encoder.downsample_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"latent shape {tuple(x.shape)}: H and W must be divisible by {factor} "
                f"(2**(len(channel_mult) - 1) with channel_mult={list(self.encoder.channel_mult)})"
            )
        batch = x.shape[0]
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"expected t of shape ({batch},), got {tuple(t.shape)}")
        self._check_context(batch, context, context_mask)
        return t

    def _check_context(self, batch: int, context: Tensor | None, context_mask: Tensor | None) -> None:
        if self.context_dim is None:
            if context is not None:
                raise ValueError("this UNet was built with context_dim=None but received context")
            return
        if context is None:
            raise ValueError(
                f"this UNet was built with context_dim={self.context_dim}; pass context (B, L, D)"
            )
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(
                f"expected context of shape ({batch}, L, {self.context_dim}), got {tuple(context.shape)}"
            )
        if context_mask is not None and (
            context_mask.shape != context.shape[:2] or context_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"expected a bool context_mask of shape {tuple(context.shape[:2])}, "
                f"got {context_mask.dtype} {tuple(context_mask.shape)}"
            )
