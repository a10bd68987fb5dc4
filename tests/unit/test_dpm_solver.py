"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): whole seeded loops against diffusers'
DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2) in float64, and guidance
through the guided eps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep

from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import (
    DPMSolverPP2MSampler,
    NoiseSchedule,
    condition_score,
    make_timesteps,
    sample,
)
from lightning_modules.generation import GuidanceSetting, generate
from tests import tiny_checkpoints as tiny

T = 1000
SHAPE = (1, 2, 3, 3)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in network (read as an eps, v or x0 prediction), elementwise and t-dependent."""
    return 0.3 * x + 0.1 * torch.sin(t.to(x.dtype) / 100).view(-1, *([1] * (x.ndim - 1)))


class _Float64Torch:
    """diffusers' step casts the sample "up" to float32 before the update; for a float64 comparison that is a
    downcast, so the scheduler module sees this torch whose float32 is float64 (nothing else changes)."""

    float32 = torch.float64

    def __getattr__(self, name: str):
        return getattr(torch, name)


def _diffusers_loop(schedule: NoiseSchedule, prediction: str, spacing: str, num_steps: int, seed: int,
                    **config) -> torch.Tensor:  # fmt: skip
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule="scaled_linear", prediction_type=DIFFUSERS_PREDICTION[prediction],
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", **config,
    )  # fmt: skip
    if spacing == "trailing":
        # diffusers' own trailing chain, the same as make_timesteps' for this count.
        ref.register_to_config(timestep_spacing="trailing")
        ref.set_timesteps(num_steps)
        assert ref.timesteps.tolist() == make_timesteps(T, num_steps, "trailing").tolist()
    else:
        # diffusers' DPM scheduler defines "leading" as k * (T // (n + 1)), k = n..1 (not DDIMScheduler's k *
        # (T // n), k = n-1..0, which every sampler here shares): hand it our chain.
        ref.set_timesteps(timesteps=make_timesteps(T, num_steps, spacing).tolist())
    # Its sigma table is float32; the same values in float64 from our abar (a final sigma of 0 or sigma_min).
    abar = schedule.alphas_cumprod[ref.timesteps]
    last = (
        ref.sigmas[-1:].double()
        if float(ref.sigmas[-1]) == 0
        else ((1 - schedule.alphas_cumprod[:1]) / schedule.alphas_cumprod[:1]).sqrt()
    )
    ref.sigmas = torch.cat([((1 - abar) / abar).sqrt(), last])
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    for t in ref.timesteps:
        x = ref.step(_toy_model(x, t.expand(SHAPE[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 20])
def test_whole_loop_equals_diffusers(prediction: str, spacing: str, num_steps: int, monkeypatch) -> None:
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "torch", _Float64Torch())
    schedule = NoiseSchedule("scaled_linear", T)
    expected = _diffusers_loop(schedule, prediction, spacing, num_steps, seed=42)
    sampler = DPMSolverPP2MSampler(num_steps=num_steps, spacing=spacing)
    got = sample(
        _toy_model, SHAPE, schedule, sampler, prediction_type=prediction, seeds=[42], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("final_sigmas_type", "lower_order_final", "num_steps"),
                         [("sigma_min", True, 10), ("sigma_min", False, 10), ("sigma_min", True, 20)])  # fmt: skip
def test_final_sigma_options_equal_diffusers(
    final_sigmas_type, lower_order_final, num_steps, monkeypatch
) -> None:
    """sigma_min ends at training timestep 0's noise level; the last step is then second order unless
    lower_order_final and fewer than 15 steps (diffusers' rule)."""
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "torch", _Float64Torch())
    schedule = NoiseSchedule("scaled_linear", T)
    expected = _diffusers_loop(schedule, "eps", "trailing", num_steps, seed=7,
                               final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final)  # fmt: skip
    sampler = DPMSolverPP2MSampler(num_steps=num_steps, spacing="trailing", final_sigmas_type=final_sigmas_type,
                                   lower_order_final=lower_order_final)  # fmt: skip
    got = sample(_toy_model, SHAPE, schedule, sampler, seeds=[7], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_the_second_order_history_is_used() -> None:
    """Dropping the state handed back by the loop (every step first order, i.e. DDIM) changes the result."""
    schedule, sampler = NoiseSchedule("scaled_linear", T), DPMSolverPP2MSampler(num_steps=10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    chain = sampler.timesteps(schedule).tolist()
    first_order, multistep, state = x, x, None
    for t, prev_t in zip(chain, [*chain[1:], -1]):
        t_batch = torch.full((1,), t)
        first_order = sampler.step(schedule, _toy_model(first_order, t_batch), t, first_order, None,
                                   prev_t=prev_t)["prev_sample"]  # fmt: skip
        out = sampler.step(
            schedule, _toy_model(multistep, t_batch), t, multistep, None, prev_t=prev_t, state=state
        )
        multistep, state = out["prev_sample"], out["state"]
    torch.testing.assert_close(multistep, sample(_toy_model, SHAPE, schedule, sampler, seeds=[3],
                                                 dtype=torch.float64), rtol=0, atol=0)  # fmt: skip
    assert (multistep - first_order).abs().max() > 1e-3


def test_classifier_guidance_goes_through_the_guided_eps() -> None:
    schedule, sampler = NoiseSchedule("scaled_linear", T), DPMSolverPP2MSampler(num_steps=10)
    gen = torch.Generator().manual_seed(0)
    x, eps, grad, prev_x0 = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(4))
    t, prev_t, state = 699, 599, {"x0": prev_x0, "t": 799}
    guided_eps = condition_score(schedule, eps, x, torch.full((1,), t), grad)
    by_grad = sampler.step(schedule, eps, t, x, None, grad=grad, prev_t=prev_t, state=state)
    by_eps = sampler.step(schedule, guided_eps, t, x, None, prev_t=prev_t, state=state)
    torch.testing.assert_close(by_grad["prev_sample"], by_eps["prev_sample"], rtol=0, atol=0)
    assert not torch.equal(by_grad["prev_sample"], sampler.step(schedule, eps, t, x, None, prev_t=prev_t,
                                                                state=state)["prev_sample"])  # fmt: skip


def test_rejects_bad_arguments_and_draws_no_noise() -> None:
    with pytest.raises(ValueError, match="'sigma_max'"):
        DPMSolverPP2MSampler(final_sigmas_type="sigma_max")
    with pytest.raises(ValueError, match="'uniform'"):
        DPMSolverPP2MSampler(spacing="uniform")
    schedule, sampler = NoiseSchedule("linear", T), DPMSolverPP2MSampler(num_steps=5)
    assert not any(sampler.needs_noise(schedule, t) for t in sampler.timesteps(schedule).tolist())


def test_generate_with_cfg_negative_rescale_and_classifier_guidance(tmp_path) -> None:
    """`generate` with DPM-Solver++: the same images as the guided denoiser and classifier gradient written
    out (eps_u + s (eps_c - eps_u), rescaled; s_cls grad log p(y | z_t, t)) through the bare loop."""
    from lightning_modules.artifacts import load_classifier

    bundle, paths = tiny.conditioned_bundle(tmp_path)
    classifier = load_classifier(tiny.write_classifier(tmp_path / "classifier" / "final.ckpt",
                                                       paths["fingerprint"]), diffusion=bundle)  # fmt: skip
    sampler, labels, seeds = DPMSolverPP2MSampler(num_steps=4), torch.tensor([2, 7]), [5, 6]
    setting = GuidanceSetting("both", cfg_scale=3.0, cls_scale=2.0, rescale_phi=0.5, negative=4)
    got = generate(bundle.unet, LatentCodec.of(bundle), bundle.conditioner, setting, sampler, bundle.schedule,
                   bundle.prediction_type, labels, seeds, latent_shape=bundle.latent_shape, labels=labels,
                   negative_condition=torch.tensor([4]), classifier=classifier)  # fmt: skip
    cond, negative = bundle.conditioner(labels), bundle.conditioner(torch.tensor([4, 4]))

    def denoiser(x, t):
        eps_c, eps_u = bundle.unet(x, t, *cond), bundle.unet(x, t, *negative)
        guided = eps_u + 3.0 * (eps_c - eps_u)
        std = lambda e: e.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
        return 0.5 * guided * std(eps_c) / std(guided) + 0.5 * guided

    def cond_fn(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t), dim=-1)[torch.arange(2), labels].sum()
            return 2.0 * torch.autograd.grad(log_p, x)[0]

    z = sample(denoiser, (2, *bundle.latent_shape), bundle.schedule, sampler,
               prediction_type=bundle.prediction_type, seeds=seeds, cond_fn=cond_fn)  # fmt: skip
    with torch.no_grad():
        x = bundle.autoencoder.decode(z / bundle.scale_factor).clamp(-1, 1)
    expected = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # the CFG halves run as one batch of 2B in generate, two batches here: float rounding may flip a level
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)
    assert (got != expected).mean() < 0.01
