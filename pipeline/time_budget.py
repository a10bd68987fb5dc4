"""A pipeline that fits a time budget on any CPU: `time_budget.minutes` scales the training stages' step counts.

The demo's step counts are tuned on a reference machine (the experiment's `time_budget.reference`: its CPU,
the probe's time there, and how the pipeline's minutes split into a part that scales with the training steps
and a fixed part: preparation, start-up, test passes, the latent cache, the evaluation sweeps). Another CPU
can be 3x slower (2 cores of an AVX2-only EPYC run everything in float32, 2-3x the time per step of
AVX512-BF16's bf16 autocast). Before the first stage, `pipeline.run` times a fixed probe (a training step of
the demo's latent U-Net at the precision the stages will use, the fastest of a few), takes its ratio r to the
reference's probe, and predicts the pipeline at step scale s as

    minutes(s) = r * (fixed_minutes + s * training_minutes)

then runs every training stage with `step_scale=s`, the largest s <= 1 that fits (never below `min_scale`,
and then it says the budget cannot be met on this machine). Stage configs write their step counts as
`${scaled_steps:1500,${step_scale}}`, so the hash of a stage is that of its resolved step counts: scale 1 is
the unscaled config, bit for bit.

The choice is written to `<run_dir>/time_budget.json` (atomic) and reused on every later `pipeline.run` of the
same run directory while the budget and reference are unchanged: a resumed or repeated run keeps its stages'
hashes (a re-measured probe would otherwise retrain finished stages). `time_budget.recalibrate=true` measures
again; `step_scale=<s>` on the command line sets the scale and skips the probe.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_json, read_json
from core.machine import cpu_description

RECORD = "time_budget.json"
# The probe: conf/model/unet/small.yaml as of the reference measurement, fixed here so that a change to the
# demo's U-Net does not silently change what the reference figure measured.
PROBE_UNET = dict(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4],
                  num_head_channels=32, transformer_depth=1, use_scale_shift_norm=True)  # fmt: skip
PROBE_BATCH, PROBE_LATENT, PROBE_CONTEXT = 128, (4, 8, 8), 64


def scaled_steps(steps: Any, scale: Any) -> int:
    """`${scaled_steps:N,${step_scale}}`: round(N * scale), at least 1."""
    steps, scale = int(steps), float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"step_scale must be a positive number, got {scale!r}")
    return max(1, int(round(steps * scale)))


def probe_ms(precision: str, repeats: int = 12) -> float:
    """The fastest of `repeats` training steps (forward, MSE, backward, AdamW) of the probe U-Net on CPU, in
    ms, under bf16 autocast when `precision` is "bf16-mixed" (what `auto_precision` gives the stages)."""
    from lightning_modules.nets.unet import UNet

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = UNet(in_channels=PROBE_LATENT[0], out_channels=PROBE_LATENT[0], context_dim=PROBE_CONTEXT, **PROBE_UNET)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(PROBE_BATCH, *PROBE_LATENT, generator=gen)
    t = torch.randint(0, 1000, (PROBE_BATCH,), generator=gen)
    ctx = torch.randn(PROBE_BATCH, 1, PROBE_CONTEXT, generator=gen)
    bf16 = str(precision).startswith("bf16")

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x, t, ctx)
        (out.float() - x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1000.0

    step()  # warm-up: allocator and oneDNN primitive caches
    return min(step() for _ in range(max(1, repeats)))


@dataclass
class Choice:
    scale: float
    ratio: float
    predicted_minutes: float
    fits: bool


def choose_scale(minutes: float, ratio: float, fixed_minutes: float, training_minutes: float,
                 min_scale: float) -> Choice:  # fmt: skip
    """The largest step scale in [min_scale, 1] with ratio * (fixed + scale * training) <= minutes."""
    if minutes <= 0 or ratio <= 0 or training_minutes <= 0 or fixed_minutes < 0 or not 0 < min_scale <= 1:
        raise ValueError(
            f"time_budget: minutes ({minutes}), the probe ratio ({ratio}), reference.training_minutes "
            f"({training_minutes}) must be > 0, reference.fixed_minutes ({fixed_minutes}) >= 0 and min_scale "
            f"({min_scale}) in (0, 1]"
        )
    best = (minutes / ratio - fixed_minutes) / training_minutes
    scale = min(1.0, max(min_scale, math.floor(best * 100) / 100))  # two decimals: a readable override
    return Choice(scale, ratio, ratio * (fixed_minutes + scale * training_minutes), best >= min_scale)


def _reference(budget: DictConfig) -> dict:
    ref = OmegaConf.to_container(budget.get("reference") or {}, resolve=True)
    missing = [k for k in ("probe_ms", "fixed_minutes", "training_minutes") if ref.get(k) is None]
    if missing:
        raise ValueError(
            f"time_budget.minutes is set but time_budget.reference lacks {missing}: measure the pipeline once "
            "at step_scale=1 on a reference machine and record its probe time and minutes (see "
            "conf/experiment/fashion_mnist_quick.yaml), or set time_budget.minutes=null"
        )
    return ref


def decide(cfg: DictConfig, precision: str, measure=None) -> dict | None:
    """The step scale for this run (a record, see the module docstring), or None when no budget is set."""
    budget = cfg.get("time_budget")
    if budget is None or budget.get("minutes") is None:
        return None
    ref = _reference(budget)
    path = Path(cfg.paths.run_dir) / RECORD
    key = {"minutes": float(budget.minutes), "min_scale": float(budget.min_scale), "reference": ref}
    old = read_json(path, strict=False)
    if old and not budget.get("recalibrate") and all(old.get(k) == v for k, v in key.items()):
        return {**old, "reused": True}
    ms = (measure or probe_ms)(precision)
    choice = choose_scale(key["minutes"], ms / float(ref["probe_ms"]), float(ref["fixed_minutes"]),
                          float(ref["training_minutes"]), key["min_scale"])  # fmt: skip
    record = {
        **key,
        "step_scale": choice.scale,
        "probe_ms": round(ms, 1),
        "ratio": round(choice.ratio, 3),
        "predicted_minutes": round(choice.predicted_minutes, 1),
        "fits": choice.fits,
        "precision": precision,
        "machine": cpu_description(),
        "threads": torch.get_num_threads(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    Path(cfg.paths.run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return {**record, "reused": False}


def describe(record: dict) -> str:
    how = "reused from" if record.get("reused") else "measured; written to"
    text = (
        f"[run] time budget {record['minutes']:g} min: probe {record['probe_ms']} ms ({record['precision']}) vs "
        f"{record['reference']['probe_ms']} ms on the reference ({record['reference'].get('machine', '?')}): "
        f"this machine x{record['ratio']:.2f} -> step_scale={record['step_scale']:g}, predicted "
        f"{record['predicted_minutes']:.1f} min ({how} {RECORD})"
    )
    if not record.get("fits"):
        text += (
            f"\n[run] WARNING: even at the smallest step scale ({record['min_scale']:g}) this machine needs about "
            f"{record['predicted_minutes']:.1f} minutes, over the {record['minutes']:g}-minute budget"
        )
    return text
