"""Checks of the keys a user types, run before an entry point touches anything on disk.

A declarative table (`TRAIN_RULES`, `EVALUATE_RULES`): a dotted key pattern -> what its value must be. A
pattern's `*` matches any run of characters, dots included (`stage.*.lr` is every learning rate under
`stage`); a key the composed config does not have is not checked (each stage has its own keys). Every
violation is reported at once, naming the key, the value and what is expected. What the table cannot
say (a dropout of 1.5, an unknown precision) is caught by building the objects: `build_or_explain` and
`check_trainer`. See docs/ARCHITECTURE.md, "Resume and skip rules".
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; raised before any file of the stage or sweep is moved or written."""


@dataclass(frozen=True)
class Rule:
    """What a value must be: `kind` int or float (an int is a valid float, a bool is neither), within
    `low` (exclusive when `low_open`) and `high` (inclusive), or None when `optional`; `extra` admits
    listed values outside the range (Lightning's -1: no limit)."""

    kind: type
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    optional: bool = False
    extra: tuple = ()

    def expected(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low}"
        alternatives = [repr(x) for x in self.extra] + (["null"] if self.optional else [])
        return what + (f" (or {' or '.join(alternatives)})" if alternatives else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if value in self.extra and not isinstance(value, bool):
            return True
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


POSITIVE_INT = Rule(int, low=0, low_open=True)
COUNT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, low_open=True)
NON_NEGATIVE = Rule(float, low=0)
FRACTION = Rule(float, low=0, high=1)
SEED = Rule(int)

DATA_RULES: dict[str, Rule] = {
    "data.batch_size": POSITIVE_INT,
    "data.eval_batch_size": POSITIVE_INT,
    "data.num_workers": COUNT,
    "data.shuffle_buffer": COUNT,
    "data.train_batches_per_epoch": Rule(int, low=0, low_open=True, optional=True),
    "data.image_size": POSITIVE_INT,
    "data.channels": POSITIVE_INT,
    "data.num_classes": POSITIVE_INT,
    "seed": SEED,
}

TRAIN_RULES: dict[str, Rule] = {
    **DATA_RULES,
    "trainer.max_steps": Rule(int, low=0, low_open=True, extra=(-1,)),
    "trainer.max_epochs": Rule(int, low=0, low_open=True, optional=True, extra=(-1,)),
    "trainer.accumulate_grad_batches": POSITIVE_INT,
    "trainer.gradient_clip_val": Rule(float, low=0, optional=True),
    "trainer.log_every_n_steps": POSITIVE_INT,
    "trainer.check_val_every_n_epoch": Rule(int, low=0, low_open=True, optional=True),
    "stage.seed": SEED,
    "stage.checkpoint_every_n_steps": POSITIVE_INT,
    "nonfinite_tolerance": COUNT,
    "stage.*.lr": POSITIVE,
    "stage.*.weight_decay": NON_NEGATIVE,
    "stage.*.warmup_steps": COUNT,
    "stage.*.total_steps": Rule(int, low=0, low_open=True, optional=True, extra=(-1,)),
    "stage.*.min_lr_ratio": FRACTION,
    "stage.*.ema_decay": Rule(float, low=0, high=1, optional=True),
    "stage.*.dropout": FRACTION,
    "stage.*.p_uncond": FRACTION,
    "stage.*.label_smoothing": FRACTION,
    # Whether it divides every width is checked by building the autoencoder (its error names the width).
    "model.autoencoder.norm_num_groups": Rule(int, low=0, low_open=True, optional=True),
    "requeue_check_every_n_steps": POSITIVE_INT,
    "progress_refresh_rate": COUNT,
}

PREPARE_RULES: dict[str, Rule] = {
    "num_workers": Rule(int, low=0, low_open=True, extra=("auto",)),
    "limit": Rule(int, low=0, low_open=True, optional=True),
    "shard_tasks": POSITIVE_INT,
    "shard_task": Rule(int, low=0, optional=True),
    "data.shard_size": POSITIVE_INT,
    "data.val_size": COUNT,
    "data.test_size": COUNT,
    "seed": SEED,
    "data.seed": SEED,
}

EVALUATE_RULES: dict[str, Rule] = {
    **DATA_RULES,
    "num_samples": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "sample_seed": SEED,
    "grid_per_class": COUNT,
    "sweep_index": Rule(int, low=0, optional=True),
    "metrics.is_splits": POSITIVE_INT,
    "metrics.is_split_size": Rule(int, low=0, low_open=True, optional=True),
    "metrics.pr_k": POSITIVE_INT,
    "metrics.kid_subset_size": POSITIVE_INT,
    "metrics.feature_batch_size": POSITIVE_INT,
    "distributed.gather_timeout_s": POSITIVE,
    "distributed.poll_s": POSITIVE,
}


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain container (list items as key.0, key.1, ...)."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}.{i}")
    else:
        yield prefix, node


def violations(cfg: DictConfig | Mapping, rules: Mapping[str, Rule]) -> list[str]:
    """One line per key of `cfg` that breaks its rule: `key=value: expected ...`."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    found = []
    for key, value in _leaves(data):
        rule = next((r for pattern, r in rules.items() if fnmatch.fnmatchcase(key, pattern)), None)
        if rule is not None and not rule.accepts(value):
            found.append(f"{key}={value!r}: expected {rule.expected()}")
    urls = (data.get("data") or {}).get("urls")
    if urls is not None and not (isinstance(urls, Mapping) and all(isinstance(v, str) for v in urls.values())):
        found.append(f"data.urls={urls!r}: expected a mapping split -> URL pattern, e.g. data.urls.train=...")
    return found


def check_config(cfg: DictConfig, rules: Mapping[str, Rule], where: str) -> None:
    """Raise ConfigError listing every key of `cfg` that breaks `rules`; `where` names what is left untouched."""
    found = violations(cfg, rules)
    if found:
        lines = "\n".join(f"  {line}" for line in found)
        raise ConfigError(f"invalid config value(s); nothing in {where} was changed:\n{lines}\n"
                          "fix the override(s) (key=value on the command line, or the config file) and run again")  # fmt: skip


def build_or_explain(node: DictConfig, key: str, where: str, build: Callable[[DictConfig], Any] = instantiate) -> Any:
    """`build(node)` (Hydra's instantiate); any error becomes a ConfigError naming the config key."""
    try:
        return build(node)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raised, the config is to blame
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ConfigError(f"{key} cannot be built from this config: {type(cause).__name__}: {cause}\n"
                          f"nothing in {where} was changed; fix the override(s) and run again") from e  # fmt: skip


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info lines ("GPU available", ...) of a Trainer built only to be checked."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero",
                                               "lightning_fabric.utilities.rank_zero", "lightning.pytorch")]  # fmt: skip
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_trainer(cfg: DictConfig, where: str) -> None:
    """Build `cfg.trainer` once without loggers, callbacks or checkpointing (no file is written), so that a
    bad trainer override fails before the stage's files are touched."""
    from pipeline.builders import quiet_intended_warnings

    quiet_intended_warnings()
    with _quiet_lightning():
        build_or_explain(cfg.trainer, "trainer", where, lambda node: instantiate(
            node, logger=False, callbacks=[], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False))  # fmt: skip
