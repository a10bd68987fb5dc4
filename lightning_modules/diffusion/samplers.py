"""DDPM, DDIM and DPM-Solver++(2M) steps on a (possibly respaced) subsequence of the training timesteps.

Samplers never call the model: the loop in `sampling.py` does, converts the output to eps and hands it to
`step`. Symbols used in the steps (t and t' are training timesteps, t' the next one on the sampling chain,
abar_{-1} = 1):

    abar_t, abar_prev   alphas_cumprod[t], alphas_cumprod[t'] (diffusers: alpha_prod_t, alpha_prod_t_prev)
    beta_t'             1 - abar_t / abar_prev, the step's beta on the respaced chain (current_beta_t)
    x0_hat              (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (pred_original_sample)
    sigma_t^2           the step's variance (DDPM: posterior variance; DDIM: eta-scaled, eq. 16)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .guidance import condition_mean, condition_score
from .schedules import NoiseSchedule

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DDPM_VARIANCES",
    "DPM_FINAL_SIGMAS",
    "DPMSolverPP2MSampler",
    "Sampler",
    "TIMESTEP_SPACINGS",
    "make_timesteps",
]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers clamps the DDPM posterior variance at 1e-20 so its square root (and log) stay finite.
_MIN_VARIANCE = 1e-20


def make_timesteps(num_train_timesteps: int, num_steps: int, spacing: str) -> Tensor:
    """Descending training timesteps visited by a sampler of `num_steps` steps, long (num_steps,).

    The spacings of Lin et al. 2023, Table 2, exactly as diffusers' DDIMScheduler.set_timesteps with
    steps_offset=0: "leading" k * (T // n); "trailing" round(T - k * T / n) - 1; "linspace"
    round(linspace(0, T - 1, n)). Every spacing gives exactly n distinct timesteps in [0, T) for every n in
    [1, T]. diffusers' "trailing" (`np.arange(T, 0, -T / n)`) gets one element too many for 62 of the
    n in [1, 1000] (the float step overshoots; the extra timestep is -1, whose abar_prev = 1 step then
    divides by 1 - abar = 0): the chain here is its first n elements, equal to diffusers' wherever
    diffusers returns n.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (num_train_timesteps // num_steps)
    elif spacing == "trailing":
        # The same float arange as diffusers (so ties round the same way), cut at n.
        steps = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps))[:num_steps] - 1
    else:
        steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
    return torch.from_numpy(steps.astype(np.int64).copy())


def _prev_timestep(timesteps: Tensor, t: int) -> int:
    """The timestep after t on the descending chain, -1 after the last one."""
    matches = (timesteps == t).nonzero()
    if matches.numel() == 0:
        raise ValueError(f"timestep {t} is not on this sampler's chain")
    index = int(matches[0, 0])
    return int(timesteps[index + 1]) if index + 1 < timesteps.numel() else -1


def _abar(schedule: NoiseSchedule, t: int) -> float:
    return float(schedule.alphas_cumprod[t]) if t >= 0 else 1.0


def _predict_x0(x_t: Tensor, eps: Tensor, abar_t: float) -> Tensor:
    """Ho et al. 2020, eq. 4 solved for x0."""
    return (x_t - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)


def _predict_eps(x_t: Tensor, x0: Tensor, abar_t: float) -> Tensor:
    return (x_t - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)


def _add_noise(mean: Tensor, variance: float, noise: Tensor | None) -> Tensor:
    if variance == 0.0:
        return mean
    if noise is None:
        raise ValueError("this step is stochastic (variance > 0) but no noise was given")
    return mean + math.sqrt(variance) * noise


class Sampler(Protocol):
    """What the sampling loop needs from a sampler.

    The loop computes the chain once (`timesteps`) and hands each step its successor `prev_t` (-1 after
    the last step); without it, `needs_noise` and `step` look t up on the chain themselves (one-off calls).
    A multistep sampler (DPM-Solver++(2M)) returns a `state` entry from `step`; the loop passes it back as
    `state=` to the next step of the same chain. Samplers that return none are never given one.
    """

    def timesteps(self, schedule: NoiseSchedule) -> Tensor: ...

    def needs_noise(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> bool: ...

    def step(
        self,
        schedule: NoiseSchedule,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None,
        grad: Tensor | None = None,
        prev_t: int | None = None,
    ) -> dict[str, Tensor | float]: ...


class _RespacedSampler:
    """Timestep bookkeeping shared by the samplers (a mixin: the dataclass fields live in each sampler)."""

    num_steps: int
    spacing: str
    clip_x0: float | None

    def __post_init__(self) -> None:
        if self.spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"unknown timestep spacing {self.spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}"
            )
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    def timesteps(self, schedule: NoiseSchedule) -> Tensor:
        """Training timesteps visited, descending, long (num_steps,)."""
        return make_timesteps(schedule.num_timesteps, self.num_steps, self.spacing)

    def prev_timestep(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> int:
        """The next (smaller) timestep of the chain after t; -1 after the last step. A given `prev_t` (the
        loop's, from the chain it computed once) is used as is: rebuilding the chain on every step costs a
        `make_timesteps` and a search per call."""
        return _prev_timestep(self.timesteps(schedule), t) if prev_t is None else int(prev_t)

    def _x0_and_eps(self, x_t: Tensor, eps: Tensor, abar_t: float) -> tuple[Tensor, Tensor]:
        """x0_hat, optionally clipped, and the eps consistent with it (guided-diffusion's DDIM does the same)."""
        x0 = _predict_x0(x_t, eps, abar_t)
        if self.clip_x0 is None:
            return x0, eps
        x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0, _predict_eps(x_t, x0, abar_t)


# The two fixed reverse-step variances of Ho et al. 2020, Sec. 3.2: the posterior's beta~_t (the lower bound)
# and beta_t (the upper bound); diffusers' DDPMScheduler variance_type names.
DDPM_VARIANCES = ("fixed_small", "fixed_large")


@dataclass
class DDPMSampler(_RespacedSampler):
    """Ancestral sampling with the posterior mean of q(x_t' | x_t, x0_hat) (Ho et al. 2020, eq. 6-7, Algorithm 2).

    On a respaced chain the step uses beta_t' = 1 - abar_t / abar_prev (Nichol & Dhariwal 2021, Sec. 4;
    diffusers' DDPMScheduler with num_inference_steps < T). `variance`: "fixed_small" is the posterior
    variance beta~_t' = (1 - abar_prev) / (1 - abar_t) * beta_t' (equal to DDIM with eta = 1); "fixed_large"
    is beta_t' itself, improved-diffusion's default for a model trained without a learned variance
    (`sigma_small=False`: ModelVarType.FIXED_LARGE), the fixed baseline of Nichol & Dhariwal 2021, Sec. 3.1.
    The chain's last step adds no noise with either (guided-diffusion: none at t = 0). Classifier guidance
    shifts the step's mean by variance * grad.
    """

    num_steps: int = 1000
    spacing: str = "leading"
    clip_x0: float | None = None
    variance: str = "fixed_small"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance not in DDPM_VARIANCES:
            raise ValueError(
                f"unknown DDPM variance {self.variance!r}; expected one of {list(DDPM_VARIANCES)}"
            )

    def needs_noise(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> bool:
        return self.prev_timestep(schedule, t, prev_t) >= 0

    def mean_variance(
        self, schedule: NoiseSchedule, eps: Tensor, t: int, x_t: Tensor, prev_t: int | None = None
    ) -> dict[str, Tensor | float]:
        """Mean (B, ...) and variance (float) of p(x_t' | x_t), and x0_hat (B, ...)."""
        abar_t = _abar(schedule, t)
        abar_prev = _abar(schedule, self.prev_timestep(schedule, t, prev_t))
        beta = 1.0 - abar_t / abar_prev
        # 1. x0_hat from eps (Ho et al. eq. 4 / eq. 15 solved for x0).
        x0, _ = self._x0_and_eps(x_t, eps, abar_t)
        # 2. Posterior mean on the respaced chain (Ho et al. eq. 7 with beta_t -> beta_t').
        coef_x0 = math.sqrt(abar_prev) * beta / (1.0 - abar_t)
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        # 3. beta~_t' (posterior) or beta_t'; exactly 0 on the last step, where abar_prev = 1.
        if abar_prev >= 1.0:
            variance = 0.0
        elif self.variance == "fixed_large":
            variance = beta
        else:
            variance = max((1.0 - abar_prev) / (1.0 - abar_t) * beta, _MIN_VARIANCE)
        return {"mean": mean, "variance": variance, "pred_x0": x0}

    def step(
        self,
        schedule: NoiseSchedule,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None,
        grad: Tensor | None = None,
        prev_t: int | None = None,
    ) -> dict[str, Tensor | float]:
        """One reverse step from training timestep t to the next one of the chain.

        eps, x_t, noise, grad: (B, ...); noise may be None on the last step; grad is the scaled
        classifier gradient at (x_t, t) (guided-diffusion `condition_mean`); prev_t: the next timestep of the
        chain when the caller knows it (see `prev_timestep`). Returns prev_sample,
        pred_x0 and the (guided) mean, all (B, ...), and the variance (float).
        """
        out = self.mean_variance(schedule, eps, t, x_t, prev_t)
        if grad is not None:
            out["mean"] = condition_mean(out["mean"], out["variance"], grad)
        out["prev_sample"] = _add_noise(out["mean"], out["variance"], noise)
        return out


@dataclass
class DDIMSampler(_RespacedSampler):
    """DDIM (Song et al. 2021, eq. 12), with sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t))
    sqrt(1 - abar_t / abar_prev) (eq. 16): eta = 0 is deterministic, eta = 1 is DDPM's variance.

    Classifier guidance replaces eps by eps - sqrt(1 - abar_t) grad (guided-diffusion `condition_score`).
    """

    num_steps: int = 50
    eta: float = 0.0
    spacing: str = "leading"
    clip_x0: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {self.eta}")

    def needs_noise(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> bool:
        return self.eta > 0 and self.prev_timestep(schedule, t, prev_t) >= 0

    def step(
        self,
        schedule: NoiseSchedule,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None,
        grad: Tensor | None = None,
        prev_t: int | None = None,
    ) -> dict[str, Tensor | float]:
        """One DDIM step from training timestep t to the next one of the chain.

        eps, x_t, noise, grad: (B, ...); noise is needed only when eta > 0; grad is the scaled classifier
        gradient at (x_t, t); prev_t: the next timestep of the chain when the caller knows it. Returns
        prev_sample, pred_x0 and the deterministic part `mean`, all (B, ...),
        and the variance sigma_t^2 (float).
        """
        abar_t = _abar(schedule, t)
        abar_prev = _abar(schedule, self.prev_timestep(schedule, t, prev_t))
        if grad is not None:
            t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
            eps = condition_score(schedule, eps, x_t, t_batch, grad)
        # 1. x0_hat, and eps recomputed from it if x0_hat was clipped.
        x0, eps = self._x0_and_eps(x_t, eps, abar_t)
        # 2. sigma_t^2 (eq. 16).
        variance = self.eta**2 * (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
        # 3. "direction pointing to x_t" and the deterministic part of eq. 12.
        mean = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - variance, 0.0)) * eps
        return {
            "prev_sample": _add_noise(mean, variance, noise),
            "pred_x0": x0,
            "mean": mean,
            "variance": variance,
        }


# --- DPM-Solver++(2M) -------------------------------------------------------------------------------------

DPM_FINAL_SIGMAS = ("zero", "sigma_min")
DPM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")  # diffusers' algorithm_type names


def _alpha_sigma_lambda(abar: float) -> tuple[float, float, float]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the half log-SNR
    lambda_t = log(alpha_t / sigma_t) (Lu et al. 2022, Sec. 2); abar = 1 (sigma = 0) gives lambda = +inf."""
    alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
    return alpha, sigma, (math.log(alpha) - math.log(sigma)) if sigma > 0 else math.inf


@dataclass
class DPMSolverPP2MSampler(_RespacedSampler):
    """DPM-Solver++(2M): the multistep second-order data-prediction solver of Lu et al. 2022
    ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Algorithm 2;
    diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint").

    Symbols of a step from s0 = t to t' (s1: the chain's previous timestep; diffusers' names in brackets):

        x0_i           the data prediction at s_i, from the (guided) eps (convert_model_output's result)
        h, h_0         lambda_t' - lambda_s0, lambda_s0 - lambda_s1; r0 = h_0 / h
        first order    x_t' = (sigma_t' / sigma_s0) x_t - alpha_t' (e^-h - 1) x0_0   (= DDIM; Lu et al. eq. 5)
        second order   the same with D = x0_0 + (x0_0 - x0_1) / (2 r0) for x0_0     (Algorithm 2, line 6)

    The first step is first order (no history yet), and so is the last one when `final_sigmas_type` is
    "zero" (the chain ends at sigma = 0, i.e. x0) or when `lower_order_final` and fewer than 15 steps
    (diffusers' numerical-stability choice). final_sigmas_type "sigma_min" ends at the noise level of
    training timestep 0 instead of 0. The ODE (the default) never needs noise. Classifier guidance goes through
    the guided eps, eps - sqrt(1 - abar_t) grad (guided-diffusion `condition_score`), before x0 is formed.

    `algorithm` "sde-dpmsolver++" is the stochastic variant (Lu et al. 2022, Appendix B, "SDE-DPM-Solver++2M";
    diffusers' algorithm_type="sde-dpmsolver++", midpoint): it solves the reverse SDE instead of the
    probability-flow ODE, with the same data prediction D and fresh noise z ~ N(0, I) on every step that does
    not land on sigma = 0:

        x_t' = (sigma_t' / sigma_s0) e^-h x_t + alpha_t' (1 - e^-2h) D + sigma_t' sqrt(1 - e^-2h) z

    Multistep state: `step` returns the data prediction and its timestep as `state`; the sampling loop
    passes it back as `state=` on the next step of the same chain (`sampling.sample`). Without it (the first
    step, or a one-off call) the step is first order.
    """

    num_steps: int = 20
    spacing: str = "trailing"
    clip_x0: float | None = None
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"
    algorithm: str = "dpmsolver++"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.final_sigmas_type not in DPM_FINAL_SIGMAS:
            raise ValueError(
                f"unknown final_sigmas_type {self.final_sigmas_type!r}; expected one of {list(DPM_FINAL_SIGMAS)}"
            )
        if self.algorithm not in DPM_ALGORITHMS:
            raise ValueError(f"unknown DPM-Solver++ algorithm {self.algorithm!r}; expected one of {list(DPM_ALGORITHMS)}")

    def needs_noise(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> bool:
        """The SDE variant draws noise on every step whose target is not sigma = 0; the ODE never does."""
        return self.algorithm == "sde-dpmsolver++" and self._target_abar(
            schedule, self.prev_timestep(schedule, t, prev_t)
        ) < 1.0

    def _target_abar(self, schedule: NoiseSchedule, prev: int) -> float:
        """abar at the step's target: the chain's next timestep, or the final sigma after the last step."""
        if prev >= 0:
            return _abar(schedule, prev)
        return 1.0 if self.final_sigmas_type == "zero" else _abar(schedule, 0)

    def _first_order_at_last_step(self) -> bool:
        return self.final_sigmas_type == "zero" or (self.lower_order_final and self.num_steps < 15)

    def step(
        self,
        schedule: NoiseSchedule,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None,
        grad: Tensor | None = None,
        prev_t: int | None = None,
        state: dict[str, Tensor | int] | None = None,
    ) -> dict[str, Tensor | float | dict]:
        """One DPM-Solver++(2M) step from training timestep t to the next one of the chain.

        eps, x_t, grad: (B, ...); noise: (B, ...) N(0, I) for the SDE variant when `needs_noise`, else
        unused; grad: the scaled classifier gradient at (x_t, t); prev_t: the next timestep of the chain (-1
        after the last step); state: the previous step's `state` (None on the first step). Returns
        prev_sample and pred_x0 (B, ...), the variance of the added noise (0.0 for the ODE) and `state` for the
        next step.
        """
        prev = self.prev_timestep(schedule, t, prev_t)
        abar_s0 = _abar(schedule, t)
        if grad is not None:
            t_batch = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
            eps = condition_score(schedule, eps, x_t, t_batch, grad)
        # 1. The data prediction x0_0 at s0 (convert_model_output of dpmsolver++).
        x0, _ = self._x0_and_eps(x_t, eps, abar_s0)
        # 2. Step size in lambda.
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self._target_abar(schedule, prev))
        _, sigma_s0, lambda_s0 = _alpha_sigma_lambda(abar_s0)
        phi = math.expm1(-(lambda_t - lambda_s0)) if math.isfinite(lambda_t) else -1.0  # e^-h - 1
        # 3. D: x0_0 (first order) or the second-order combination with the previous data prediction.
        first_order = state is None or (prev < 0 and self._first_order_at_last_step())
        d = x0
        if not first_order:
            _, _, lambda_s1 = _alpha_sigma_lambda(_abar(schedule, int(state["t"])))
            h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
            # 1 / r0 = h / h_0 (h = 0 when a sigma_min final step starts at timestep 0: no correction).
            d = x0 + 0.5 * (h / h_0) * (x0 - state["x0"])
        if self.algorithm == "dpmsolver++":
            # 4. x_t' = (sigma_t' / sigma_s0) x_t - alpha_t' (e^-h - 1) D.
            prev_sample = (sigma_t / sigma_s0) * x_t - (alpha_t * phi) * d
            return {"prev_sample": prev_sample, "pred_x0": x0, "variance": 0.0, "state": {"x0": x0, "t": t}}
        # 4'. SDE: x_t' = (sigma_t' / sigma_s0) e^-h x_t + alpha_t' (1 - e^-2h) D + sigma_t' sqrt(1 - e^-2h) z.
        finite = math.isfinite(lambda_t)
        e_h = math.exp(-(lambda_t - lambda_s0)) if finite else 0.0
        one_minus_e_2h = -math.expm1(-2.0 * (lambda_t - lambda_s0)) if finite else 1.0
        variance = sigma_t**2 * one_minus_e_2h
        mean = (sigma_t / sigma_s0 * e_h) * x_t + (alpha_t * one_minus_e_2h) * d
        return {"prev_sample": _add_noise(mean, variance, noise), "pred_x0": x0, "mean": mean,
                "variance": variance, "state": {"x0": x0, "t": t}}  # fmt: skip
