"""Samplers x step counts x guidance settings: the points of a sampler sweep, and the network evaluations
each costs.

A plain guidance sweep (`sweep.samplers` and `sweep.steps` null) keeps its settings as they were:
`SweepSetting(guidance)` has the guidance setting's name and row, so its directory and hashes are those of
a `GuidanceSetting` and finished results stay valid. A sampler sweep names each point
`<sampler>_n<steps>_<guidance setting>` (e.g. `dpmpp_2m_n10_cfg_s3`) and carries its own sampler, so every
point is one directory, one `sweep_index` and one resumable unit like a guidance scale.

Network evaluations (NFE) per sample: the sampling loop calls the denoiser once per step
(`lightning_modules.diffusion.sampling.sample`), and a classifier-free guided denoiser at s != 1 runs
the conditional and unconditional halves (one batched forward of 2B): both are counted, 2 per step.
Classifier-guidance gradients (a classifier forward and backward per step) are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_modules.diffusion import Sampler
from lightning_modules.generation import GuidanceSetting

__all__ = ["Setting", "SweepSetting", "cross_settings", "network_evaluations", "step_counts"]


@dataclass(frozen=True)
class SweepSetting:
    """One point of a sweep: a guidance setting and, in a sampler sweep, the sampler (and its config name)
    that draws it. `sampler=None`: the evaluation's `sampler` config (a plain guidance sweep)."""

    guidance: GuidanceSetting
    sampler: Sampler | None = None
    sampler_name: str | None = None

    @property
    def name(self) -> str:
        if self.sampler is None:
            return self.guidance.name
        return f"{self.sampler_name}_n{self.sampler.num_steps}_{self.guidance.name}"

    @property
    def cls_scale(self) -> float:
        return self.guidance.cls_scale

    def as_row(self) -> dict[str, Any]:
        row = {**self.guidance.as_row(), "setting": self.name}
        if self.sampler is not None:
            row["sampler_config"] = self.sampler_name
        return row


Setting = GuidanceSetting | SweepSetting


def step_counts(values: Any) -> list[int] | None:
    """`sweep.steps` as a list of positive ints (None stays None), else ValueError naming the key."""
    if values is None:
        return None
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"sweep.steps must be a non-empty list of step counts, e.g. [5,10,20,50]; got {values!r}"
        )
    counts = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or int(v) < 1:
            raise ValueError(
                f"sweep.steps must hold positive integers, but {v!r} in {list(values)} is not one"
            )
        counts.append(int(v))
    if len(set(counts)) != len(counts):
        raise ValueError(f"sweep.steps holds a step count twice: {counts}")
    return counts


def cross_settings(
    guidance: Sequence[GuidanceSetting], chains: Sequence[tuple[str, Sampler]] | None
) -> list[SweepSetting]:
    """Every (sampler config name, sampler) chain at every guidance setting, sampler-major, in order;
    `chains=None`: the guidance settings alone (a plain guidance sweep)."""
    if chains is None:
        return [SweepSetting(g) for g in guidance]
    return [SweepSetting(g, sampler, name) for name, sampler in chains for g in guidance]


def network_evaluations(row: Mapping[str, Any]) -> int | None:
    """U-Net evaluations per sample of a results row: num_steps, twice for classifier-free guidance at
    s != 1 (both halves counted; see the module docstring). None when the row lacks its step count."""
    steps = row.get("num_steps")
    if steps is None:
        return None
    scale = row.get("cfg_scale")
    two_passes = (
        row.get("guidance") != "classifier" and scale is not None and not math.isclose(float(scale), 1.0)
    )
    return int(steps) * (2 if two_passes else 1)
