"""KL autoencoder, diagonal Gaussian posterior and PatchGAN discriminator (tiny sizes, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from lightning_modules.nets.autoencoder import AutoencoderKL, DiagonalGaussian, norm_groups
from lightning_modules.nets.discriminator import PatchDiscriminator


def tiny_ae(ch_mult=(1, 2), **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    args = {"in_channels": 3, "ch": 16, "ch_mult": ch_mult, "num_res_blocks": 1, "z_channels": 4}
    return AutoencoderKL(**(args | kw))


def gaussian(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))


# ---- DiagonalGaussian ---------------------------------------------------------------------------


def test_kl_closed_form_by_hand():
    # mu = 1, sigma^2 = e: per element 0.5 * (1 + e - 1 - 1) = 0.5 * (e - 1); 2 x 3 x 3 elements.
    dist = gaussian(torch.ones(2, 2, 3, 3), torch.ones(2, 2, 3, 3))
    expected = 18 * 0.5 * (math.e - 1.0)
    torch.testing.assert_close(dist.kl(), torch.full((2,), expected))
    # The standard normal has zero KL to itself.
    torch.testing.assert_close(
        gaussian(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).kl(), torch.zeros(1)
    )


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 5, 5, generator=gen)
    logvar = torch.randn(3, 4, 5, 5, generator=gen)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian(mean, logvar).kl(), ref)


def test_nll_matches_torch_distributions():
    gen = torch.Generator().manual_seed(2)
    mean, logvar, x = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    ref = -Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian(mean, logvar).nll(x), ref)


def test_logvar_clamped_as_ldm():
    dist = gaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[50.0, -50.0]]]]))
    assert dist.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(dist.var).all()


def test_sample_statistics_and_generator():
    mean = torch.full((1, 2, 100, 100), 0.5)
    dist = gaussian(mean, torch.full_like(mean, math.log(4.0)))
    z = dist.sample(torch.Generator().manual_seed(3))
    # 20,000 draws: the standard error of the mean is 2 / sqrt(2e4) ~ 0.014.
    assert abs(z.mean().item() - 0.5) < 0.06
    assert abs(z.std().item() - 2.0) < 0.05
    torch.testing.assert_close(z, dist.sample(torch.Generator().manual_seed(3)))
    assert torch.equal(dist.mode(), mean)


# ---- AutoencoderKL --------------------------------------------------------------------------------


@pytest.mark.parametrize("ch_mult, f", [((1, 2), 2), ((1, 2, 2), 4)])
def test_encode_decode_shapes(ch_mult, f):
    ae = tiny_ae(ch_mult)
    assert ae.downsample_factor == f
    x = torch.randn(2, 3, 16, 16)
    posterior = ae.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 16 // f, 16 // f)
    assert ae.decode(posterior.sample()).shape == (2, 3, 16, 16)
    recon, post = ae(x, sample_posterior=False)
    assert recon.shape == x.shape
    torch.testing.assert_close(recon, ae.decode(post.mean))


def test_out_channels_and_no_attention():
    ae = tiny_ae(in_channels=1, out_channels=2, attn_mid=False)
    assert ae(torch.randn(1, 1, 8, 8))[0].shape == (1, 2, 8, 8)


@pytest.mark.parametrize(
    "shape, fragment",
    [((1, 3, 18, 16), "18x16"), ((1, 3, 16, 14), "16x14"), ((1, 1, 16, 16), "3 input channels, got 1")],
)
def test_shape_validation_errors(shape, fragment):
    ae = tiny_ae((1, 2, 2))
    with pytest.raises(ValueError, match=fragment) as err:
        ae.encode(torch.randn(shape))
    if "x" in fragment:
        assert "f=4" in str(err.value)
    ae.validate_input_shape(3, 16, 32)  # fits: no error


def test_hparams_rebuild_same_function():
    ae = tiny_ae(dropout=0.0)
    clone = AutoencoderKL(**ae.hparams())
    clone.load_state_dict(ae.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x, sample_posterior=False)[0], ae(x, sample_posterior=False)[0])
    assert ae.hparams()["out_channels"] == 3 and ae.hparams()["ch_mult"] == [1, 2]


def test_last_layer_is_decoder_output_conv_and_gets_gradients():
    ae = tiny_ae()
    assert ae.last_layer is ae.decoder.conv_out.weight
    recon, _ = ae(torch.randn(1, 3, 8, 8))
    recon.square().mean().backward()
    assert ae.last_layer.grad is not None and ae.last_layer.grad.abs().sum() > 0


@pytest.mark.parametrize("channels, groups", [(16, 8), (32, 16), (64, 32), (128, 32), (48, 24), (3, 1)])
def test_norm_groups(channels, groups):
    assert norm_groups(channels) == groups


KL_F4 = {"in_channels": 1, "ch": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "z_channels": 4}  # the demo's


def _groups(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.num_groups, m.num_channels) for m in module.modules() if isinstance(m, nn.GroupNorm)]


def test_norm_num_groups_null_is_the_per_width_rule_and_leaves_the_checkpoint_as_before():
    """null (the default): each GroupNorm gets norm_groups(width) as before the option existed (8/16/32 for the
    demo's 16/32/64), hparams() has exactly the keys it had, so checkpoints are what they were."""
    ae = AutoencoderKL(**KL_F4, norm_num_groups=None)
    assert {g for g, _ in _groups(ae)} == {8, 16, 32}
    assert all(g == norm_groups(c) for g, c in _groups(ae))
    assert list(ae.hparams()) == ["in_channels", "out_channels", "ch", "ch_mult", "num_res_blocks", "z_channels",
                                  "attn_mid", "dropout"]  # fmt: skip
    assert _groups(AutoencoderKL(**ae.hparams())) == _groups(ae)  # a checkpoint without the key loads as before


def test_norm_num_groups_sets_every_group_norm_and_keeps_the_state_dict_layout():
    torch.manual_seed(0)
    per_width = AutoencoderKL(**KL_F4)
    torch.manual_seed(0)
    uniform = AutoencoderKL(**KL_F4, norm_num_groups=8)
    assert {g for g, _ in _groups(uniform)} == {8} and len(_groups(uniform)) == len(_groups(per_width))
    assert uniform.hparams()["norm_num_groups"] == 8
    rebuilt = AutoencoderKL(**uniform.hparams())  # what a checkpoint's loader does
    assert _groups(rebuilt) == _groups(uniform)
    # Same parameters (GroupNorm's affine weights do not depend on the group count), another function.
    a, b = per_width.state_dict(), uniform.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(per_width.encode(x).mean, uniform.encode(x).mean)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"ch": 12, "norm_num_groups": 8}, r"norm_num_groups=8 \(model\.autoencoder\.norm_num_groups\) does not "
                                           r"divide the width 12 \(ch,.*divisor of 12"),
        ({"ch_mult": [1, 3, 4], "norm_num_groups": 32}, r"does not divide the width 16 \(ch,"),
        ({"norm_num_groups": 0}, r"norm_num_groups=0 \(model\.autoencoder\.norm_num_groups\): expected a positive"),
        ({"norm_num_groups": True}, r"norm_num_groups=True .*expected a positive integer"),
    ],
)  # fmt: skip
def test_norm_num_groups_that_does_not_fit_the_widths_is_refused_by_name(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        AutoencoderKL(**(KL_F4 | kw))


# ---- PatchDiscriminator ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_discriminator_shapes_and_norms(norm):
    disc = PatchDiscriminator(in_channels=3, ndf=8, n_layers=2, norm=norm)
    out = disc(torch.randn(2, 3, 16, 16))
    # floor(16 / 2^2) - 2 = 2.
    assert out.shape == (2, 1, 2, 2)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
    has_gn = any(isinstance(m, nn.GroupNorm) for m in disc.modules())
    assert (has_bn, has_gn) == (norm == "batch", norm == "group")
    if norm != "batch":
        assert not list(disc.buffers()), "no running statistics that could diverge across DDP ranks"


def test_discriminator_three_layers_pix2pix_size():
    disc = PatchDiscriminator(in_channels=1, ndf=8, n_layers=3)
    assert disc(torch.randn(1, 1, 32, 32)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="too small"):
        disc(torch.randn(1, 1, 16, 16))


def test_discriminator_init_pix2pix():
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=3, ndf=64, n_layers=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    weights = torch.cat([m.weight.flatten() for m in convs])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    scales = torch.cat([m.weight for m in norms])
    assert abs(scales.mean().item() - 1.0) < 0.01 and all(torch.all(m.bias == 0) for m in norms)


def test_discriminator_rejects_unknown_norm():
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="instance")
