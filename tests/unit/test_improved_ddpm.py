"""Improved DDPM (Nichol & Dhariwal 2021) against guided-diffusion's formulas, transcribed below in numpy
as the reference (openai/guided-diffusion `gaussian_diffusion.py`: `GaussianDiffusion.__init__`,
`p_mean_variance` with LEARNED_RANGE and EPSILON, `p_sample`, `condition_mean`, `_vb_terms_bpd`,
`training_losses`; `losses.py`: `normal_kl`; `respace.py`: `SpacedDiffusion.__init__`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_modules.diffusion import (
    CFGDenoiser,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    make_generators,
    make_timesteps,
    sample,
    seeded_noise,
)
from lightning_modules.diffusion.variance import (
    IDDPMSampler,
    VarianceTables,
    hybrid_vlb_term,
    normal_kl,
    p_mean_variance,
    respaced_betas,
    split_model_output,
    vb_terms_bpd,
)
from lightning_modules.diffusion_module import diffusion_loss

# --- guided-diffusion, transcribed (float64 numpy) ----------------------------------------------------


class GDReference:
    """GaussianDiffusion(betas, EPSILON, LEARNED_RANGE) reduced to the formulas under test."""

    def __init__(self, betas: np.ndarray) -> None:
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _x(arr: np.ndarray, t: np.ndarray, ndim: int) -> np.ndarray:
        return arr[t].reshape(-1, *([1] * (ndim - 1)))

    def q_posterior(self, x_start, x_t, t):
        mean = self._x(self.posterior_mean_coef1, t, x_t.ndim) * x_start + self._x(
            self.posterior_mean_coef2, t, x_t.ndim) * x_t  # fmt: skip
        return mean, self._x(self.posterior_log_variance_clipped, t, x_t.ndim)

    def p_mean_variance(self, model_output, x, t):
        C = x.shape[1]
        model_output, model_var_values = model_output[:, :C], model_output[:, C:]
        min_log = self._x(self.posterior_log_variance_clipped, t, x.ndim)
        max_log = self._x(np.log(self.betas), t, x.ndim)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._x(self.sqrt_recip_alphas_cumprod, t, x.ndim) * x - self._x(
            self.sqrt_recipm1_alphas_cumprod, t, x.ndim) * model_output  # fmt: skip
        model_mean, _ = self.q_posterior(pred_xstart, x, t)
        return {"mean": model_mean, "variance": np.exp(model_log_variance), "log_variance": model_log_variance,
                "pred_xstart": pred_xstart}  # fmt: skip

    def vb_terms_bpd_kl(self, model_output, x_start, x_t, t):
        """`_vb_terms_bpd` for t > 0 (its t == 0 branch is the 8-bit discretized decoder NLL)."""
        true_mean, true_log_variance_clipped = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = gd_normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        return kl.reshape(kl.shape[0], -1).mean(axis=1) / np.log(2.0)

    def p_sample(self, model_output, x, t, noise, gradient=None):
        out = self.p_mean_variance(model_output, x, t)
        nonzero_mask = (t != 0).astype(np.float64).reshape(-1, *([1] * (x.ndim - 1)))
        if gradient is not None:
            out["mean"] = out["mean"] + out["variance"] * gradient  # condition_mean
        return out["mean"] + nonzero_mask * np.exp(0.5 * out["log_variance"]) * noise


def gd_normal_kl(mean1, logvar1, mean2, logvar2):
    """guided-diffusion losses.normal_kl."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * np.exp(-logvar2))


def gd_spaced_betas(alphas_cumprod: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, list[int]]:
    """respace.SpacedDiffusion.__init__: new_betas and timestep_map."""
    last_alpha_cumprod, new_betas, timestep_map = 1.0, [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use_timesteps:
            new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
            timestep_map.append(i)
    return np.array(new_betas), timestep_map


# --- fixtures -------------------------------------------------------------------------------------------

SCHEDULE = NoiseSchedule("scaled_linear", 1000)
SHAPE = (5, 3, 4, 4)


def fixed(seed: int, shape=SHAPE, low: float | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x if low is None else torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1


T_BATCH = torch.tensor([0, 1, 17, 500, 999])


def learned_output(seed: int = 0) -> torch.Tensor:
    """(B, 2C, h, w): eps and variance values in [-1, 1]."""
    return torch.cat([fixed(seed), fixed(seed + 1, low=-1.0)], dim=1)


# --- the acceptance tests ------------------------------------------------------------------------------


def test_learned_range_mean_and_variance_equal_guided_diffusion() -> None:
    ref = GDReference(SCHEDULE.betas.numpy())
    out, x_t = learned_output(), fixed(7)
    eps, values = split_model_output(out, 3, "learned_range")
    tables = VarianceTables.of_schedule(SCHEDULE)
    pred_x0 = (x_t - (1 - SCHEDULE.alphas_cumprod[T_BATCH]).sqrt().view(-1, 1, 1, 1) * eps) / SCHEDULE.alphas_cumprod[
        T_BATCH].sqrt().view(-1, 1, 1, 1)  # fmt: skip
    mine = p_mean_variance(tables, pred_x0, values, x_t, T_BATCH)
    theirs = ref.p_mean_variance(out.numpy(), x_t.numpy(), T_BATCH.numpy())
    for key, ref_key in [("mean", "mean"), ("variance", "variance"), ("log_variance", "log_variance"),
                         ("pred_x0", "pred_xstart")]:  # fmt: skip
        np.testing.assert_allclose(mine[key].numpy(), theirs[ref_key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_normal_kl_equals_guided_diffusion_and_the_closed_form() -> None:
    m1, m2, lv1, lv2 = fixed(1), fixed(2), fixed(3) * 0.5, fixed(4) * 0.5
    np.testing.assert_allclose(normal_kl(m1, lv1, m2, lv2).numpy(), gd_normal_kl(*(a.numpy() for a in (m1, lv1, m2, lv2))),
                               rtol=1e-12)  # fmt: skip
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))


def test_vb_terms_equal_guided_diffusion_for_t_positive_and_the_gaussian_nll_at_t0() -> None:
    ref = GDReference(SCHEDULE.betas.numpy())
    out, x0 = learned_output(3), fixed(11)
    x_t = fixed(12)
    eps, values = split_model_output(out, 3, "learned_range")
    abar = SCHEDULE.alphas_cumprod[T_BATCH].view(-1, 1, 1, 1)
    pred_x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    tables = VarianceTables.of_schedule(SCHEDULE)
    mine = vb_terms_bpd(tables, x0, x_t, T_BATCH, pred_x0, values)
    theirs = ref.vb_terms_bpd_kl(out.numpy(), x0.numpy(), x_t.numpy(), T_BATCH.numpy())
    np.testing.assert_allclose(mine[1:].numpy(), theirs[1:], rtol=1e-10)
    # t = 0 on continuous latents: -log N(x0; mu, Sigma) per dim, in bits (variance.py's module docstring).
    p = p_mean_variance(tables, pred_x0, values, x_t, T_BATCH)
    nll = -torch.distributions.Normal(p["mean"][:1], (0.5 * p["log_variance"][:1]).exp()).log_prob(x0[:1])
    torch.testing.assert_close(mine[:1], nll.flatten(1).mean(1) / math.log(2))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_respaced_betas_and_variance_equal_guided_diffusion(spacing: str) -> None:
    chain = make_timesteps(1000, 10, spacing)
    betas_ref, timestep_map = gd_spaced_betas(SCHEDULE.alphas_cumprod.numpy(), set(chain.tolist()))
    np.testing.assert_allclose(respaced_betas(SCHEDULE.alphas_cumprod, chain).numpy(), betas_ref, rtol=1e-12)
    ref = GDReference(betas_ref)
    tables = VarianceTables.respaced(SCHEDULE, chain)
    assert tables.timesteps.tolist() == timestep_map
    np.testing.assert_allclose(tables.posterior_log_variance_clipped.numpy(), ref.posterior_log_variance_clipped,
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_allclose(tables.log_betas.numpy(), np.log(ref.betas), rtol=1e-12)


@pytest.mark.parametrize("guided", [False, True])
def test_iddpm_steps_equal_guided_diffusion_p_sample_on_a_respaced_chain(guided: bool) -> None:
    """Every step of a 10-step chain, the last one (no noise) included, with and without condition_mean."""
    sampler = IDDPMSampler(num_steps=10, spacing="leading")
    chain = sampler.timesteps(SCHEDULE).tolist()
    betas_ref, timestep_map = gd_spaced_betas(SCHEDULE.alphas_cumprod.numpy(), set(chain))
    ref = GDReference(betas_ref)
    x = fixed(20)
    for k, (t, prev_t) in enumerate(zip(chain, [*chain[1:], -1])):
        out, noise, grad = learned_output(30 + 3 * k), fixed(31 + 3 * k), fixed(32 + 3 * k) if guided else None
        eps, values = split_model_output(out, 3, "learned_range")
        mine = sampler.step(SCHEDULE, eps, t, x, noise if prev_t >= 0 else None, grad=grad, prev_t=prev_t,
                            model_var_values=values)["prev_sample"]  # fmt: skip
        index = np.full(SHAPE[0], timestep_map.index(t))
        theirs = ref.p_sample(out.numpy(), x.numpy(), index, noise.numpy(), None if grad is None else grad.numpy())
        np.testing.assert_allclose(mine.numpy(), theirs, rtol=1e-9, atol=1e-9, err_msg=f"step t={t}")
        x = mine


def test_whole_sampling_loop_equals_guided_diffusion_p_sample_loop() -> None:
    """`sample` with a learned-variance denoiser and per-sample seeds == the reference loop fed the same noise."""
    C = 3
    weight = fixed(40, (2 * C, C)).float() * 0.3

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("oc,bchw->bohw", weight.to(x.dtype), x) * (1 + t.view(-1, 1, 1, 1) / 1000)
        return torch.cat([out[:, :C], torch.tanh(out[:, C:])], dim=1)

    sampler, seeds = IDDPMSampler(num_steps=5, spacing="trailing"), [3, 4]
    mine = sample(denoiser, (2, C, 4, 4), SCHEDULE, sampler, seeds=seeds, variance_type="learned_range",
                  dtype=torch.float64)  # fmt: skip
    chain = sampler.timesteps(SCHEDULE).tolist()
    betas_ref, timestep_map = gd_spaced_betas(SCHEDULE.alphas_cumprod.numpy(), set(chain))
    ref = GDReference(betas_ref)
    gens = make_generators(seeds)
    x = seeded_noise(seeds, (C, 4, 4), gens, dtype=torch.float64)
    for k, t in enumerate(chain):
        noise = seeded_noise(seeds, (C, 4, 4), gens, dtype=torch.float64) if k + 1 < len(chain) else torch.zeros_like(x)
        out = denoiser(x, torch.full((2,), t)).numpy()
        x = torch.from_numpy(ref.p_sample(out, x.numpy(), np.full(2, timestep_map.index(t)), noise.numpy()))
    torch.testing.assert_close(mine, x, rtol=1e-9, atol=1e-9)


def test_hybrid_loss_vlb_gradient_reaches_only_the_variance_channels() -> None:
    """L_hybrid = L_simple + lambda T L_t: the VLB term's gradient reaches the variance channels only
    (stop-gradient on the mean, guided-diffusion's `frozen_out`); the MSE's reaches the prediction only."""
    z0, noise = fixed(50).float(), fixed(51).float()
    t = torch.tensor([0, 3, 250, 600, 999])
    out = (learned_output(52).float() * 0.5).requires_grad_(True)

    def model(z_t, t_, context, mask):
        return out * 1.0

    loss = diffusion_loss(model, SCHEDULE, "eps", z0, t, noise, None, None, variance_type="learned_range")
    grad_total = torch.autograd.grad(loss.sum(), out)[0]
    from lightning_modules.diffusion import q_sample

    z_t = q_sample(SCHEDULE, z0, t, noise)
    vlb = hybrid_vlb_term(SCHEDULE, "eps", out[:, :3], out[:, 3:], z0, z_t, t)
    grad_vlb = torch.autograd.grad(vlb.sum(), out)[0]
    assert grad_vlb[:, :3].abs().max() == 0  # the mean is frozen
    assert grad_vlb[:, 3:].abs().min() > 0  # every variance value is trained
    mse = (out[:, :3] - noise).square().flatten(1).mean(1)
    torch.testing.assert_close(loss, mse + vlb)
    torch.testing.assert_close(grad_total[:, :3], torch.autograd.grad(mse.sum(), out)[0][:, :3])
    # lambda T L_t with lambda = 0.001 (guided-diffusion's RESCALED_MSE: vb * T / 1000)
    eps, values = out[:, :3].detach(), out[:, 3:].detach()
    abar = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    pred_x0 = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    vb = vb_terms_bpd(VarianceTables.of_schedule(SCHEDULE), z0, z_t, t, pred_x0, values)
    torch.testing.assert_close(vlb, 1e-3 * SCHEDULE.num_timesteps * vb)


def test_cfg_guides_the_prediction_and_keeps_the_conditional_variance() -> None:
    C = 3

    def model(x, t, context, mask):
        return torch.cat([x * context[:, :1, :1, None], x + context[:, :1, :1, None]], dim=1)

    x, t = fixed(60).float(), torch.full((5,), 10)
    cond, uncond = torch.full((1, 1, 2), 2.0), torch.full((1, 1, 2), -1.0)
    out = CFGDenoiser(model, cond, None, uncond, None, scale=3.0, learned_variance=True)(x, t)
    torch.testing.assert_close(out[:, :C], -x + 3.0 * (2 * x + x))
    torch.testing.assert_close(out[:, C:], x + 2.0)


def test_split_and_sampler_checks_refuse_mismatched_models() -> None:
    with pytest.raises(ValueError, match="learned_range model must output 6 channels"):
        split_model_output(torch.zeros(1, 3, 2, 2), 3, "learned_range")
    with pytest.raises(ValueError, match="unknown variance_type"):
        split_model_output(torch.zeros(1, 3, 2, 2), 3, "learned")
    with pytest.raises(ValueError, match="IDDPMSampler needs a learned-variance model"):
        sample(lambda x, t: x, (1, 3, 2, 2), SCHEDULE, IDDPMSampler(num_steps=2), seeds=[0])


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=4), DDPMSampler(num_steps=4)])
def test_fixed_variance_samplers_ignore_the_variance_channels(sampler) -> None:
    def fixed_model(x, t):
        return 0.1 * x

    def learned_model(x, t):
        return torch.cat([0.1 * x, torch.full_like(x, 0.7)], dim=1)

    a = sample(fixed_model, (2, 3, 4, 4), SCHEDULE, sampler, seeds=[0, 1])
    b = sample(learned_model, (2, 3, 4, 4), SCHEDULE, sampler, seeds=[0, 1], variance_type="learned_range")
    torch.testing.assert_close(a, b)
