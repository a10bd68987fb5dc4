"""Timestep chains: every spacing, every step count from 1 to T, exactly `num_steps` valid timesteps.

Reference: diffusers' DDIMScheduler.set_timesteps (steps_offset=0), wherever diffusers itself returns
`num_steps` timesteps (its "trailing" returns one too many, ending in -1, for 62 of the counts at T = 1000).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from lightning_modules.diffusion import TIMESTEP_SPACINGS, make_timesteps

T = 1000


def _diffusers_chain(spacing: str, num_steps: int) -> list[int]:
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
    ref.set_timesteps(num_steps)
    return ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_every_step_count_gives_that_many_distinct_descending_timesteps(spacing: str) -> None:
    wrong = []
    for num_steps in range(1, T + 1):
        chain = make_timesteps(T, num_steps, spacing)
        ok = (
            chain.dtype == torch.long
            and chain.numel() == num_steps
            and bool((chain.diff() < 0).all())
            and int(chain.min()) >= 0
            and int(chain.max()) < T
        )
        if not ok:
            wrong.append((num_steps, chain.numel(), int(chain.min())))
    assert wrong == [], f"{spacing}: (num_steps, length, min) of the wrong chains: {wrong[:5]}"


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_chains_equal_diffusers_where_diffusers_is_correct(spacing: str) -> None:
    compared, differing = 0, []
    for num_steps in range(1, T + 1):
        reference = _diffusers_chain(spacing, num_steps)
        if len(reference) != num_steps:
            # Only diffusers' overshoot: its first num_steps elements are still ours.
            assert spacing == "trailing" and len(reference) == num_steps + 1 and reference[-1] == -1
            assert make_timesteps(T, num_steps, spacing).tolist() == reference[:num_steps]
            continue
        compared += 1
        if make_timesteps(T, num_steps, spacing).tolist() != reference:
            differing.append(num_steps)
    assert differing == []
    assert compared >= T - 62


def test_trailing_61_steps_is_the_reported_case() -> None:
    chain = make_timesteps(T, 61, "trailing")
    assert chain.numel() == 61
    assert chain[0] == T - 1 and chain[-1] == 15
