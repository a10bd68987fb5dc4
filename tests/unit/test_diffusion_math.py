"""Schedules, forward process, parameterisations, timestep spacings, DDPM/DDIM steps and the sampling loop.

References: closed forms written out with numpy, and diffusers' DDPMScheduler / DDIMScheduler.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from lightning_modules.diffusion import (
    DDIMSampler,
    DDPMSampler,
    NoiseSchedule,
    convert_prediction,
    extract,
    make_betas,
    make_generators,
    make_timesteps,
    min_snr_weight,
    q_posterior_mean_variance,
    q_sample,
    sample,
    seeded_noise,
    snr,
    training_target,
)

T = 1000
SHAPE = (2, 3, 4, 4)
DIFFUSERS_KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _np_betas(kind: str, n: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    if kind == "linear":
        return np.linspace(beta_start, beta_end, n)
    if kind == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), n) ** 2
    # Nichol & Dhariwal 2021, eq. 17, one step at a time as guided-diffusion's betas_for_alpha_bar.
    f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)])


def _diffusers(cls, schedule: NoiseSchedule, **kwargs):
    """A diffusers scheduler on the same betas, its tables replaced by ours in float64.

    The betas themselves are compared with diffusers' own float32 ones in a separate test; here the
    step formulas are compared at float64 precision.
    """
    sched = cls(
        num_train_timesteps=schedule.num_timesteps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule=DIFFUSERS_KIND[schedule.kind],
        **{"clip_sample": False, **kwargs},
    )
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- schedules -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_closed_form(kind: str) -> None:
    schedule = NoiseSchedule(kind, T)
    betas = _np_betas(kind, T)
    np.testing.assert_allclose(schedule.betas.numpy(), betas, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-10)
    assert schedule.betas.dtype == torch.float64


def test_cosine_alphas_cumprod_is_f_ratio() -> None:
    """Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0), exact wherever the 0.999 clip is inactive."""
    schedule = NoiseSchedule("cosine", T)
    t = np.arange(1, T + 1) / T
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    unclipped = schedule.betas.numpy() < 0.999
    assert unclipped[:-1].all() and not unclipped[-1]
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[:-1], f[:-1], rtol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(kind: str) -> None:
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule=DIFFUSERS_KIND[kind]
    )
    ours = make_betas(kind, T)
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        NoiseSchedule(kind, T).alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-7
    )


def test_unknown_schedule_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"'sigmoidal'.*cosine.*linear.*scaled_linear"):
        make_betas("sigmoidal", 10)


def test_schedule_dict_round_trip_and_equality() -> None:
    schedule = NoiseSchedule("scaled_linear", 100, beta_start=0.001, beta_end=0.02)
    d = json.loads(json.dumps(schedule.to_dict()))
    again = NoiseSchedule.from_dict(d)
    assert again == schedule and hash(again) == hash(schedule)
    torch.testing.assert_close(again.alphas_cumprod, schedule.alphas_cumprod, rtol=0, atol=0)
    assert NoiseSchedule("scaled_linear", 100, beta_start=0.001, beta_end=0.021) != schedule
    assert NoiseSchedule("linear", 100, beta_start=0.001, beta_end=0.02) != schedule
    assert NoiseSchedule("scaled_linear", 101, beta_start=0.001, beta_end=0.02) != schedule


def test_extract_gathers_and_broadcasts() -> None:
    arr = torch.arange(10, dtype=torch.float64) / 10
    out = extract(arr, torch.tensor([3, 7]), (2, 3, 5, 5), torch.float32)
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([0.3, 0.7])


# --- forward process ----------------------------------------------------------------------------------------


def test_q_sample_analytic() -> None:
    schedule = NoiseSchedule("linear", T)
    abar = np.cumprod(1 - _np_betas("linear", T))
    x0, noise, t = _randn(*SHAPE, seed=1), _randn(*SHAPE, seed=2), torch.tensor([0, 640])
    expected = np.sqrt(abar[t.numpy()])[:, None, None, None] * x0.numpy()
    expected = expected + np.sqrt(1 - abar[t.numpy()])[:, None, None, None] * noise.numpy()
    np.testing.assert_allclose(q_sample(schedule, x0, t, noise).numpy(), expected, rtol=1e-12)


def test_q_sample_empirical_moments() -> None:
    schedule = NoiseSchedule("cosine", T)
    n, x0 = 200_000, torch.tensor([1.5, -0.5], dtype=torch.float64)
    for step in (10, 500, 900):
        t = torch.full((n,), step)
        xt = q_sample(schedule, x0.expand(n, 2), t, _randn(n, 2, seed=step))
        abar = float(np.cumprod(1 - _np_betas("cosine", T))[step])
        # Tolerances are ~5 standard errors of the mean and of the variance.
        torch.testing.assert_close(
            xt.mean(0), math.sqrt(abar) * x0, rtol=0, atol=5 * math.sqrt((1 - abar) / n)
        )
        var = torch.full((2,), 1 - abar, dtype=torch.float64)
        torch.testing.assert_close(xt.var(0), var, rtol=5 * math.sqrt(2 / n), atol=0)


def test_q_posterior_closed_form() -> None:
    """Ho et al. 2020, eq. 7: mu = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(alpha)(1 - abar_prev)/(1 - abar) x_t."""
    schedule = NoiseSchedule("scaled_linear", T)
    betas = _np_betas("scaled_linear", T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x0, xt, t = _randn(*SHAPE, seed=3), _randn(*SHAPE, seed=4), torch.tensor([0, 321])
    mean, var = q_posterior_mean_variance(schedule, x0, xt, t)
    i = t.numpy()
    c0 = (np.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i]))[:, None, None, None]
    ct = (np.sqrt(1 - betas[i]) * (1 - abar_prev[i]) / (1 - abar[i]))[:, None, None, None]
    np.testing.assert_allclose(mean.numpy(), c0 * x0.numpy() + ct * xt.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        var.flatten().numpy(), (1 - abar_prev[i]) / (1 - abar[i]) * betas[i], rtol=1e-10
    )
    torch.testing.assert_close(mean[0], x0[0])  # t = 0: the posterior collapses onto x0.


@pytest.mark.parametrize("source", ["eps", "v", "x0"])
@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_prediction_conversions_round_trip(source: str, target: str) -> None:
    schedule = NoiseSchedule("scaled_linear", T)
    x0, noise, t = _randn(*SHAPE, seed=5), _randn(*SHAPE, seed=6), torch.tensor([20, 870])
    xt = q_sample(schedule, x0, t, noise)
    pred = training_target(schedule, source, x0, noise, t)
    converted = convert_prediction(schedule, pred, xt, t, source, target)
    torch.testing.assert_close(
        converted, training_target(schedule, target, x0, noise, t), rtol=1e-9, atol=1e-9
    )
    torch.testing.assert_close(convert_prediction(schedule, converted, xt, t, target, source), pred)


def test_v_target_matches_diffusers_velocity() -> None:
    schedule = NoiseSchedule("linear", T)
    ref = _diffusers(DDPMScheduler, schedule)
    x0, noise, t = _randn(*SHAPE, seed=7), _randn(*SHAPE, seed=8), torch.tensor([5, 995])
    torch.testing.assert_close(training_target(schedule, "v", x0, noise, t), ref.get_velocity(x0, noise, t))
    torch.testing.assert_close(q_sample(schedule, x0, t, noise), ref.add_noise(x0, noise, t))


def test_unknown_prediction_type_raises() -> None:
    schedule = NoiseSchedule("linear", 10)
    with pytest.raises(ValueError, match="'score'"):
        training_target(
            schedule, "score", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
        )


def test_snr_and_min_snr_weights_closed_form() -> None:
    schedule = NoiseSchedule("linear", T)
    abar = np.cumprod(1 - _np_betas("linear", T))
    t = torch.tensor([0, 50, 200, 999])
    s = abar[t.numpy()] / (1 - abar[t.numpy()])
    gamma = 5.0
    assert s[0] > gamma > s[-1]  # both branches of the min are exercised
    np.testing.assert_allclose(snr(schedule, t, dtype=torch.float64).numpy(), s, rtol=1e-12)
    expected = {
        "eps": np.minimum(s, gamma) / s,
        "v": np.minimum(s, gamma) / (s + 1),
        "x0": np.minimum(s, gamma),
    }
    for kind, weights in expected.items():
        got = min_snr_weight(schedule, t, gamma, kind, dtype=torch.float64).numpy()
        np.testing.assert_allclose(got, weights, rtol=1e-12)
    assert min_snr_weight(schedule, t, gamma, "eps").dtype == torch.float32


# --- timesteps --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(("num_train", "num_steps"), [(1000, 50), (1000, 7), (1000, 1000), (100, 3), (10, 1)])
def test_make_timesteps_matches_diffusers(spacing: str, num_train: int, num_steps: int) -> None:
    ref = DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(num_steps)
    ours = make_timesteps(num_train, num_steps, spacing)
    assert ours.dtype == torch.long
    assert ours.tolist() == ref.timesteps.tolist()
    assert (ours.diff() < 0).all()


@pytest.mark.parametrize(
    ("args", "match"), [((100, 10, "uniform"), "'uniform'"), ((100, 101, "leading"), "101")]
)
def test_make_timesteps_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_timesteps(*args)


def test_sampler_constructors() -> None:
    assert DDIMSampler(20, 0.5) == DDIMSampler(num_steps=20, eta=0.5, spacing="leading")
    assert DDPMSampler(20, "trailing").spacing == "trailing"
    with pytest.raises(ValueError, match="'uniform'"):
        DDPMSampler(spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(eta=-0.1)


# --- single steps against diffusers -------------------------------------------------------------------------


def _chain_points(timesteps: torch.Tensor) -> list[int]:
    """First, a middle and the last timestep of a chain (the last one exercises abar_prev = 1)."""
    return sorted({int(timesteps[0]), int(timesteps[len(timesteps) // 2]), int(timesteps[-1])}, reverse=True)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    ("num_steps", "spacing"),
    [(1000, "leading"), (50, "leading"), (7, "leading"), (8, "trailing"), (9, "linspace")],
)
def test_ddpm_step_matches_diffusers(prediction_type: str, num_steps: int, spacing: str) -> None:
    schedule = NoiseSchedule("scaled_linear", T)
    ref = _diffusers(
        DDPMScheduler,
        schedule,
        prediction_type=DIFFUSERS_PREDICTION[prediction_type],
        timestep_spacing=spacing,
    )
    ref.set_timesteps(num_steps)
    sampler = DDPMSampler(num_steps=num_steps, spacing=spacing)
    assert sampler.timesteps(schedule).tolist() == ref.timesteps.tolist()
    xt, output = _randn(*SHAPE, seed=10), _randn(*SHAPE, seed=11)
    for t in _chain_points(ref.timesteps):
        expected = ref.step(output, t, xt, generator=torch.Generator().manual_seed(t))
        t_batch = torch.full((SHAPE[0],), t)
        eps = convert_prediction(schedule, output, xt, t_batch, prediction_type, "eps")
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        got = sampler.step(schedule, eps, t, xt, noise)
        torch.testing.assert_close(got["pred_x0"], expected.pred_original_sample, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["prev_sample"], expected.prev_sample, rtol=1e-9, atol=1e-9)


def test_ddpm_step_matches_diffusers_float32() -> None:
    """Unmodified diffusers (float32 tables) against ours on float32 samples."""
    schedule = NoiseSchedule("linear", T)
    ref = DDPMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, clip_sample=False)
    ref.set_timesteps(25)
    xt, eps = _randn(*SHAPE, seed=12).float(), _randn(*SHAPE, seed=13).float()
    for t in _chain_points(ref.timesteps):
        expected = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(1)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        got = DDPMSampler(num_steps=25).step(schedule, eps, t, xt, noise)["prev_sample"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("num_steps", "spacing"), [(1000, "leading"), (50, "leading"), (9, "linspace"), (8, "trailing")]
)
def test_ddpm_fixed_large_variance_is_beta_and_matches_diffusers(num_steps: int, spacing: str) -> None:
    """variance="fixed_large": sigma^2 = beta_t' = 1 - abar_t / abar_prev on every step but the last (Ho et al.
    2020, Sec. 3.2), diffusers' DDPMScheduler(variance_type="fixed_large") wherever diffusers adds noise (t > 0
    and a next timestep on the chain); the mean is the posterior mean of fixed_small's step."""
    schedule = NoiseSchedule("scaled_linear", T)
    ref = _diffusers(DDPMScheduler, schedule, variance_type="fixed_large", timestep_spacing=spacing)
    ref.set_timesteps(num_steps)
    large = DDPMSampler(num_steps=num_steps, spacing=spacing, variance="fixed_large")
    small = DDPMSampler(num_steps=num_steps, spacing=spacing)
    chain = large.timesteps(schedule)
    assert chain.tolist() == ref.timesteps.tolist()
    abar = schedule.alphas_cumprod.double()
    xt, eps = _randn(*SHAPE, seed=16), _randn(*SHAPE, seed=17)
    for t in _chain_points(ref.timesteps):
        prev = large.prev_timestep(schedule, t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        got, mean_small = large.step(schedule, eps, t, xt, noise), small.step(schedule, eps, t, xt, noise)
        torch.testing.assert_close(got["mean"], mean_small["mean"], rtol=0, atol=0)
        if prev < 0:  # the last step: no noise (diffusers adds beta_t' noise there when t > 0)
            assert got["variance"] == 0.0 and torch.equal(got["prev_sample"], got["mean"])
            continue
        assert got["variance"] == pytest.approx(float(1 - abar[t] / abar[prev]), rel=1e-12)
        assert got["variance"] > mean_small["variance"]
        expected = ref.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(got["prev_sample"], expected, rtol=1e-9, atol=1e-9)


def test_ddpm_rejects_an_unknown_variance() -> None:
    with pytest.raises(ValueError, match=r"'learned_range'.*fixed_small.*fixed_large"):
        DDPMSampler(num_steps=10, variance="learned_range")


def test_ddpm_full_chain_step_is_the_posterior() -> None:
    schedule = NoiseSchedule("cosine", T)
    xt, eps = _randn(*SHAPE, seed=14), _randn(*SHAPE, seed=15)
    for t in (999, 400, 1):
        out = DDPMSampler().mean_variance(schedule, eps, t, xt)
        mean, var = q_posterior_mean_variance(schedule, out["pred_x0"], xt, torch.full((SHAPE[0],), t))
        torch.testing.assert_close(out["mean"], mean)
        assert out["variance"] == pytest.approx(float(var[0]), rel=1e-12)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
    ("num_steps", "spacing"), [(1000, "leading"), (50, "leading"), (7, "leading"), (8, "trailing")]
)
def test_ddim_step_matches_diffusers(prediction_type: str, eta: float, num_steps: int, spacing: str) -> None:
    schedule = NoiseSchedule("linear", T)
    ref = _diffusers(
        DDIMScheduler,
        schedule,
        prediction_type=DIFFUSERS_PREDICTION[prediction_type],
        timestep_spacing=spacing,
    )
    ref.set_timesteps(num_steps)
    sampler = DDIMSampler(num_steps=num_steps, eta=eta, spacing=spacing)
    xt, output, noise = _randn(*SHAPE, seed=16), _randn(*SHAPE, seed=17), _randn(*SHAPE, seed=18)
    for t in _chain_points(ref.timesteps):
        expected = ref.step(output, t, xt, eta=eta, variance_noise=noise if eta > 0 else None)
        eps = convert_prediction(schedule, output, xt, torch.full((SHAPE[0],), t), prediction_type, "eps")
        got = sampler.step(schedule, eps, t, xt, noise if sampler.needs_noise(schedule, t) else None)
        torch.testing.assert_close(got["pred_x0"], expected.pred_original_sample, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got["prev_sample"], expected.prev_sample, rtol=1e-9, atol=1e-9)


def test_ddim_clipped_x0_matches_diffusers_clipped_model_output() -> None:
    schedule = NoiseSchedule("linear", T)
    ref = _diffusers(DDIMScheduler, schedule, clip_sample=True, clip_sample_range=1.0)
    ref.set_timesteps(20)
    xt, eps = 3 * _randn(*SHAPE, seed=19), _randn(*SHAPE, seed=20)
    for t in _chain_points(ref.timesteps):
        expected = ref.step(eps, t, xt, eta=0.0, use_clipped_model_output=True)
        got = DDIMSampler(num_steps=20, clip_x0=1.0).step(schedule, eps, t, xt, None)
        assert got["pred_x0"].abs().max() <= 1.0
        torch.testing.assert_close(got["prev_sample"], expected.prev_sample, rtol=1e-9, atol=1e-9)


def test_ddim_linspace_uses_next_timestep_of_its_chain() -> None:
    """Song et al. 2021 eq. 12/16 written out, with t' the next timestep of the linspace chain.

    (diffusers' DDIMScheduler uses t - T // n here, which is not on its own linspace chain.)
    """
    schedule = NoiseSchedule("linear", T)
    sampler = DDIMSampler(num_steps=9, eta=0.5, spacing="linspace")
    chain = sampler.timesteps(schedule).tolist()
    t, t_prev = chain[3], chain[4]
    assert sampler.prev_timestep(schedule, t) == t_prev
    xt, eps, noise = _randn(*SHAPE, seed=21), _randn(*SHAPE, seed=22), _randn(*SHAPE, seed=23)
    a_t, a_p = float(schedule.alphas_cumprod[t]), float(schedule.alphas_cumprod[t_prev])
    x0 = (xt - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    sigma = 0.5 * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
    expected = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma**2) * eps + sigma * noise
    torch.testing.assert_close(sampler.step(schedule, eps, t, xt, noise)["prev_sample"], expected)


def test_stochastic_step_without_noise_raises() -> None:
    schedule = NoiseSchedule("linear", T)
    with pytest.raises(ValueError, match="noise"):
        DDPMSampler(num_steps=10).step(schedule, _randn(*SHAPE), 900, _randn(*SHAPE), None)


# --- whole loops ----------------------------------------------------------------------------------------------


def _toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in network, elementwise so that results cannot depend on the batch."""
    return 0.3 * x + 0.1 * torch.sin(t.to(x.dtype) / 100).view(-1, *([1] * (x.ndim - 1)))


def _diffusers_loop(ref, shape: tuple[int, ...], seed: int, num_steps: int, **step_kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ref.set_timesteps(num_steps)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    for t in ref.timesteps:
        eps = _toy_eps(x, t.expand(shape[0]))
        x = ref.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sampling_loop_matches_diffusers_loop(kind: str) -> None:
    """Whole seeded loops (initial noise and every step's noise from one generator) against diffusers."""
    schedule = NoiseSchedule("scaled_linear", T)
    shape = (1, 2, 3, 3)
    if kind == "ddpm":
        ref, sampler, kwargs = _diffusers(DDPMScheduler, schedule), DDPMSampler(num_steps=10), {}
    else:
        ref, kwargs = _diffusers(DDIMScheduler, schedule, timestep_spacing="trailing"), {"eta": 0.5}
        sampler = DDIMSampler(num_steps=10, eta=0.5, spacing="trailing")
    expected = _diffusers_loop(ref, shape, seed=42, num_steps=10, **kwargs)
    got = sample(_toy_eps, shape, schedule, sampler, seeds=[42], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "sampler",
    [DDIMSampler(num_steps=7, eta=0.5, spacing="trailing"), DDPMSampler(num_steps=7, spacing="linspace")],
    ids=["ddim", "ddpm"],
)
def test_sample_computes_the_timestep_chain_once(sampler, monkeypatch) -> None:
    """One `make_timesteps` per `sample()` call, not one per step, and bit for bit the loop in which each
    step looks its successor up on the chain itself (steps called without prev_t)."""
    from lightning_modules.diffusion import samplers

    schedule, seeds = NoiseSchedule("scaled_linear", T), [3, 4]
    generators = make_generators(seeds)
    by_lookup = seeded_noise(seeds, SHAPE[1:], generators)
    for t in sampler.timesteps(schedule).tolist():
        eps = _toy_eps(by_lookup, torch.full((SHAPE[0],), t))
        noise = seeded_noise(seeds, SHAPE[1:], generators) if sampler.needs_noise(schedule, t) else None
        by_lookup = sampler.step(schedule, eps, t, by_lookup, noise)["prev_sample"]
    calls = []
    real = samplers.make_timesteps
    monkeypatch.setattr(samplers, "make_timesteps", lambda *args: calls.append(args) or real(*args))
    got = sample(_toy_eps, SHAPE, schedule, sampler, seeds=seeds)
    assert calls == [(T, 7, sampler.spacing)]
    assert torch.equal(got, by_lookup)


def test_ddim_eta0_is_deterministic_and_draws_no_step_noise() -> None:
    schedule = NoiseSchedule("linear", T)
    sampler = DDIMSampler(num_steps=10)
    assert not any(sampler.needs_noise(schedule, t) for t in sampler.timesteps(schedule).tolist())
    first = sample(_toy_eps, SHAPE, schedule, sampler, seeds=[1, 2])
    torch.manual_seed(123)  # the global RNG must play no part
    assert torch.equal(first, sample(_toy_eps, SHAPE, schedule, sampler, seeds=[1, 2]))


@pytest.mark.parametrize(
    "sampler", [DDIMSampler(num_steps=20), DDPMSampler(num_steps=20)], ids=["ddim", "ddpm"]
)
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
def test_perfect_oracle_recovers_single_data_point(sampler, prediction_type: str) -> None:
    """With data = {x*}, the optimal network knows x*; every reverse chain must end exactly at x*."""
    schedule = NoiseSchedule("cosine", T)
    x_star = _randn(1, 3, 4, 4, seed=24).expand(SHAPE)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return convert_prediction(schedule, x_star, x, t, "x0", prediction_type)

    out = sample(
        oracle, SHAPE, schedule, sampler, prediction_type=prediction_type, seeds=[0, 1], dtype=torch.float64
    )
    torch.testing.assert_close(out, x_star, rtol=0, atol=1e-6)


def test_seeded_noise_is_independent_of_batch() -> None:
    alone = seeded_noise([3], (2, 4, 4))
    batch = seeded_noise(torch.tensor([0, 1, 2, 3]), (2, 4, 4))
    assert torch.equal(alone[0], batch[3])
    assert torch.equal(alone[0], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3)))


def test_seeded_noise_continues_given_generators() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    first, second = seeded_noise([5, 6], (3,), gens), seeded_noise([5, 6], (3,), gens)
    reference = torch.randn(2, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.stack([first[1], second[1]]), reference)


@pytest.mark.parametrize(
    "sampler", [DDPMSampler(num_steps=8), DDIMSampler(num_steps=8, eta=1.0)], ids=["ddpm", "ddim_eta1"]
)
def test_sample_is_independent_of_batch(sampler) -> None:
    """Per-step noise is per-sample seeded too: sample 7 is the same alone or in a batch of 4."""
    schedule = NoiseSchedule("linear", T)
    alone = sample(_toy_eps, (1, 2, 4, 4), schedule, sampler, seeds=[7])
    batch = sample(_toy_eps, (4, 2, 4, 4), schedule, sampler, seeds=[5, 6, 7, 8])
    assert torch.equal(alone[0], batch[2])
    assert not torch.equal(batch[0], batch[2])
