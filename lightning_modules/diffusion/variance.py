"""Improved DDPM (Nichol & Dhariwal 2021): the learned-range variance, the VLB terms, the hybrid loss and
ancestral sampling with the learned variance on respaced chains.

A model with `variance_type="learned_range"` outputs 2C channels: the prediction (eps, v or x0) and C
values v in [-1, 1] (unconstrained; guided-diffusion maps them with (v + 1) / 2) that interpolate the
log-variance of each reverse step between the two extremes beta_t and beta~_t (eq. 15):

    log Sigma_theta(x_t, t) = frac log beta_t + (1 - frac) log beta~_t,   frac = (v + 1) / 2.

Symbols (guided-diffusion's names in brackets), all per chain index i of a possibly respaced chain whose
betas are recomputed as beta_i = 1 - abar_{t_i} / abar_{t_{i-1}} (guided-diffusion `respace.py`):

    log_betas                      log beta_i (the "max_log")
    posterior_log_variance_clipped log beta~_i, with beta~_0 (= 0) replaced by beta~_1 (the "min_log")

t = 0 on latents: guided-diffusion's L_0 is the discretized Gaussian decoder NLL of 8-bit pixels; latents
are continuous, so L_0 here is the continuous Gaussian NLL -log N(x0; mu_theta(x_1), Sigma_theta(x_1)) in
bits per dim. It is the exact continuous-data decoder term of the VLB (Kingma et al. 2021, VDM, eq. 7 with a
Gaussian decoder), and it trains Sigma_theta at t = 0 towards the mean's actual squared error, where the
KL against q(x_{-1} | ...) is undefined (beta~_0 = 0) and its clipped stand-in beta~_1 would bias it.

Pure tensor math; no Lightning (docs/ARCHITECTURE.md, "Layers").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from .guidance import condition_mean
from .process import convert_prediction
from .samplers import _RespacedSampler
from .schedules import NoiseSchedule, derived_tables, extract

__all__ = [
    "VARIANCE_TYPES",
    "IDDPMSampler",
    "VarianceTables",
    "check_sampler_variance",
    "check_variance_type",
    "gaussian_nll",
    "hybrid_vlb_term",
    "learned_range_log_variance",
    "normal_kl",
    "p_mean_variance",
    "respaced_betas",
    "split_model_output",
    "vb_terms_bpd",
]

VARIANCE_TYPES = ("fixed_small", "learned_range")
# Nichol & Dhariwal 2021, Sec. 3.1: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001.
HYBRID_LAMBDA = 1e-3


def check_variance_type(variance_type: str) -> None:
    """Raise ValueError naming the value and the choices for an unknown variance type."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}; expected one of {list(VARIANCE_TYPES)}")


def check_sampler_variance(sampler: object, variance_type: str) -> None:
    """Refuse a sampler that needs the model's variance (`uses_model_variance`) with a fixed-variance model."""
    check_variance_type(variance_type)
    if getattr(sampler, "uses_model_variance", False) and variance_type != "learned_range":
        raise ValueError(
            f"sampler {type(sampler).__name__} needs a learned-variance model, this one is {variance_type!r}: "
            "train with stage.module.variance_type=learned_range, or sample with sampler=ddpm|ddim"
        )


def split_model_output(out: Tensor, channels: int, variance_type: str) -> tuple[Tensor, Tensor | None]:
    """(B, C or 2C, ...) network output -> prediction (B, C, ...) and variance values (B, C, ...) or None.

    A "learned_range" model must output 2C channels, a "fixed_small" one C (else ValueError).
    """
    check_variance_type(variance_type)
    expected = 2 * channels if variance_type == "learned_range" else channels
    if out.shape[1] != expected:
        raise ValueError(
            f"a {variance_type} model must output {expected} channels for {channels} latent channels, got "
            f"{out.shape[1]} (was the checkpoint's variance_type changed after training?)"
        )
    if variance_type == "fixed_small":
        return out, None
    pred, values = out.split(channels, dim=1)
    return pred, values


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """-log N(x; mean, exp(log_variance)) elementwise, in nats: the continuous decoder term L_0."""
    return 0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def learned_range_log_variance(values: Tensor, min_log: Tensor, max_log: Tensor) -> Tensor:
    """Eq. 15: frac max_log + (1 - frac) min_log with frac = (values + 1) / 2 (guided-diffusion's map)."""
    frac = (values + 1) / 2
    return frac * max_log + (1 - frac) * min_log


def _ascending(timesteps: Tensor | list[int]) -> list[int]:
    """The distinct timesteps of a chain, ascending (chains are stored descending)."""
    return sorted({int(t) for t in (timesteps.tolist() if isinstance(timesteps, Tensor) else timesteps)})


def respaced_betas(alphas_cumprod: Tensor, timesteps: Tensor | list[int]) -> Tensor:
    """Betas of the chain through `timesteps` (any order; sorted ascending): 1 - abar_t / abar_prev with
    abar_prev = 1 before the first (guided-diffusion `SpacedDiffusion.__init__`). float64 (len(timesteps),)."""
    use = _ascending(timesteps)
    abar = alphas_cumprod.to(torch.float64)[use]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / abar_prev


@dataclass(frozen=True)
class VarianceTables:
    """float64 tables of a chain, indexed by chain index i (ascending): its timesteps, the posterior
    q(x_{i-1} | x_i, x0) coefficients (Ho et al. 2020, eq. 7), log beta_i and the clipped log beta~_i."""

    timesteps: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    posterior_log_variance_clipped: Tensor
    log_betas: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor, timesteps: Tensor) -> VarianceTables:
        d = derived_tables(betas.to(torch.float64))
        posterior = d["posterior_variance"]
        # guided-diffusion: log(append(posterior_variance[1], posterior_variance[1:])); a one-step chain has
        # no beta~_1, and its only step adds no noise: beta_0 stands in.
        first = posterior[1:2] if posterior.numel() > 1 else betas[:1].to(torch.float64)
        return cls(
            timesteps=timesteps.to(torch.long),
            posterior_mean_coef1=d["posterior_mean_coef1"],
            posterior_mean_coef2=d["posterior_mean_coef2"],
            posterior_log_variance_clipped=torch.log(torch.cat([first, posterior[1:]])),
            log_betas=torch.log(d["betas"]),
        )

    @classmethod
    def of_schedule(cls, schedule: NoiseSchedule) -> VarianceTables:
        """The full training chain (chain index = training timestep)."""
        return cls.from_betas(schedule.betas, torch.arange(schedule.num_timesteps))

    @classmethod
    def respaced(cls, schedule: NoiseSchedule, timesteps: Tensor | list[int]) -> VarianceTables:
        """The chain through `timesteps` of `schedule`, betas recomputed (`respaced_betas`)."""
        use = _ascending(timesteps)
        return cls.from_betas(respaced_betas(schedule.alphas_cumprod, use), torch.tensor(use))


@lru_cache(maxsize=16)
def _full_chain_cached(schedule: NoiseSchedule) -> VarianceTables:
    return VarianceTables.of_schedule(schedule)


@lru_cache(maxsize=16)
def _respaced_cached(schedule: NoiseSchedule, timesteps: tuple[int, ...]) -> VarianceTables:
    return VarianceTables.respaced(schedule, list(timesteps))


def p_mean_variance(
    tables: VarianceTables, pred_x0: Tensor, values: Tensor, x_t: Tensor, index: Tensor
) -> dict[str, Tensor]:
    """Mean, variance and log-variance of p_theta(x_{i-1} | x_i) with the learned-range variance.

    guided-diffusion `p_mean_variance` with LEARNED_RANGE: mean = posterior mean of (pred_x0, x_t) (eq. 7
    of Ho et al. with the chain's betas), log Sigma by eq. 15. pred_x0, values, x_t: (B, C, ...); index:
    long (B,) chain indices. Returns tensors like x_t.
    """
    coef1 = extract(tables.posterior_mean_coef1, index, x_t.shape, x_t.dtype)
    coef2 = extract(tables.posterior_mean_coef2, index, x_t.shape, x_t.dtype)
    min_log = extract(tables.posterior_log_variance_clipped, index, x_t.shape, x_t.dtype)
    max_log = extract(tables.log_betas, index, x_t.shape, x_t.dtype)
    log_variance = learned_range_log_variance(values, min_log, max_log)
    return {"mean": coef1 * pred_x0 + coef2 * x_t, "variance": torch.exp(log_variance),
            "log_variance": log_variance, "pred_x0": pred_x0}  # fmt: skip


def vb_terms_bpd(
    tables: VarianceTables, x0: Tensor, x_t: Tensor, index: Tensor, pred_x0: Tensor, values: Tensor
) -> Tensor:
    """The VLB term L_i per sample, in bits per dim, (B,) (Ho et al. 2020, eq. 5; guided-diffusion
    `_vb_terms_bpd`): KL(q(x_{i-1} | x_i, x0) || p_theta(x_{i-1} | x_i)) for i > 0, with q's clipped
    log-variance; at i = 0 the continuous Gaussian NLL of x0 (module docstring)."""
    coef1 = extract(tables.posterior_mean_coef1, index, x_t.shape, x_t.dtype)
    coef2 = extract(tables.posterior_mean_coef2, index, x_t.shape, x_t.dtype)
    true_log_variance = extract(tables.posterior_log_variance_clipped, index, x_t.shape, x_t.dtype)
    p = p_mean_variance(tables, pred_x0, values, x_t, index)
    kl = normal_kl(coef1 * x0 + coef2 * x_t, true_log_variance, p["mean"], p["log_variance"])
    nll = gaussian_nll(x0, p["mean"], p["log_variance"])
    per_dim = torch.where((index == 0).view(-1, *([1] * (x_t.ndim - 1))), nll, kl)
    return per_dim.flatten(1).mean(dim=1) / math.log(2.0)


def hybrid_vlb_term(
    schedule: NoiseSchedule,
    prediction_type: str,
    pred: Tensor,
    values: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    vlb_weight: float = HYBRID_LAMBDA,
) -> Tensor:
    """lambda T L_t (B,): the VLB part of L_hybrid = L_simple + lambda L_vlb (Sec. 3.1), with L_vlb =
    sum_t L_t estimated by T L_t for uniform t (guided-diffusion's RESCALED_MSE: vb * T / 1000).

    The mean is frozen (`pred.detach()`, guided-diffusion's `frozen_out`): only the variance values get
    this term's gradient. pred: the model's (B, C, ...) prediction of `prediction_type`; values: its
    (B, C, ...) variance channels; t: long (B,) training timesteps. Computed in float32.
    """
    pred_x0 = convert_prediction(schedule, pred.detach().float(), x_t.float(), t, prediction_type, "x0")
    vb = vb_terms_bpd(_full_chain_cached(schedule), x0.float(), x_t.float(), t, pred_x0, values.float())
    return vlb_weight * schedule.num_timesteps * vb


@dataclass
class IDDPMSampler(_RespacedSampler):
    """Ancestral sampling with the learned variance (Nichol & Dhariwal 2021, Sec. 3.1 and 4) on a respaced
    chain (betas recomputed for the subsequence): x_{i-1} = mu_theta + Sigma_theta^(1/2) z, no noise on the
    last step. Classifier guidance shifts the mean by Sigma_theta * grad (`condition_mean`, Dhariwal &
    Nichol 2021, Algorithm 1). Needs a model with variance_type "learned_range" (`uses_model_variance`).
    """

    num_steps: int = 50
    spacing: str = "leading"
    clip_x0: float | None = None

    uses_model_variance = True

    def needs_noise(self, schedule: NoiseSchedule, t: int, prev_t: int | None = None) -> bool:
        return self.prev_timestep(schedule, t, prev_t) >= 0

    def tables(self, schedule: NoiseSchedule) -> VarianceTables:
        """The respaced chain's tables (cached per schedule and chain)."""
        return _respaced_cached(schedule, tuple(self.timesteps(schedule).tolist()))

    def step(
        self,
        schedule: NoiseSchedule,
        eps: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None,
        grad: Tensor | None = None,
        prev_t: int | None = None,
        model_var_values: Tensor | None = None,
    ) -> dict[str, Tensor | float]:
        """One reverse step from training timestep t. eps, x_t, noise, grad, model_var_values: (B, C, ...).

        Returns prev_sample, pred_x0, the (guided) mean and the variance, all (B, C, ...).
        """
        if model_var_values is None:
            raise ValueError(
                "sampler IDDPMSampler needs a learned-variance model (variance_type=learned_range, trained with "
                "stage.module.variance_type=learned_range); for a fixed-variance model use sampler=ddpm"
            )
        tables = self.tables(schedule)
        index = int((tables.timesteps == t).nonzero()[0, 0])
        abar_t = float(schedule.alphas_cumprod[t])
        x0, _ = self._x0_and_eps(x_t, eps, abar_t)
        index_batch = torch.full((x_t.shape[0],), index, dtype=torch.long, device=x_t.device)
        out: dict[str, Tensor | float] = dict(p_mean_variance(tables, x0, model_var_values, x_t, index_batch))
        if grad is not None:
            out["mean"] = condition_mean(out["mean"], out["variance"], grad)
        out["prev_sample"] = out["mean"]
        if self.prev_timestep(schedule, t, prev_t) >= 0:
            if noise is None:
                raise ValueError("this step is stochastic but no noise was given")
            out["prev_sample"] = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
        return out
