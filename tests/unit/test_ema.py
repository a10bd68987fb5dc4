"""EMA warm-ups (lightning_modules/ema.py): decay values against their closed forms and the milestones the
README states, the update rule, and imagenet256_ldm's choice of LDM's LitEma warm-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.ema import EMA, EMA_WARMUPS, ema_decay_at
from tests.unit.test_configs import compose_cfg


def _first_update_reaching(target: float, warmup: str) -> int:
    """The smallest n with d_n >= target (the decays are non-decreasing in n), by bisection."""
    lo, hi = 1, 10**8
    while lo < hi:
        mid = (lo + hi) // 2
        if ema_decay_at(mid, 0.99999999, warmup) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@pytest.mark.parametrize("n", [1, 2, 10, 1000, 89_989, 89_990, 178_000])
def test_decays_equal_their_closed_forms(n: int) -> None:
    assert ema_decay_at(n, 0.9999, "litema") == pytest.approx(min(0.9999, (1 + n) / (10 + n)), abs=1e-15)
    assert ema_decay_at(n, 0.9999, "power") == pytest.approx(min(0.9999, 1 - (1 + n) ** (-2 / 3)), abs=1e-15)
    assert ema_decay_at(n, 0.9999, "none") == 0.9999
    assert ema_decay_at(n, 0.9999, "power", inv_gamma=10.0, power=0.75) == pytest.approx(
        min(0.9999, 1 - (1 + n / 10) ** -0.75), abs=1e-15
    )


def test_milestones_stated_in_the_readme() -> None:
    # LitEma reaches 0.9999 at ~90k updates, power-2/3 only at ~1M: 0.99968 after imagenet256_ldm's 178k.
    assert _first_update_reaching(0.9999, "litema") == 89_990
    assert _first_update_reaching(0.999, "litema") == 8_990
    assert _first_update_reaching(0.999, "power") == 31_622
    assert _first_update_reaching(0.9999, "power") == 999_999
    assert ema_decay_at(178_000, 0.9999, "power") == pytest.approx(0.99968, abs=5e-6)
    assert ema_decay_at(178_000, 0.9999, "litema") == 0.9999


def test_no_update_before_update_after_step_and_booleans_name_warmups() -> None:
    assert ema_decay_at(0, 0.9999, "litema") == 0.0
    assert EMA(nn.Linear(2, 2), warmup=True).warmup == "power"
    assert EMA(nn.Linear(2, 2), warmup=False).warmup == "none"
    with pytest.raises(ValueError, match="'ldm'.*power"):
        EMA(nn.Linear(2, 2), warmup="ldm")


@pytest.mark.parametrize("warmup", EMA_WARMUPS)
def test_updates_use_the_selected_warmup(warmup: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99, warmup=warmup)
    shadow = {k: v.clone() for k, v in ema.shadow.state_dict().items()}
    for n in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = ema_decay_at(n, 0.99, warmup)
        assert ema.current_decay() == d
        for k, live in model.state_dict().items():
            shadow[k] = d * shadow[k] + (1 - d) * live
            torch.testing.assert_close(ema.shadow.state_dict()[k], shadow[k])
    assert int(ema.num_updates) == 3


def test_imagenet256_ldm_diffusion_uses_litema_and_builds_it() -> None:
    cfg = compose_cfg("train", ["stage=diffusion", "experiment=imagenet256_ldm"])
    assert cfg.stage.module.ema_warmup == "litema"
    assert cfg.stage.module.ema_decay == 0.9999
    ema = EMA(nn.Linear(1, 1), decay=cfg.stage.module.ema_decay, warmup=cfg.stage.module.ema_warmup)
    assert ema.warmup == "litema"


def test_foreach_update_equals_the_per_parameter_loop_exactly() -> None:
    """EMA.update's multi-tensor lerp gives the very bits of the per-parameter Tensor.lerp_ loop (float32,
    mixed shapes, a buffer copied as is, decays of the warm-up's first updates)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
    ema = EMA(model, decay=0.999, warmup="litema")
    reference = [p.detach().clone() for p in ema.shadow.parameters()]
    for n in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(2, 3, 8, 8))  # moves the BatchNorm running statistics (buffers)
        ema.update(model)
        d = ema_decay_at(n, 0.999, "litema")
        for r, p in zip(reference, model.parameters(), strict=True):
            r.lerp_(p.detach(), 1.0 - d)
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow.parameters(), reference, strict=True)), n
        assert all(torch.equal(a, b) for a, b in zip(ema.shadow.buffers(), model.buffers(), strict=True)), n
