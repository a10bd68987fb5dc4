"""The settings of a guidance sweep, and how its samples are labelled, seeded and batched.

A sweep is a list of `GuidanceSetting`s (`expand_settings`; the class lives with the generation function,
`lightning_modules.generation`). Sample i has label i mod K and its own seed `sample_seed + i`, so its
noise depends neither on the batch size nor on the number of ranks (its pixels only up to float rounding,
one uint8 level at most); batch b of consecutive indices is drawn by rank b % world.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_modules.generation import GUIDANCE_KINDS, GuidanceSetting

PAIRINGS = ("grid", "paired")

__all__ = [
    "PAIRINGS",
    "batch_ranges",
    "check_unique_settings",
    "class_balanced_labels",
    "expand_settings",
    "sample_seeds",
    "select_setting",
]


def _number_list(key: str, values: Any) -> list[float]:
    """A non-empty list of finite numbers, else ValueError naming the config key."""
    if values is None or isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"{key} must be a list of numbers, got {values!r}")
    numbers = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
            raise ValueError(f"{key} must be a list of numbers, but {v!r} in {list(values)} is not a number")
        if not math.isfinite(float(v)):
            raise ValueError(f"{key} must hold finite numbers, got {v!r}")
        numbers.append(float(v))
    if not numbers:
        raise ValueError(f"{key} is empty: give at least one guidance scale, e.g. {key}=[1,3]")
    return numbers


def expand_settings(
    kind: str,
    scales: Sequence[float] | None = None,
    classifier_scales: Sequence[float] | None = None,
    pairing: str = "grid",
    rescale_phi: float = 0.0,
    negative: int | str | None = None,
) -> list[GuidanceSetting]:
    """The settings of a sweep, in order.

    cfg: one per s in `scales`; classifier: one per s_cls in `classifier_scales`; both: the grid
    scales x classifier_scales (pairing="grid", cfg scale varying fastest within each s_cls) or the
    pairs zip(scales, classifier_scales) (pairing="paired", equal lengths). Keys in error messages are
    the config's (`guidance.scales`, ...).
    """
    if kind not in GUIDANCE_KINDS:
        raise ValueError(f"guidance.kind must be one of {list(GUIDANCE_KINDS)}, got {kind!r}")
    if pairing not in PAIRINGS:
        raise ValueError(f"guidance.pairing must be one of {list(PAIRINGS)}, got {pairing!r}")
    extra = {"rescale_phi": float(rescale_phi), "negative": negative}
    if kind == "cfg":
        cfg = [GuidanceSetting("cfg", cfg_scale=s, **extra) for s in _number_list("guidance.scales", scales)]
        return check_unique_settings(cfg)
    if kind == "classifier":
        cls = _number_list("guidance.classifier_scales", classifier_scales)
        return check_unique_settings(
            [GuidanceSetting("classifier", cls_scale=c, rescale_phi=0.0, negative=None) for c in cls]
        )
    cfg_scales = _number_list("guidance.scales", scales)
    cls_scales = _number_list("guidance.classifier_scales", classifier_scales)
    if pairing == "paired":
        if len(cfg_scales) != len(cls_scales):
            raise ValueError(
                f"guidance.pairing=paired needs guidance.scales and guidance.classifier_scales of equal "
                f"length, got {len(cfg_scales)} and {len(cls_scales)}"
            )
        pairs = list(zip(cfg_scales, cls_scales))
    else:
        pairs = [(s, c) for c in cls_scales for s in cfg_scales]
    return check_unique_settings([GuidanceSetting("both", cfg_scale=s, cls_scale=c, **extra) for s, c in pairs])


def check_unique_settings(settings: Sequence[Any]) -> list[Any]:
    """Refuse a sweep in which two settings would write the same folder `<sweep_dir>/<setting.name>/`.

    Two tasks of a Slurm array (or two passes of one local sweep) sharing a folder delete each other's
    sampling parts and wait for them until the gather timeout (docs/ARCHITECTURE.md, "Guidance scales").
    Duplicates are refused rather than merged so that the array size, `sweep_index` and the config the
    user typed always agree. Works on any settings with a `name` (and `as_row()` for the message), so
    sweeps over other axes (sampler, steps) are checked the same way. Returns `list(settings)`.
    """
    settings = list(settings)
    where: dict[str, list[int]] = {}
    for i, setting in enumerate(settings):
        where.setdefault(setting.name, []).append(i)
    clashes = {name: idx for name, idx in where.items() if len(idx) > 1}
    if clashes:
        dups = "; ".join(
            f"{name} ({_describe(settings[idx[0]])}) {len(idx)} times, at positions {idx}"
            for name, idx in clashes.items()
        )
        raise ValueError(
            f"duplicated sweep setting: {dups} of the {len(settings)} settings. Two tasks would write the "
            "same folder <sweep_dir>/<setting>/ and delete each other's samples: remove the repeated value "
            "from guidance.scales / guidance.classifier_scales (or whichever sweep list repeats it)."
        )
    return settings


def _describe(setting: Any) -> str:
    row = setting.as_row() if hasattr(setting, "as_row") else {"setting": setting.name}
    return ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("setting", "guidance") and v is not None)


def select_setting(settings: Sequence[GuidanceSetting], index: int) -> GuidanceSetting:
    """settings[index] for `sweep_index=<index>` (e.g. a Slurm array task), with a clear range error."""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(settings):
        names = ", ".join(f"{i}: {s.name}" for i, s in enumerate(settings))
        raise ValueError(
            f"sweep_index={index!r} is out of range: this sweep has {len(settings)} settings ({names})"
        )
    return settings[index]


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """labels[i] = i mod K, int64 (num_samples,): every class gets floor or ceil of N / K samples."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return np.arange(num_samples, dtype=np.int64) % num_classes


def sample_seeds(indices: Sequence[int] | np.ndarray, base_seed: int) -> list[int]:
    """Seed of sample i is base_seed + i: independent of batch size and rank split."""
    return [int(base_seed) + int(i) for i in indices]


def batch_ranges(num_samples: int, batch_size: int) -> list[range]:
    """Consecutive index ranges of at most `batch_size`; batch b belongs to rank b % world."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]

