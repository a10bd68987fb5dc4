"""The sampling loop: it owns the model calls, samplers only step.

Noise is drawn per sample from its own seeded generator (as NVlabs/edm's StackedRandomGenerator), so a
sample depends on its seed only, never on the batch it was drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .process import convert_prediction
from .samplers import Sampler
from .schedules import NoiseSchedule
from .variance import check_sampler_variance, split_model_output

__all__ = ["make_generators", "sample", "seeded_noise"]

Denoiser = Callable[[Tensor, Tensor], Tensor]
CondFn = Callable[[Tensor, Tensor], Tensor]
Seeds = Sequence[int] | Tensor


def _seed_list(seeds: Seeds) -> list[int]:
    return [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]


def make_generators(seeds: Seeds, device: torch.device | str | None = None) -> list[torch.Generator]:
    """One torch.Generator per sample, seeded with seed mod 2^32 (EDM's convention)."""
    device = torch.device(device if device is not None else "cpu")
    return [torch.Generator(device=device).manual_seed(s % (1 << 32)) for s in _seed_list(seeds)]


def seeded_noise(
    seeds: Seeds,
    shape_per_sample: Sequence[int],
    generators: Sequence[torch.Generator] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise (len(seeds), *shape_per_sample), row i drawn from generator i alone.

    Without `generators`, fresh ones are seeded from `seeds`; pass the same generators again to continue
    their streams (the per-step noise of DDPM or DDIM with eta > 0). The noise lives on the generators'
    device.
    """
    seed_list = _seed_list(seeds)
    if generators is None:
        generators = make_generators(seed_list, device)
    if len(generators) != len(seed_list):
        raise ValueError(f"{len(generators)} generators for {len(seed_list)} seeds")
    rows = [
        torch.randn(tuple(shape_per_sample), generator=g, device=g.device, dtype=dtype) for g in generators
    ]
    return torch.stack(rows)


def _noise_source(
    shape: tuple[int, ...], seeds: Seeds | None, device: torch.device, dtype: torch.dtype
) -> Callable[[], Tensor]:
    """A callable drawing the next (B, ...) noise tensor: per-sample seeded, or from the global RNG."""
    if seeds is None:
        return lambda: torch.randn(shape, device=device, dtype=dtype)
    seed_list = _seed_list(seeds)
    if len(seed_list) != shape[0]:
        raise ValueError(f"{len(seed_list)} seeds for a batch of {shape[0]}")
    generators = make_generators(seed_list, device)
    return lambda: seeded_noise(seed_list, shape[1:], generators, dtype=dtype)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    shape: tuple[int, ...],
    schedule: NoiseSchedule,
    sampler: Sampler,
    prediction_type: str = "eps",
    seeds: Sequence[int] | None = None,
    cond_fn: CondFn | None = None,
    progress: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    variance_type: str = "fixed_small",
) -> Tensor:
    """Run the reverse process from x_T ~ N(0, I) to x_0 and return x_0, (B, ...) = `shape`.

    denoiser(x, t) -> prediction of type `prediction_type` ("eps", "v", "x0"), x (B, ...), t long (B,)
    training timesteps (also on respaced chains); e.g. a plain model wrapper or a `CFGDenoiser`.
    cond_fn(x, t) -> scaled grad_x log p(y | x, t) (e.g. `classifier_cond_fn`), applied by the sampler
    (DDPM: `condition_mean`; DDIM and DPM-Solver++: `condition_score`). seeds: one per sample for
    batch-independent results; None draws from torch's global RNG. variance_type "learned_range": the
    denoiser outputs 2C channels, the second half the learned-range variance values (`variance.py`), handed
    to a sampler with `uses_model_variance` (IDDPMSampler) and ignored by the others (DDIM needs no variance).
    """
    check_sampler_variance(sampler, variance_type)
    uses_variance = getattr(sampler, "uses_model_variance", False)
    device = torch.device(device if device is not None else "cpu")
    draw = _noise_source(tuple(shape), seeds, device, dtype)
    x = draw()
    # The chain once per call, each step handed its successor (-1 after the last): the samplers would
    # otherwise rebuild it (make_timesteps) and search it on every step.
    chain = sampler.timesteps(schedule).tolist()
    successors = [*chain[1:], -1]
    carried: dict = {}  # a multistep sampler's `state`, handed back to its next step (Sampler)
    for t, prev_t in tqdm(list(zip(chain, successors)), desc="sampling", disable=not progress):
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        pred, var_values = split_model_output(denoiser(x, t_batch), x.shape[1], variance_type)
        eps = convert_prediction(schedule, pred, x, t_batch, from_type=prediction_type, to_type="eps")
        grad = None if cond_fn is None else cond_fn(x, t_batch)
        noise = draw() if sampler.needs_noise(schedule, t, prev_t) else None
        extra = {"model_var_values": var_values} if uses_variance else {}
        out = sampler.step(schedule, eps, t, x, noise, grad=grad, prev_t=prev_t, **carried, **extra)
        x = out["prev_sample"]
        carried = {"state": out["state"]} if "state" in out else {}
    return x
