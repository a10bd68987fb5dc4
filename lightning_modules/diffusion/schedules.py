"""Noise schedules of the discrete-time Gaussian diffusion process, kept in float64.

Notation (Ho et al. 2020): beta_t is the variance added at step t, alpha_t = 1 - beta_t and
abar_t = prod_{s<=t} alpha_s, so that q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Timesteps are
0-based: index t of every table below describes the (t+1)-th step of the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["BETA_SCHEDULES", "NoiseSchedule", "derived_tables", "extract", "make_betas"]

# Nichol & Dhariwal 2021 cap beta at 0.999 so the last cosine steps do not reach beta = 1 (Sec. 3.2).
_MAX_COSINE_BETA = 0.999


def _linear_betas(num_timesteps: int, beta_start: float, beta_end: float, cosine_s: float) -> Tensor:
    """Ho et al. 2020, Sec. 4: betas increasing linearly from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def _scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float, cosine_s: float) -> Tensor:
    """Rombach et al. 2022 (LDM / Stable Diffusion): sqrt(beta) linear in t."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps: int, beta_start: float, beta_end: float, cosine_s: float) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2).

    beta_t = 1 - abar(t+1) / abar(t), clipped at 0.999.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=_MAX_COSINE_BETA)


BETA_SCHEDULES: dict[str, Callable[[int, float, float, float], Tensor]] = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "cosine": _cosine_betas,
}


def make_betas(
    kind: str,
    num_timesteps: int,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    cosine_s: float = 0.008,
) -> Tensor:
    """Betas of a named schedule, float64 of shape (num_timesteps,).

    kind: "linear" (DDPM), "scaled_linear" (LDM) or "cosine" (improved DDPM; ignores beta_start/beta_end).
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of {sorted(BETA_SCHEDULES)}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    return BETA_SCHEDULES[kind](num_timesteps, beta_start, beta_end, cosine_s)


def _table() -> Any:
    return field(init=False, repr=False, compare=False)


@dataclass(frozen=True)
class NoiseSchedule:
    """A beta schedule and the float64 tables derived from it, each of shape (num_timesteps,).

    Equality and hashing use only the defining fields (the same ones as `to_dict`), so a checkpoint's
    schedule can be compared with the one a sampler or classifier is about to use.
    """

    kind: str
    num_timesteps: int
    beta_start: float = 0.00085
    beta_end: float = 0.012
    cosine_s: float = 0.008

    betas: Tensor = _table()
    alphas: Tensor = _table()
    alphas_cumprod: Tensor = _table()
    alphas_cumprod_prev: Tensor = _table()
    sqrt_alphas_cumprod: Tensor = _table()
    sqrt_one_minus_alphas_cumprod: Tensor = _table()
    posterior_variance: Tensor = _table()
    posterior_mean_coef1: Tensor = _table()
    posterior_mean_coef2: Tensor = _table()
    snr: Tensor = _table()

    def __post_init__(self) -> None:
        betas = make_betas(self.kind, self.num_timesteps, self.beta_start, self.beta_end, self.cosine_s)
        for name, value in derived_tables(betas).items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The defining fields as plain JSON-able values."""
        return {
            "kind": self.kind,
            "num_timesteps": int(self.num_timesteps),
            "beta_start": float(self.beta_start),
            "beta_end": float(self.beta_end),
            "cosine_s": float(self.cosine_s),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSchedule:
        return cls(**d)


def derived_tables(betas: Tensor) -> dict[str, Tensor]:
    """Ho et al. 2020: abar (eq. 4) and the posterior q(x_{t-1} | x_t, x_0) coefficients (eq. 7)."""
    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
        "posterior_variance": betas * (1.0 - abar_prev) / (1.0 - abar),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
        "snr": abar / (1.0 - abar),
    }


def extract(arr: Tensor, t: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Gather arr[t] per sample and reshape it to broadcast against `shape`.

    arr: (T,) table; t: long (B,); returns (B, 1, ..., 1) with len(shape) dims, in `dtype` on t's device.
    """
    # Cast before moving: some devices (MPS) have no float64.
    values = arr.to(dtype).to(t.device)[t]
    return values.reshape(t.shape[0], *([1] * (len(shape) - 1)))
