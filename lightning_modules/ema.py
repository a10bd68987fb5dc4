"""Exponential moving average of a network's weights, with a selectable warm-up (no Lightning here)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "EMA_WARMUPS", "ema_decay_at"]

# power:  d_n = 1 - (1 + n / inv_gamma)^-power (Karras et al.; ema_pytorch, diffusers' EMAModel); with the
#         default 2/3 it reaches 0.999 at ~31.6k updates, 0.9999 only at ~1M (0.99968 after 178k).
# litema: d_n = (1 + n) / (10 + n), LDM's LitEma (Rombach et al. 2022, ldm/modules/ema.py); 0.999 at ~9k
#         updates, 0.9999 at ~90k.
# none:   d_n = decay from the first update on.
EMA_WARMUPS = ("power", "litema", "none")


def _warmup_name(warmup: str | bool) -> str:
    """The warm-up's name; the booleans of older configs mean "power" (True) and "none" (False)."""
    if isinstance(warmup, bool):
        return "power" if warmup else "none"
    if warmup not in EMA_WARMUPS:
        raise ValueError(f"unknown EMA warm-up {warmup!r}; expected one of {list(EMA_WARMUPS)} or true/false")
    return warmup


def ema_decay_at(
    n: int, decay: float, warmup: str | bool = "power", inv_gamma: float = 1.0, power: float = 2 / 3
) -> float:
    """The decay of the n-th update (n = 1 for the first), capped at `decay`; 0.0 for n <= 0.

    warmup: "power" min(decay, 1 - (1 + n / inv_gamma)^-power), "litema" min(decay, (1 + n) / (10 + n))
    (LDM's LitEma), "none" decay (True/False: "power"/"none").
    """
    name = _warmup_name(warmup)
    if n <= 0:
        return 0.0
    if name == "none":
        return float(decay)
    if name == "litema":
        return float(min(decay, (1.0 + n) / (10.0 + n)))
    return float(min(decay, max(0.0, 1.0 - (1.0 + n / inv_gamma) ** -power)))


class EMA(nn.Module):
    """EMA copy of `model`: theta_ema <- d * theta_ema + (1 - d) * theta.

    The decay d_n of the n-th update warms up (`ema_decay_at`, `EMA_WARMUPS`) so that early averages do
    not stay dominated by the random initialisation. Being an nn.Module, the shadow weights and the update
    count live in the owner's state_dict: a resumed run restores them exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: str | bool = "power",
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        update_after_step: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, _warmup_name(warmup), inv_gamma, power
        self.update_after_step = update_after_step
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates) - self.update_after_step
        return ema_decay_at(n, self.decay, self.warmup, self.inv_gamma, self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.current_decay()
        # One multi-tensor lerp over all parameters (torch._foreach_lerp_: on CUDA a few fused kernel launches
        # instead of one per parameter, ~700 for the LDM-4 U-Net); per element the same lerp as Tensor.lerp_,
        # theta_ema + (1 - d) * (theta - theta_ema), so the values equal the per-parameter loop's.
        shadow = list(self.shadow.parameters())
        live = [p.detach().to(e.dtype) for e, p in zip(shadow, model.parameters(), strict=True)]
        if shadow:
            torch._foreach_lerp_(shadow, live, 1.0 - d)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.shadow.eval()  # the average is only ever used for inference
        return self
