"""Exponential moving average of a network's weights, with warm-up (no Lightning here)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """EMA copy of `model`: theta_ema <- d * theta_ema + (1 - d) * theta.

    The decay warms up as d_n = min(decay, 1 - (1 + n / inv_gamma) ** -power) (the schedule of
    Karras et al. / the `ema_pytorch` and diffusers EMAModel warm-up), so early averages do not stay
    dominated by the random initialisation. Being an nn.Module, the shadow weights and the update
    count live in the owner's state_dict: a resumed run restores them exactly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, inv_gamma: float = 1.0,
                 power: float = 2 / 3, update_after_step: int = 0) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.update_after_step = update_after_step
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates) - self.update_after_step
        if n <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return float(min(self.decay, max(0.0, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power)))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = self.current_decay()
        for ema_p, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - d)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.shadow.eval()  # the average is only ever used for inference
        return self
