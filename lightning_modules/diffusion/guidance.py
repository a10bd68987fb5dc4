"""Classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Scale conventions (docs/ARCHITECTURE.md, "Guidance scales"): classifier-free guidance
`eps_u + s (eps_c - eps_u)` with s = 1 meaning no guidance (the paper's w is s - 1); classifier guidance
scale s_cls = 0 meaning no guidance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .schedules import NoiseSchedule, extract

__all__ = [
    "CFGDenoiser",
    "cfg_combine",
    "classifier_cond_fn",
    "classifier_grad",
    "condition_mean",
    "condition_score",
]

CondModel = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
CondFn = Callable[[Tensor, Tensor], Tensor]


def _per_sample_std(x: Tensor) -> Tensor:
    """Standard deviation over all non-batch dims, (B, ...) -> (B, 1, ..., 1)."""
    return x.std(dim=tuple(range(1, x.ndim)), keepdim=True)


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, scale: float, rescale_phi: float = 0.0) -> Tensor:
    """Classifier-free guidance eps_u + s (eps_c - eps_u), optionally std-rescaled.

    Rescale (Lin et al. 2023, eq. 15-16): x_rescaled = x_cfg * std(eps_c) / std(x_cfg) per sample, then
    phi * x_rescaled + (1 - phi) * x_cfg. eps_uncond, eps_cond: (B, ...). Returns (B, ...).
    """
    if scale == 1.0:
        # Exactly the conditional prediction; rescaling it would only multiply by std(x)/std(x).
        return eps_cond
    guided = eps_uncond + scale * (eps_cond - eps_uncond)
    if rescale_phi == 0.0:
        return guided
    rescaled = guided * (_per_sample_std(eps_cond) / _per_sample_std(guided))
    return rescale_phi * rescaled + (1.0 - rescale_phi) * guided


def _match_batch(context: Tensor, batch_size: int) -> Tensor:
    """Broadcast a batch-1 context (one negative prompt for all samples) to the batch size."""
    if context.shape[0] == 1 and batch_size != 1:
        return context.expand(batch_size, *context.shape[1:])
    return context


def _cat_optional(first: Tensor | None, second: Tensor | None) -> Tensor | None:
    if first is None and second is None:
        return None
    if first is None or second is None:
        raise ValueError(
            "context masks must be given for both the conditional and unconditional halves, or neither"
        )
    return torch.cat([first, second])


class CFGDenoiser:
    """Adapter turning a conditional model into a guided denoiser `(x, t) -> prediction`.

    model(x, t, context, context_mask) -> prediction, with x (B, ...), t long (B,), context (B, L, D),
    context_mask (B, L) or None. Both halves run as one batched forward of size 2B; with scale == 1 only
    the conditional half runs. Negative conditioning: pass the negative context as context_uncond.
    A context or mask with batch size 1 is broadcast to the batch. learned_variance: the model outputs 2C
    channels (prediction, variance values; `variance.py`): only the prediction is guided, the variance
    values are the conditional half's (GLIDE's and guided-diffusion's choice).
    """

    def __init__(
        self,
        model: CondModel,
        context_cond: Tensor,
        mask_cond: Tensor | None,
        context_uncond: Tensor,
        mask_uncond: Tensor | None,
        scale: float,
        rescale_phi: float = 0.0,
        learned_variance: bool = False,
    ) -> None:
        self.model = model
        self.learned_variance = learned_variance
        self.context_cond = context_cond
        self.mask_cond = mask_cond
        self.context_uncond = context_uncond
        self.mask_uncond = mask_uncond
        self.scale = float(scale)
        self.rescale_phi = float(rescale_phi)

    def _conditional(self, x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        mask = None if self.mask_cond is None else _match_batch(self.mask_cond, batch)
        return self.model(x, t, _match_batch(self.context_cond, batch), mask)

    def _both_halves(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        batch = x.shape[0]
        context = torch.cat(
            [_match_batch(self.context_cond, batch), _match_batch(self.context_uncond, batch)]
        )
        masks = [None if m is None else _match_batch(m, batch) for m in (self.mask_cond, self.mask_uncond)]
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), context, _cat_optional(*masks))
        cond, uncond = out.chunk(2)
        return cond, uncond

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """x: (B, ...), t: long (B,) -> guided prediction (B, ...)."""
        if self.scale == 1.0:
            return self._conditional(x, t)
        cond, uncond = self._both_halves(x, t)
        if not self.learned_variance:
            return cfg_combine(uncond, cond, self.scale, self.rescale_phi)
        channels = x.shape[1]
        guided = cfg_combine(uncond[:, :channels], cond[:, :channels], self.scale, self.rescale_phi)
        return torch.cat([guided, cond[:, channels:]], dim=1)


def _check_labels(y: Tensor, num_classes: int) -> None:
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.numel():
        raise ValueError(
            f"class index {bad[0].item()} out of range for a classifier with {num_classes} classes "
            f"(valid: 0..{num_classes - 1})"
        )


def classifier_grad(
    classifier: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, y: Tensor, scale: float
) -> Tensor:
    """scale * grad_x log p(y | x_t, t) (Dhariwal & Nichol 2021, Algorithms 1-2; guided-diffusion `cond_fn`).

    classifier(x, t) -> logits (B, K); x: (B, ...); t: long (B,) training timesteps; y: long (B,).
    Returns (B, ...), detached. Raises ValueError for a class index outside [0, K).
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)
        _check_labels(y, logits.shape[-1])
        log_probs = F.log_softmax(logits, dim=-1)
        selected = log_probs[torch.arange(x.shape[0], device=log_probs.device), y]
        (grad,) = torch.autograd.grad(selected.sum(), x_in)
    return grad * scale


def classifier_cond_fn(
    classifier: Callable[[Tensor, Tensor], Tensor], y: Tensor, scale: float
) -> CondFn | None:
    """The `cond_fn(x, t)` that `sample` takes, or None when scale == 0 (no classifier evaluations at all)."""
    if scale == 0.0:
        return None

    def cond_fn(x: Tensor, t: Tensor) -> Tensor:
        return classifier_grad(classifier, x, t, y, scale)

    return cond_fn


def condition_mean(mean: Tensor, variance: Tensor | float, grad: Tensor) -> Tensor:
    """Shift a reverse-step Gaussian mean by variance * grad (Dhariwal & Nichol 2021, Algorithm 1).

    mean, grad: (B, ...); variance broadcastable to them: a float (fixed variance of the step) or the
    learned (B, ...) Sigma_theta(x_t, t) of Improved DDPM (`variance.IDDPMSampler`). Returns (B, ...).
    """
    return mean + variance * grad


def condition_score(schedule: NoiseSchedule, eps: Tensor, x_t: Tensor, t: Tensor, grad: Tensor) -> Tensor:
    """Guided noise prediction eps - sqrt(1 - abar_t) * grad (Dhariwal & Nichol 2021, eq. 14, Algorithm 2).

    eps, x_t, grad: (B, ...); t: long (B,) training timesteps. Returns (B, ...).
    """
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape, eps.dtype)
    return eps - sigma * grad
