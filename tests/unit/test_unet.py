"""Latent U-Net, its blocks and the noisy-latent classifier.

References: the guided-diffusion formulas written out, naive attention, and diffusers' ResnetBlock2D /
Transformer2DModel (the same LDM blocks, independently implemented) with weights copied across.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_modules.interop.convert import _RESNET_UNET
from lightning_modules.nets.attention import CrossAttention, SpatialTransformer
from lightning_modules.nets.blocks import ResBlock, ada_group_norm, norm, timestep_embedding
from lightning_modules.nets.classifier import AttentionPool2d, NoisyLatentClassifier
from lightning_modules.nets.unet import UNet, UNetEncoder

UNET_KW = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(1, 2),
    num_head_channels=16,
    context_dim=24,
)
CLS_KW = dict(
    in_channels=4,
    num_classes=5,
    latent_size=8,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
    num_head_channels=16,
)


def _perturb_zero_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every all-zero parameter random values so every branch contributes to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _unet(seed: int = 0, **overrides) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{**UNET_KW, **overrides})


def _inputs(batch: int = 2, seed: int = 1, length: int = 5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, length, 24, generator=gen)
    return x, t, context


# ---------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_guided_diffusion_formula(dim: int) -> None:
    t = torch.tensor([0, 1, 17, 250, 999])
    half = dim // 2
    expected = np.zeros((len(t), dim))
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            expected[b, i] = math.cos(tb * freq)
            expected[b, half + i] = math.sin(tb * freq)
    got = timestep_embedding(t, dim)
    assert got.shape == (len(t), dim)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-4)


def test_timestep_embedding_matches_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 3.5, 500.0, 999.0])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), ref, atol=1e-6, rtol=0)


def test_norm_groups() -> None:
    assert [norm(c).num_groups for c in (4, 24, 48, 64, 320)] == [4, 24, 24, 32, 32]


def test_ada_group_norm_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 3, 3, generator=gen, dtype=torch.float64)
    scale, shift = torch.randn(2, 2, 8, 1, 1, generator=gen, dtype=torch.float64)
    layer = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
    groups = h.view(2, 4, 2 * 3 * 3)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)
    normed = ((groups - mean) / torch.sqrt(var + layer.eps)).view(2, 8, 3, 3)
    normed = normed * layer.weight[:, None, None] + layer.bias[:, None, None]
    expected = normed * (1 + scale) + shift
    torch.testing.assert_close(ada_group_norm(h, layer, scale, shift), expected)


@pytest.mark.parametrize(
    ("in_ch", "out_ch", "scale_shift", "up", "down"),
    [
        (16, 16, True, False, False),
        (16, 32, True, False, False),
        (16, 24, False, False, False),
        (16, 16, True, True, False),
        (32, 16, True, False, True),
    ],
)
def test_resblock_matches_diffusers(in_ch: int, out_ch: int, scale_shift: bool, up: bool, down: bool) -> None:
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ours = ResBlock(in_ch, out_ch, emb_dim=20, use_scale_shift_norm=scale_shift, up=up, down=down)
    _perturb_zero_init(ours)
    ref = ResnetBlock2D(
        in_channels=in_ch,
        out_channels=out_ch,
        temb_channels=20,
        groups=norm(in_ch).num_groups,
        groups_out=norm(out_ch).num_groups,
        eps=1e-5,
        up=up,
        down=down,
        time_embedding_norm="scale_shift" if scale_shift else "default",
    )
    state = {}  # the export converter's renames (lightning_modules/interop/convert.py), checked here block by block
    for key, value in ours.state_dict().items():
        module, param = key.rsplit(".", 1)
        state[f"{_RESNET_UNET[module]}.{param}"] = value
    ref.load_state_dict(state, strict=True)

    x, emb = torch.randn(2, in_ch, 8, 8), torch.randn(2, 20)
    expected_hw = 16 if up else 4 if down else 8
    out = ours(x, emb)
    assert out.shape == (2, out_ch, expected_hw, expected_hw)
    torch.testing.assert_close(out, ref(x, emb), atol=1e-5, rtol=1e-5)


def test_resblock_starts_as_skip() -> None:
    block = ResBlock(16, 32, emb_dim=8)
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(block(x, torch.randn(2, 8)), block.skip_connection(x))


def _naive_attention(attn: CrossAttention, x, context, mask):
    """softmax(Q K^T / sqrt(d) + mask) V, heads written out, on top of the module's own weights."""
    q, k, v = x @ attn.to_q.weight.T, context @ attn.to_k.weight.T, context @ attn.to_v.weight.T
    heads, d = attn.heads, q.shape[-1] // attn.heads
    out = []
    for head in range(heads):
        sl = slice(head * d, (head + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        out.append(torch.softmax(scores, dim=-1) @ v[..., sl])
    return torch.cat(out, dim=-1) @ attn.to_out[0].weight.T + attn.to_out[0].bias


def test_cross_attention_matches_naive_with_mask() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=12, context_dim=10, heads=3, dim_head=4).double()
    x, context = torch.randn(2, 7, 12, dtype=torch.float64), torch.randn(2, 5, 10, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False], [True, False, False, False, False]])
    torch.testing.assert_close(attn(x, context, mask), _naive_attention(attn, x, context, mask))
    full = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(attn(x, context), _naive_attention(attn, x, context, full))


def test_cross_attention_fully_masked_row_contributes_zero() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(query_dim=8, context_dim=6, heads=2, dim_head=4)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = attn(torch.randn(2, 4, 8), torch.randn(2, 3, 6), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], attn.to_out[0].bias.expand(4, 8))


@pytest.mark.parametrize("context_dim", [10, None])
def test_spatial_transformer_matches_diffusers(context_dim: int | None) -> None:
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    ours = _perturb_zero_init(
        SpatialTransformer(32, num_heads=2, head_dim=8, context_dim=context_dim, depth=2)
    )
    ref = Transformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=32,
        num_layers=2,
        norm_num_groups=norm(32).num_groups,
        cross_attention_dim=context_dim,
        double_self_attention=context_dim is None,
    )
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 32, 4, 4)
    if context_dim is None:
        torch.testing.assert_close(ours(x), ref(x, return_dict=False)[0], atol=1e-5, rtol=1e-5)
        return
    context = torch.randn(2, 5, context_dim)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, False, True]])
    expected = ref(x, encoder_hidden_states=context, encoder_attention_mask=mask.float(), return_dict=False)[
        0
    ]
    torch.testing.assert_close(ours(x, context, mask), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ U-Net


def test_unet_output_shape_and_zero_init() -> None:
    model = _unet()
    x, t, context = _inputs(batch=3)
    out = model(x, t, context)
    assert out.shape == (3, 4, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_unet_gradient_reaches_every_parameter() -> None:
    model = _perturb_zero_init(_unet())
    x, t, context = _inputs()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(x, t, context, mask)
    (out * torch.randn_like(out)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"


def test_unet_context_mask_is_respected() -> None:
    model = _perturb_zero_init(_unet()).eval()
    x, t, context = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    with torch.no_grad():
        out = model(x, t, context, mask)
        changed_masked = context.clone()
        changed_masked[~mask] = 10 * torch.randn(int((~mask).sum()), 24)
        torch.testing.assert_close(model(x, t, changed_masked, mask), out, atol=1e-6, rtol=0)
        changed_kept = context.clone()
        changed_kept[:, 0] += 1.0
        assert not torch.allclose(model(x, t, changed_kept, mask), out, atol=1e-4)


@pytest.mark.parametrize("length", [1, 3])
def test_unet_all_true_mask_equals_no_mask_bitwise(length: int) -> None:
    """The class conditioner passes no mask (None) instead of an all-True one so that SDPA on CUDA may run
    flash attention: outputs and gradients must be the same bits either way (float32, CPU)."""
    model = _perturb_zero_init(_unet())
    x, t, context = _inputs(length=length)
    full = torch.ones(2, length, dtype=torch.bool)
    outs, grads = [], []
    for mask in (full, None):
        model.zero_grad(set_to_none=True)
        out = model(x, t, context, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_unet_checkpointing_matches_plain() -> None:
    plain = _perturb_zero_init(_unet())
    ckpt = _unet(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = _inputs()
    weights = torch.randn(2, 4, 8, 8)
    outs = []
    for model in (plain, ckpt):
        out = model(x, t, context)
        (out * weights).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_plain.grad, p_ckpt.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_unet_resblock_updown_and_no_context() -> None:
    model = _perturb_zero_init(_unet(context_dim=None, resblock_updown=True, channel_mult=(1, 2, 2)))
    x, t, _ = _inputs()
    assert model(x, t).shape == (2, 4, 8, 8)
    assert model(x, torch.tensor(10)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="context_dim=None"):
        model(x, t, torch.randn(2, 3, 24))


def test_unet_hparams_rebuild() -> None:
    model = _perturb_zero_init(_unet())
    hparams = model.hparams()
    json.dumps(hparams)
    rebuilt = UNet(**hparams)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, t, context = _inputs()
    torch.testing.assert_close(rebuilt(x, t, context), model(x, t, context))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_unet_input_errors() -> None:
    model = _unet(channel_mult=(1, 2, 2))
    _, t, context = _inputs()
    with pytest.raises(ValueError, match=r"\(2, 4, 8, 6\).*divisible by 4"):
        model(torch.randn(2, 4, 8, 6), t, context)
    with pytest.raises(ValueError, match="pass context"):
        model(torch.randn(2, 4, 8, 8), t)
    with pytest.raises(ValueError, match="context of shape"):
        model(torch.randn(2, 4, 8, 8), t, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="bool context_mask"):
        model(torch.randn(2, 4, 8, 8), t, context, torch.ones(2, 5))


# ------------------------------------------------------------------------------------- classifier


def _guided_diffusion_attention_pool(pool: AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    """guided-diffusion AttentionPool2d + QKVAttention, written out with its einsums."""
    b, c = x.shape[:2]
    x = x.reshape(b, c, -1)
    x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + pool.positional_embedding[None]
    qkv = pool.qkv_proj(x)
    length, heads = qkv.shape[-1], pool.num_heads
    ch = qkv.shape[1] // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum(
        "bct,bcs->bts", (q * scale).reshape(b * heads, ch, length), (k * scale).reshape(b * heads, ch, length)
    )
    a = torch.einsum("bts,bcs->bct", torch.softmax(weight, dim=-1), v.reshape(b * heads, ch, length))
    return pool.c_proj(a.reshape(b, -1, length))[:, :, 0]


def test_attention_pool_matches_guided_diffusion() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=16, num_heads_channels=4, output_dim=7).double()
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    out = pool(x)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, _guided_diffusion_attention_pool(pool, x))


def test_classifier_logits_and_gradients() -> None:
    torch.manual_seed(0)
    clf = _perturb_zero_init(NoisyLatentClassifier(**CLS_KW))
    x, t, _ = _inputs(batch=3)
    logits = clf(x, t)
    assert logits.shape == (3, 5)
    (logits * torch.randn_like(logits)).sum().backward()
    missing = [n for n, p in clf.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"


def test_classifier_shares_unet_blocks() -> None:
    clf = NoisyLatentClassifier(**CLS_KW)
    unet = _unet()
    assert isinstance(clf.encoder, UNetEncoder) and type(clf.encoder) is type(unet.encoder)
    clf_blocks = {type(m) for m in clf.encoder.modules()}
    assert clf_blocks <= {type(m) for m in unet.encoder.modules()}
    assert {ResBlock, SpatialTransformer} <= clf_blocks
    assert type(clf.time_embed) is type(unet.time_embed)


def test_classifier_shape_errors_and_rebuild() -> None:
    clf = NoisyLatentClassifier(**CLS_KW)
    with pytest.raises(ValueError, match=r"\(2, 4, 16, 16\).*latent_size=8"):
        clf(torch.randn(2, 4, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\).*in_channels=4"):
        clf(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="latent_size 6"):
        NoisyLatentClassifier(**{**CLS_KW, "latent_size": 6, "channel_mult": (1, 2, 2)})
    rebuilt = NoisyLatentClassifier(**clf.hparams())
    rebuilt.load_state_dict(clf.state_dict(), strict=True)
    x, t, _ = _inputs()
    torch.testing.assert_close(rebuilt(x, t), clf(x, t))


@pytest.mark.parametrize("lq,lk", [(16, 16), (4, 1), (64, 64), (80, 80)])  # the last one is SDPA's
@pytest.mark.parametrize("masked", [False, True])
def test_dot_product_attention_equals_sdpa(lq, lk, masked):
    """`dot_product_attention`'s explicit CPU path (and SDPA beyond its size limit) equals SDPA in float64,
    with a key mask; and in bf16 it stays within bf16 rounding of the float64 result."""
    import torch.nn.functional as F

    from lightning_modules.nets.attention import CPU_EXPLICIT_MAX_SCORES, dot_product_attention

    g = torch.Generator().manual_seed(lq * 100 + lk)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    mask = torch.rand(3, 1, 1, lk, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every row attends to something (CrossAttention handles empty rows itself)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(dot_product_attention(q, k, v, mask), ref, rtol=1e-12, atol=1e-12)
    low = dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert low.dtype == torch.bfloat16 and (low.double() - ref).abs().max() < 0.05
    assert (lq * lk <= CPU_EXPLICIT_MAX_SCORES) == (lq <= 64)
