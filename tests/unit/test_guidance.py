"""Classifier-free guidance, its rescale, classifier guidance, and guided sampling loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_modules.diffusion import (
    CFGDenoiser,
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    cfg_combine,
    classifier_cond_fn,
    classifier_grad,
    condition_mean,
    condition_score,
    sample,
)

T = 1000
SHAPE = (3, 2, 4, 4)
NUM_CLASSES = 5


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class ToyConditionalModel:
    """model(x, t, context, mask) with per-sample outputs; records every call's batch size."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None):
        self.batch_sizes.append(x.shape[0])
        weights = context if mask is None else context * mask[..., None]
        shift = weights.sum(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.2 * x * shift + torch.cos(t.to(x.dtype) / 300).view(-1, 1, 1, 1) + shift


class LinearClassifier(nn.Module):
    """logits = W flatten(x) (1 + t / T) + b: a toy time-conditioned classifier p(y | x_t, t)."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, NUM_CLASSES, dtype=dtype)
        with torch.no_grad():
            self.linear.weight.copy_(_randn(NUM_CLASSES, in_features, seed=99, dtype=dtype))
            self.linear.bias.copy_(torch.linspace(-1, 1, NUM_CLASSES, dtype=dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)) * (1 + t.to(x.dtype) / T)[:, None]


class MLPClassifier(nn.Module):
    def __init__(self, in_features: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(in_features + 1, 16), nn.SiLU(), nn.Linear(16, NUM_CLASSES)
        ).double()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), t[:, None].to(x.dtype) / T], dim=1))


def _contexts(batch: int) -> dict[str, torch.Tensor]:
    return {
        "context_cond": _randn(batch, 4, 6, seed=1),
        "mask_cond": (torch.arange(4) < 3).double().expand(batch, 4),
        "context_uncond": _randn(batch, 4, 6, seed=2),
        "mask_uncond": torch.ones(batch, 4, dtype=torch.float64),
    }


# --- classifier-free guidance ----------------------------------------------------------------------------


def test_cfg_combine_scales() -> None:
    uncond, cond = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4)
    assert torch.equal(cfg_combine(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 0.0), uncond, rtol=0, atol=0)
    # eps_u + s (eps_c - eps_u) is (1 + w) eps_c - w eps_u of Ho & Salimans 2022 eq. 6 with w = s - 1.
    w = 6.5
    torch.testing.assert_close(cfg_combine(uncond, cond, w + 1), (1 + w) * cond - w * uncond)


def test_cfg_rescale() -> None:
    uncond, cond = _randn(*SHAPE, seed=5), 2 * _randn(*SHAPE, seed=6)
    plain = uncond + 7.5 * (cond - uncond)
    torch.testing.assert_close(cfg_combine(uncond, cond, 7.5, rescale_phi=0.0), plain)
    full = cfg_combine(uncond, cond, 7.5, rescale_phi=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    # Lin et al. 2023 eq. 15-16, per sample with numpy.
    phi, g, c = 0.7, plain.flatten(1).numpy(), cond.flatten(1).numpy()
    rescaled = g * (c.std(1, ddof=1) / g.std(1, ddof=1))[:, None]
    expected = phi * rescaled + (1 - phi) * g
    np.testing.assert_allclose(cfg_combine(uncond, cond, 7.5, rescale_phi=phi).flatten(1).numpy(), expected)


@pytest.mark.parametrize("masked", [True, False])
def test_cfg_denoiser_batched_equals_two_passes(masked: bool) -> None:
    x, t = _randn(*SHAPE, seed=7), torch.tensor([10, 500, 999])
    ctx = _contexts(SHAPE[0])
    if not masked:
        ctx["mask_cond"] = ctx["mask_uncond"] = None
    model = ToyConditionalModel()
    guided = CFGDenoiser(model, **ctx, scale=4.0, rescale_phi=0.3)(x, t)
    assert model.batch_sizes == [2 * SHAPE[0]]
    cond = model(x, t, ctx["context_cond"], ctx["mask_cond"])
    uncond = model(x, t, ctx["context_uncond"], ctx["mask_uncond"])
    torch.testing.assert_close(guided, cfg_combine(uncond, cond, 4.0, rescale_phi=0.3))


def test_cfg_denoiser_scale_one_skips_unconditional_half() -> None:
    x, t, ctx = _randn(*SHAPE, seed=8), torch.tensor([1, 2, 3]), _contexts(SHAPE[0])
    model = ToyConditionalModel()
    out = CFGDenoiser(model, **ctx, scale=1.0)(x, t)
    assert model.batch_sizes == [SHAPE[0]]
    assert torch.equal(out, model(x, t, ctx["context_cond"], ctx["mask_cond"]))


def test_cfg_denoiser_broadcasts_single_negative_context() -> None:
    x, t, ctx = _randn(*SHAPE, seed=9), torch.tensor([4, 5, 6]), _contexts(SHAPE[0])
    negative = _randn(1, 4, 6, seed=10)
    model = ToyConditionalModel()
    out = CFGDenoiser(model, ctx["context_cond"], None, negative, None, scale=3.0)(x, t)
    expected = CFGDenoiser(
        model, ctx["context_cond"], None, negative.expand(SHAPE[0], 4, 6), None, scale=3.0
    )(x, t)
    torch.testing.assert_close(out, expected)


# --- classifier guidance ----------------------------------------------------------------------------------


def test_classifier_grad_matches_finite_differences() -> None:
    classifier = MLPClassifier(32)
    x, t, y = _randn(*SHAPE, seed=11), torch.tensor([0, 400, 999]), torch.tensor([0, 3, 4])
    grad = classifier_grad(classifier, x, t, y, scale=2.5)
    assert not grad.requires_grad and all(p.grad is None for p in classifier.parameters())

    def objective(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return 2.5 * torch.log_softmax(classifier(z, t), dim=-1)[torch.arange(3), y]

    direction, h = _randn(*SHAPE, seed=12), 1e-5
    numeric = (objective(x + h * direction) - objective(x - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).flatten(1).sum(1), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad", [NUM_CLASSES, -1])
def test_classifier_grad_rejects_out_of_range_class(bad: int) -> None:
    x, t = _randn(*SHAPE, seed=13), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=f"class index {bad} out of range"):
        classifier_grad(LinearClassifier(32), x, t, torch.tensor([0, bad, 1]), scale=1.0)


def test_condition_mean_and_score_equal_guided_diffusion() -> None:
    """guided-diffusion gaussian_diffusion.py, written out:

    condition_mean:  new_mean = p_mean_var["mean"] + p_mean_var["variance"] * gradient
    condition_score: eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t), alpha_bar = alphas_cumprod[t]
    """
    schedule = NoiseSchedule("linear", T)
    mean, grad, eps, xt = (_randn(*SHAPE, seed=s) for s in (14, 15, 16, 17))
    variance = torch.tensor([0.1, 0.02, 0.3], dtype=torch.float64).view(-1, 1, 1, 1)
    np.testing.assert_allclose(condition_mean(mean, variance, grad).numpy(), (mean + variance * grad).numpy())
    t = torch.tensor([0, 499, 999])
    alpha_bar = np.cumprod(1 - np.linspace(0.00085, 0.012, T))[t.numpy()][:, None, None, None]
    expected = eps.numpy() - np.sqrt(1 - alpha_bar) * grad.numpy()
    np.testing.assert_allclose(condition_score(schedule, eps, xt, t, grad).numpy(), expected, rtol=1e-12)


def test_samplers_apply_guidance_with_respaced_step_quantities() -> None:
    """DDPM shifts its respaced-step mean by its variance * grad; DDIM steps with the guided eps."""
    schedule = NoiseSchedule("scaled_linear", T)
    xt, eps, grad, noise = (_randn(*SHAPE, seed=s) for s in (18, 19, 20, 21))
    ddpm, t = DDPMSampler(num_steps=10), 500
    plain = ddpm.step(schedule, eps, t, xt, noise)
    guided = ddpm.step(schedule, eps, t, xt, noise, grad=grad)
    abar_t, abar_prev = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[400])
    respaced_variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    assert plain["variance"] == pytest.approx(respaced_variance, rel=1e-12)
    torch.testing.assert_close(guided["mean"], plain["mean"] + respaced_variance * grad)
    torch.testing.assert_close(guided["prev_sample"], plain["prev_sample"] + respaced_variance * grad)

    ddim = DDIMSampler(num_steps=10, eta=0.3)
    guided_eps = eps - (1 - abar_t) ** 0.5 * grad
    torch.testing.assert_close(
        ddim.step(schedule, eps, t, xt, noise, grad=grad)["prev_sample"],
        ddim.step(schedule, guided_eps, t, xt, noise)["prev_sample"],
    )


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(num_steps=10), DDIMSampler(num_steps=10)], ids=["ddpm", "ddim"]
)
def test_one_guided_step_increases_class_log_probability(sampler) -> None:
    schedule = NoiseSchedule("linear", T)
    classifier = LinearClassifier(32)
    xt, eps, y = _randn(*SHAPE, seed=22), _randn(*SHAPE, seed=23), torch.tensor([0, 2, 4])
    t = 500
    t_batch = torch.full((SHAPE[0],), t)
    grad = classifier_grad(classifier, xt, t_batch, y, scale=0.05)  # a small step, no overshoot
    t_next = torch.full((SHAPE[0],), sampler.prev_timestep(schedule, t))

    def log_p(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(classifier(z, t_next), dim=-1)[torch.arange(SHAPE[0]), y]

    noise = torch.zeros_like(xt)
    plain = sampler.step(schedule, eps, t, xt, noise)["mean"]
    guided = sampler.step(schedule, eps, t, xt, noise, grad=grad)["mean"]
    assert (log_p(guided) > log_p(plain)).all()


def _model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.1 * torch.sin(t.to(x.dtype) / 100).view(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(num_steps=10), DDIMSampler(num_steps=10), DDIMSampler(num_steps=10, eta=0.5)]
)
def test_zero_classifier_scale_is_bit_exact_unguided(sampler) -> None:
    schedule = NoiseSchedule("linear", T)
    classifier, y = LinearClassifier(32, dtype=torch.float32), torch.tensor([1, 2, 3])
    unguided = sample(_model, SHAPE, schedule, sampler, seeds=[0, 1, 2])
    # The gradient is computed and multiplied by 0 at every step: still bit-identical.
    zero = sample(
        _model,
        SHAPE,
        schedule,
        sampler,
        seeds=[0, 1, 2],
        cond_fn=lambda x, t: classifier_grad(classifier, x, t, y, 0.0),
    )
    assert torch.equal(unguided, zero)
    assert classifier_cond_fn(classifier, y, 0.0) is None
    guided = sample(
        _model, SHAPE, schedule, sampler, seeds=[0, 1, 2], cond_fn=classifier_cond_fn(classifier, y, 3.0)
    )
    assert not torch.equal(unguided, guided)


def test_classifier_sees_original_timesteps_on_respaced_chain() -> None:
    schedule = NoiseSchedule("linear", T)
    seen: list[list[int]] = []
    classifier = LinearClassifier(32, dtype=torch.float32)

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t.tolist())
        return classifier(x, t)

    sampler = DDIMSampler(num_steps=5, spacing="trailing")
    sample(
        _model,
        SHAPE,
        schedule,
        sampler,
        seeds=[0, 1, 2],
        cond_fn=classifier_cond_fn(recording, torch.tensor([0, 1, 2]), 1.0),
    )
    assert seen == [[t] * SHAPE[0] for t in (999, 799, 599, 399, 199)]


def test_cfg_and_classifier_guidance_together() -> None:
    """The loop with a CFGDenoiser and a classifier equals the same loop with both written out by hand."""
    schedule = NoiseSchedule("linear", T)
    ctx = _contexts(SHAPE[0])
    model = ToyConditionalModel()
    classifier, y = LinearClassifier(32), torch.tensor([4, 0, 2])
    sampler = DDPMSampler(num_steps=6)

    def by_hand(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = model(x, t, ctx["context_cond"], ctx["mask_cond"])
        uncond = model(x, t, ctx["context_uncond"], ctx["mask_uncond"])
        return uncond + 3.0 * (cond - uncond)

    def cond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return classifier_grad(classifier, x, t, y, 2.0)

    kwargs = {"seeds": [3, 4, 5], "cond_fn": cond_fn, "dtype": torch.float64}
    got = sample(CFGDenoiser(model, **ctx, scale=3.0), SHAPE, schedule, sampler, **kwargs)
    expected = sample(by_hand, SHAPE, schedule, sampler, **kwargs)
    torch.testing.assert_close(got, expected)
    assert not torch.equal(
        got, sample(by_hand, SHAPE, schedule, sampler, seeds=[3, 4, 5], dtype=torch.float64)
    )
