"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): whole seeded loops against diffusers'
DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2) in float64, and guidance
through the guided eps."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep

from lightning_modules.diffusion import (
    DPMSolverPP2MSampler,
    NoiseSchedule,
    condition_score,
    make_generators,
    make_timesteps,
    sample,
    seeded_noise,
)

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
                    algorithm: str = "dpmsolver++", **config) -> torch.Tensor:  # fmt: skip
    """diffusers' whole loop from our seeded x_T. For "sde-dpmsolver++" its per-step noise is taken in our loop's
    order from the same per-sample generator (one draw per step whose target is not sigma = 0) and handed in
    as variance_noise."""
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        beta_schedule="scaled_linear", prediction_type=DIFFUSERS_PREDICTION[prediction],
        algorithm_type=algorithm, solver_order=2, solver_type="midpoint", **config,
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
    generators = make_generators([seed], "cpu")
    x = seeded_noise([seed], SHAPE[1:], generators, dtype=torch.float64)
    for i, t in enumerate(ref.timesteps):
        noise = {}
        if algorithm.startswith("sde"):  # onto sigma = 0 its coefficient is 0, and our loop draws nothing
            lands_on_zero = float(ref.sigmas[i + 1]) == 0
            noise = {"variance_noise": torch.zeros(SHAPE, dtype=torch.float64) if lands_on_zero
                     else seeded_noise([seed], SHAPE[1:], generators, dtype=torch.float64)}  # fmt: skip
        x = ref.step(_toy_model(x, t.expand(SHAPE[0])), t, x, **noise).prev_sample
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


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize(("num_steps", "final_sigmas_type"), [(1, "zero"), (2, "zero"), (10, "zero"), (20, "zero"),
                                                              (10, "sigma_min"), (20, "sigma_min")])  # fmt: skip
def test_sde_loop_equals_diffusers(prediction, spacing, num_steps, final_sigmas_type, monkeypatch) -> None:
    """SDE-DPM-Solver++(2M) against diffusers' algorithm_type="sde-dpmsolver++" with the same noise."""
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "torch", _Float64Torch())
    schedule = NoiseSchedule("scaled_linear", T)
    expected = _diffusers_loop(schedule, prediction, spacing, num_steps, seed=11, algorithm="sde-dpmsolver++",
                               final_sigmas_type=final_sigmas_type)  # fmt: skip
    sampler = DPMSolverPP2MSampler(num_steps=num_steps, spacing=spacing, algorithm="sde-dpmsolver++",
                                   final_sigmas_type=final_sigmas_type)  # fmt: skip
    got = sample(_toy_model, SHAPE, schedule, sampler, prediction_type=prediction, seeds=[11],
                 dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    ode = sample(_toy_model, SHAPE, schedule, DPMSolverPP2MSampler(num_steps=num_steps, spacing=spacing,
                 final_sigmas_type=final_sigmas_type), prediction_type=prediction, seeds=[11], dtype=torch.float64)  # fmt: skip
    if num_steps > 1 or final_sigmas_type == "sigma_min":
        assert (got - ode).abs().max() > 1e-3  # the noise is used: not the ODE's result


def test_sde_variant_needs_noise_except_onto_sigma_zero_and_refuses_unknown_algorithms() -> None:
    schedule = NoiseSchedule("scaled_linear", T)
    sde = DPMSolverPP2MSampler(num_steps=5, algorithm="sde-dpmsolver++")
    chain = sde.timesteps(schedule).tolist()
    assert [sde.needs_noise(schedule, t, p) for t, p in zip(chain, [*chain[1:], -1])] == [True] * 4 + [False]
    assert not any(DPMSolverPP2MSampler(num_steps=5).needs_noise(schedule, t) for t in chain)
    with pytest.raises(ValueError, match="sde-dpmsolver"):
        DPMSolverPP2MSampler(algorithm="sde")
