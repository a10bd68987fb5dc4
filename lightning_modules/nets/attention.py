"""Self- and cross-attention blocks of the latent U-Net (CompVis latent-diffusion ``attention.py``).

Module and parameter names follow LDM (and hence diffusers' ``Transformer2DModel``), so weights map
one to one between the three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.nets.blocks import ContextBlock, checkpoint, norm, zero_module

# Query x key tokens up to which CPU attention is computed as explicit products (`dot_product_attention`).
CPU_EXPLICIT_MAX_SCORES = 64 * 64


def dot_product_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (..., L, d) queries and (..., S, d) keys/values; `attn_mask` a bool
    mask broadcastable to (..., L, S), True = attend.

    `F.scaled_dot_product_attention` everywhere except on CPU at L*S <= CPU_EXPLICIT_MAX_SCORES: there the
    two matmuls with the softmax in float32, which PyTorch's CPU flash kernel loses to at the demo's shapes
    (forward + backward, 2 cores: 1.2 vs 8.9 ms in bf16 and 3.5 vs 3.4 ms in float32 at 16 x 16 tokens,
    4.0 vs 21.3 ms in bf16 at 64 x 64; bench/cpu_steps.py measures the stages). The score matrix is small
    there, so the memory a fused kernel saves does not matter; longer sequences keep SDPA. The softmax runs
    in float32 under autocast as in the fused kernels (LDM's explicit bmm/softmax overflows in fp16)."""
    if q.device.type != "cpu" or q.shape[-2] * k.shape[-2] > CPU_EXPLICIT_MAX_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class CrossAttention(nn.Module):
    """Multi-head scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, Eq. 1).

    Queries come from ``x``; keys and values from ``context``, or from ``x`` itself when no context is
    given (self-attention).

    Args:
        query_dim: feature size of x.
        context_dim: feature size of context; None for self-attention.
        heads: number of heads h.
        dim_head: size d of each head.
        dropout: dropout on the output projection.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Attend from x to context.

        Args:
            x: (B, N, query_dim).
            context: (B, L, context_dim), or None to attend to x.
            mask: (B, L) bool key-padding mask, True = attend to this token. A row without any True
                token attends to nothing and contributes zero.

        Returns:
            (B, N, query_dim).
        """
        context = x if context is None else context
        q, k, v = (
            self._split_heads(proj(inp))
            for proj, inp in ((self.to_q, x), (self.to_k, context), (self.to_v, context))
        )
        attn_mask = None
        if mask is not None:
            has_key = mask.any(dim=-1, keepdim=True)
            # A fully masked row would softmax over -inf only (NaN); open it, then zero its output.
            attn_mask = (mask | ~has_key)[:, None, None, :]
        out = dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).flatten(2)
        if mask is not None:
            out = out * has_key[:, :, None].to(out.dtype)
        return self.to_out(out)

    def _split_heads(self, t: Tensor) -> Tensor:
        """(B, T, h*d) -> (B, h, T, d)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class GEGLU(nn.Module):
    """GELU-gated linear unit, x W * GELU(x V) (Shazeer 2020, Eq. 5)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP with a GEGLU hidden layer of width ``mult * dim``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention, GEGLU feed-forward.

    Without ``context_dim`` the second attention is a second self-attention (as in LDM).

    Args:
        dim: token feature size.
        n_heads, d_head: heads and head size.
        dropout: dropout of attention outputs and feed-forward.
        context_dim: feature size of the conditioning tokens, or None.
    """

    def __init__(
        self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.has_context = context_dim is not None

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim), context: (B, L, context_dim), context_mask: (B, L) bool -> (B, N, dim)."""
        if not self.has_context:
            context, context_mask = None, None
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """Transformer over the H*W positions of a feature map, with a residual around it (LDM).

    GroupNorm, 1x1 projection in, ``depth`` transformer blocks, zero-initialised projection out, so the
    block starts as the identity.

    Args:
        channels: C of the feature map.
        num_heads, head_dim: attention heads and their size; inner width = num_heads * head_dim.
        context_dim: feature size of the conditioning tokens, or None for self-attention only.
        depth: number of transformer blocks.
        dropout: dropout inside the transformer blocks.
        use_linear: project with Linear layers on tokens instead of 1x1 convs (equivalent maps).
        use_checkpoint: gradient checkpointing of this block.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        context_dim: int | None,
        depth: int = 1,
        dropout: float = 0.0,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear = use_linear
        self.use_checkpoint = use_checkpoint
        self.norm = norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner_dim) if use_linear else nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, num_heads, head_dim, dropout, context_dim) for _ in range(depth)
        )
        self.proj_out = zero_module(
            nn.Linear(inner_dim, channels) if use_linear else nn.Conv2d(inner_dim, channels, 1)
        )

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim), context_mask: (B, L) bool -> (B, C, H, W)."""
        return checkpoint(self._forward, x, context, context_mask, enabled=self.use_checkpoint)

    def _forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        height, width = x.shape[-2:]
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).unflatten(2, (height, width))
        if not self.use_linear:
            h = self.proj_out(h)
        return x + h
