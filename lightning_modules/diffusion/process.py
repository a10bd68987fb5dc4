"""The forward process q, its posterior, and the three parameterisations of the network output.

Shapes: x0, x_t, noise and predictions are (B, ...); t is long (B,) of training timesteps in [0, T).
With alpha = sqrt(abar_t) and sigma = sqrt(1 - abar_t), x_t = alpha x0 + sigma eps, and
v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4 and App. D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import NoiseSchedule, extract

__all__ = [
    "PREDICTION_TYPES",
    "convert_prediction",
    "min_snr_weight",
    "q_posterior_mean_variance",
    "q_sample",
    "snr",
    "training_target",
]

PREDICTION_TYPES = ("eps", "v", "x0")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction type {prediction_type!r}; expected one of {list(PREDICTION_TYPES)}"
        )


def _alpha_sigma(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    alpha = extract(schedule.sqrt_alphas_cumprod, t, like.shape, like.dtype)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, like.shape, like.dtype)
    return alpha, sigma


def q_sample(schedule: NoiseSchedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (Ho et al. 2020, eq. 4).

    x0, noise: (B, ...); t: long (B,). Returns (B, ...).
    """
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return alpha * x0 + sigma * noise


def q_posterior_mean_variance(
    schedule: NoiseSchedule, x0: Tensor, x_t: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7).

    x0, x_t: (B, ...); t: long (B,). Returns mean (B, ...) and variance (B, 1, ..., 1); at t = 0 the
    variance is 0 and the mean is x0.
    """
    coef1 = extract(schedule.posterior_mean_coef1, t, x_t.shape, x_t.dtype)
    coef2 = extract(schedule.posterior_mean_coef2, t, x_t.shape, x_t.dtype)
    variance = extract(schedule.posterior_variance, t, x_t.shape, x_t.dtype)
    return coef1 * x0 + coef2 * x_t, variance


def _to_x0_eps(
    pred: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor, from_type: str
) -> tuple[Tensor, Tensor]:
    if from_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if from_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred


def _from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, to_type: str) -> Tensor:
    if to_type == "eps":
        return eps
    if to_type == "x0":
        return x0
    return alpha * eps - sigma * x0


def convert_prediction(
    schedule: NoiseSchedule, pred: Tensor, x_t: Tensor, t: Tensor, from_type: str, to_type: str
) -> Tensor:
    """Convert a network output between the "eps", "v" and "x0" parameterisations at (x_t, t).

    pred, x_t: (B, ...); t: long (B,). Returns (B, ...); `pred` itself when from_type == to_type.
    """
    _check_prediction_type(from_type)
    _check_prediction_type(to_type)
    if from_type == to_type:
        return pred
    alpha, sigma = _alpha_sigma(schedule, t, x_t)
    x0, eps = _to_x0_eps(pred, x_t, alpha, sigma, from_type)
    return _from_x0_eps(x0, eps, alpha, sigma, to_type)


def training_target(
    schedule: NoiseSchedule, prediction_type: str, x0: Tensor, noise: Tensor, t: Tensor
) -> Tensor:
    """The regression target of a network of the given parameterisation for x_t = q_sample(x0, t, noise).

    x0, noise: (B, ...); t: long (B,). Returns (B, ...).
    """
    _check_prediction_type(prediction_type)
    alpha, sigma = _alpha_sigma(schedule, t, x0)
    return _from_x0_eps(x0, noise, alpha, sigma, prediction_type)


def snr(schedule: NoiseSchedule, t: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Signal-to-noise ratio abar_t / (1 - abar_t) (Kingma et al. 2021, Sec. 2). t: long (B,) -> (B,)."""
    return extract(schedule.snr, t, t.shape, dtype)


def _min_snr_table(schedule: NoiseSchedule, gamma: float, prediction_type: str) -> Tensor:
    clipped = schedule.snr.clamp(max=gamma)
    if prediction_type == "eps":
        return clipped / schedule.snr
    if prediction_type == "v":
        return clipped / (schedule.snr + 1)
    return clipped


def min_snr_weight(
    schedule: NoiseSchedule, t: Tensor, gamma: float, prediction_type: str, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, Sec. 3.4), per sample. t: long (B,) -> (B,).

    The weight min(snr, gamma) applies to the x0-loss; an eps-loss equals snr times the x0-loss and a
    v-loss (snr + 1) times it, hence min(snr, gamma) / snr and min(snr, gamma) / (snr + 1).
    """
    _check_prediction_type(prediction_type)
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    return extract(_min_snr_table(schedule, gamma, prediction_type), t, t.shape, dtype)
