"""Autoencoder loss: GAN losses, adaptive weight, learned logvar, disc_start gating, detaching, AMP."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.discriminator import PatchDiscriminator
from lightning_modules.nets.vae_loss import (
    AutoencoderLoss,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)

LOGITS_REAL = torch.tensor([2.0, 0.5, -1.0, 0.0])
LOGITS_FAKE = torch.tensor([-2.0, 0.3, 1.5, -0.5])


class CountingDisc(nn.Module):
    """Wraps a discriminator and counts its calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=2)
    disc = CountingDisc(PatchDiscriminator(in_channels=1, ndf=8, n_layers=2))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    return ae, disc, x


# ---- GAN losses on fixed logits -------------------------------------------------------------------


def test_hinge_d_loss_by_hand():
    real = [max(0.0, 1 - v) for v in LOGITS_REAL.tolist()]  # 0, 0.5, 2, 1
    fake = [max(0.0, 1 + v) for v in LOGITS_FAKE.tolist()]  # 0, 1.3, 2.5, 0.5
    expected = 0.5 * (sum(real) / 4 + sum(fake) / 4)
    assert hinge_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected)
    assert expected == pytest.approx(0.5 * (3.5 / 4 + 4.3 / 4))


def test_vanilla_d_loss_by_hand():
    def sigmoid(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    real = [-math.log(sigmoid(v)) for v in LOGITS_REAL.tolist()]
    fake = [-math.log(1 - sigmoid(v)) for v in LOGITS_FAKE.tolist()]
    expected = 0.5 * (sum(real) / 4 + sum(fake) / 4)
    assert vanilla_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected, rel=1e-6)


def test_unknown_disc_loss_rejected():
    with pytest.raises(ValueError, match="disc_loss"):
        AutoencoderLoss(None, disc_loss="wasserstein")


# ---- adaptive weight --------------------------------------------------------------------------------


def test_adaptive_weight_closed_form_linear_decoder():
    # Toy decoder out = W z (W: (P, Q)), L_rec = sum((out - t)^2), L_GAN = -mean(a * out).
    # dL_rec/dW = 2 (W z - t) z^T and dL_GAN/dW = -(a z^T) / P, written out without autograd.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=gen, requires_grad=True)
    z, t, a = torch.randn(3, generator=gen), torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    out = w @ z
    rec_loss = (out - t).square().sum()
    g_loss = -(a * out).mean()
    grad_rec = 2 * torch.outer(w.detach() @ z - t, z)
    grad_gan = -torch.outer(a, z) / 5
    expected = grad_rec.norm() / (grad_gan.norm() + 1e-4)
    weight = adaptive_weight(rec_loss, g_loss, w)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    # Clamped to the maximum, and the graphs survive for the real backward.
    assert adaptive_weight(rec_loss, g_loss, w, max_weight=1e-3).item() == pytest.approx(1e-3)
    (rec_loss + g_loss).backward()
    assert w.grad is not None


def test_generator_loss_uses_adaptive_weight_on_last_layer(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, kl_weight=1e-3, disc_weight=0.5, disc_start=0)
    recon, post = ae(x)
    loss, logs = loss_fn.generator_loss(x, recon, post, 0, ae.last_layer, disc)
    # Reference via explicit autograd.grad on the decoder's last conv weight.
    nll = (x - recon).abs().sum() / 2  # logvar = 0
    g_loss = -disc.inner(recon).mean()
    g_rec = torch.autograd.grad(nll, ae.last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, ae.last_layer, retain_graph=True)[0]
    d_weight = 0.5 * g_rec.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(logs["d_weight"], d_weight.detach())
    torch.testing.assert_close(logs["nll"], nll.detach())
    expected = nll + 1e-3 * post.kl().mean() + d_weight * g_loss
    torch.testing.assert_close(loss, expected)


# ---- disc_start gating ------------------------------------------------------------------------------


def test_gan_term_exactly_zero_and_discriminator_not_called_before_start(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, kl_weight=1e-2, disc_start=10)
    recon, post = ae(x)
    loss, logs = loss_fn.generator_loss(x, recon, post, 9, ae.last_layer, disc)
    assert disc.calls == 0
    assert (
        logs["g_loss"].item() == 0.0 and logs["d_weight"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    )
    nll = (x - recon).abs().sum() / 2
    assert torch.equal(loss.detach(), (nll + 1e-2 * post.kl().mean()).detach())
    # The discriminator's parameters take no part in the generator loss before disc_start.
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())

    recon, post = ae(x)
    _, logs_on = loss_fn.generator_loss(x, recon, post, 10, ae.last_layer, disc)
    assert disc.calls == 1 and logs_on["disc_factor"].item() == 1.0 and logs_on["g_loss"].item() != 0.0


def test_discriminator_loss_gated_and_detached(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, disc_start=5, disc_loss="hinge")
    recon, _ = ae(x)
    before, logs_before = loss_fn.discriminator_loss(x, recon, 4, disc)
    assert before.item() == 0.0 and logs_before["disc_factor"].item() == 0.0
    loss, logs = loss_fn.discriminator_loss(x, recon, 5, disc)
    expected = hinge_d_loss(disc.inner(x), disc.inner(recon))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in ae.parameters()), "discriminator loss reached the autoencoder"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    assert set(logs) == {"d_loss", "logits_real", "logits_fake", "disc_factor"}


# ---- learned logvar ---------------------------------------------------------------------------------


def test_logvar_gets_gradient_and_moves_with_adam(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, logvar_init=0.0, disc_start=0)
    params = loss_fn.generator_parameters()
    assert len(params) == 1 and params[0] is loss_fn.logvar
    opt = torch.optim.Adam(list(ae.parameters()) + params, lr=1e-2)
    recon, post = ae(x)
    loss, _ = loss_fn.generator_loss(x, recon, post, 0, ae.last_layer, disc)
    loss.backward()
    # d nll / d logvar = sum(-rec * exp(-logvar) + 1) / B = numel / B - sum|x - x_hat| / B at logvar = 0.
    rec = (x - recon).abs().detach()
    expected_grad = (rec.numel() - rec.sum()) / 2
    torch.testing.assert_close(loss_fn.logvar.grad, expected_grad)
    opt.step()
    assert loss_fn.logvar.item() != 0.0


def test_generator_parameters_exclude_frozen_perceptual():
    perceptual = nn.Conv2d(1, 1, 1).requires_grad_(False)
    loss_fn = AutoencoderLoss(perceptual)
    assert loss_fn.generator_parameters() == [loss_fn.logvar]


# ---- perceptual term, logs, mixed precision ---------------------------------------------------------


class ConstantPerceptual(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.value)


def test_perceptual_enters_per_pixel_as_ldm(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(ConstantPerceptual(0.25), perceptual_weight=2.0, kl_weight=0.0, disc_start=99)
    recon, post = ae(x)
    loss, logs = loss_fn.generator_loss(x, recon, post, 0, ae.last_layer, disc)
    # LDM broadcasts the (B,) perceptual distance over pixels: rec = |x - x_hat| + w_p * P.
    expected = ((x - recon).abs() + 0.5).sum() / 2
    torch.testing.assert_close(loss, expected)
    assert logs["perceptual"].item() == pytest.approx(0.25)
    expected_keys = {
        "loss",
        "l1",
        "perceptual",
        "rec",
        "nll",
        "kl",
        "g_loss",
        "d_weight",
        "disc_factor",
        "logvar",
    }
    assert set(logs) == expected_keys
    assert all(not v.requires_grad and v.dtype == torch.float32 and v.ndim == 0 for v in logs.values())


def test_losses_float32_under_bf16_autocast(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, disc_start=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, post = ae(x)
        assert recon.dtype == torch.bfloat16
        g, g_logs = loss_fn.generator_loss(x, recon, post, 0, ae.last_layer, disc)
        d, _ = loss_fn.discriminator_loss(x, recon, 0, disc)
    assert g.dtype == d.dtype == torch.float32
    assert torch.isfinite(g) and torch.isfinite(d) and g_logs["d_weight"] > 0


def test_validation_without_grad_has_zero_adaptive_weight(setup):
    ae, disc, x = setup
    loss_fn = AutoencoderLoss(None, disc_start=0)
    with torch.no_grad():
        recon, post = ae(x)
        loss, logs = loss_fn.generator_loss(x, recon, post, 0, ae.last_layer, disc)
    assert logs["d_weight"].item() == 0.0 and disc.calls == 1 and torch.isfinite(loss)
