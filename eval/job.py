"""The guidance-sweep job: generate class-balanced samples per guidance setting, score them, report.

For each setting (a `GuidanceSetting` of `eval.settings.expand_settings`, or a point of a sampler sweep,
`eval.sampler_sweep.SweepSetting`), `SweepJob.run_setting` writes into
`<out_dir>/<setting.name>/` the sample store of `eval.samples` (samples.npz, grid.png) and

    metrics.json   FID, sFID, IS, precision/recall, (KID), class accuracy, the setting, its hashes, and what
                   the numbers were computed with: feature network and weights sha256, reference, IS split
                   convention, number of samples and their seeds

Resumability: a setting whose metrics.json carries the current config hash is skipped; samples.npz with
the current samples hash is scored without sampling again; sampling itself is checkpointed per batch
(`parts/<start>-<stop>.npz`), so an interrupted setting only redoes its unfinished batches.

Distribution (torchrun / srun / Lightning DDP environments, no process group needed): the N samples
are cut into batches of `batch_size` consecutive indices, batch b is drawn by rank b % world and written
atomically to `parts/`; rank 0 waits for every part, merges them into samples.npz and scores. Sample i
is drawn from its own generator seeded with `sample_seed + i`, so its noise depends neither on the
batch size nor on the number of ranks (its decoded pixels only up to float rounding: one uint8 level).

Scale conventions: see `lightning_modules.generation` and docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from core.io import atomic_write_json, config_hash, read_json
from eval.sampler_sweep import Setting
from eval.samples import class_grid, load_samples, merge_parts, npz_hash, part_path, save_npz
from eval.settings import batch_ranges, class_balanced_labels, sample_seeds
from lightning_modules.generation import GuidanceSetting

__all__ = ["SweepJob"]


@dataclass
class SweepJob:
    """Run settings into `out_dir/<setting.name>/`; see the module docstring for files and resume rules.

    generator: called as generator(setting, labels (B,), seeds (B,)) -> uint8 (B, H, W, C), with
        `fingerprint(setting) -> dict` and `describe(setting) -> dict` (columns), i.e. a `SampleGenerator`.
    scorer: rank 0 only (None elsewhere): scorer(images, labels) -> metrics, with `fingerprint()`.
    """

    out_dir: Path
    settings: Sequence[Setting]
    generator: Any
    scorer: Any | None
    num_samples: int
    num_classes: int
    batch_size: int = 250
    sample_seed: int = 0
    class_names: Sequence[str] | None = None
    grid_per_class: int = 8
    rank: int = 0
    world: int = 1
    gather_timeout_s: float = 3600.0
    poll_s: float = 1.0
    progress: bool = True
    force: bool = False
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.labels = class_balanced_labels(self.num_samples, self.num_classes)

    # hashes: samples depend on the generator and the setting; metrics also on the scorer.
    def _generation_common(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "sample_seed": self.sample_seed,
        }

    def samples_hash(self, setting: Setting) -> str:
        return config_hash({**self._generation_common(), "setting": setting.as_row(),
                      "generator": self.generator.fingerprint(setting)})  # fmt: skip

    def metrics_hash(self, setting: Setting) -> str:
        return config_hash({"samples": self.samples_hash(setting), "scorer": self.scorer.fingerprint()})

    def sweep_hash(self) -> str:
        """Everything but the settings themselves: rows with this hash belong in one report. In a sampler
        sweep the sampler is part of the setting (each row's samples hash has it), not of the sweep."""
        generator = self.generator.fingerprint(GuidanceSetting("cfg"))
        if any(getattr(s, "sampler", None) is not None for s in self.settings):
            generator["sampler"] = "per setting"
        return config_hash(
            {**self._generation_common(), "generator": generator, "scorer": self.scorer.fingerprint()}
        )

    def run(self) -> list[dict[str, Any]]:
        """All settings, with a progress bar; returns the metrics of each on rank 0 ([] elsewhere)."""
        rows = []
        bar = tqdm(self.settings, desc="sweep", unit="setting", disable=not self.progress)
        for setting in bar:
            bar.set_postfix_str(setting.name)
            status, metrics = self.run_setting(setting)
            self.log(
                f"[evaluate] {setting.name}: {status}"
                + (f" -> {self.out_dir / setting.name}" if metrics else "")
            )
            if metrics is not None:
                rows.append(metrics)
        return rows

    def run_setting(self, setting: Setting) -> tuple[str, dict[str, Any] | None]:
        """-> (status, metrics on rank 0 else None). status: "skipped (done with this config)" when
        metrics.json matches, "scored" when existing samples were only scored, else "sampled+scored"
        ("sampled" / "samples exist" on ranks > 0, which never score)."""
        setting_dir = self.out_dir / setting.name
        samples_hash = self.samples_hash(setting)
        existing = read_json(setting_dir / "metrics.json") or {}
        if not self.force:
            if self.rank == 0 and existing.get("config_hash") == self.metrics_hash(setting):
                return "skipped (done with this config)", existing
            if self.rank != 0 and existing.get("samples_hash") == samples_hash:
                return "skipped (done with this config)", None
        samples_path = setting_dir / "samples.npz"
        sampled = self.force or npz_hash(samples_path) != samples_hash
        if sampled:
            self._generate(setting, setting_dir, samples_hash)
        if self.rank != 0:
            return ("sampled" if sampled else "samples exist"), None
        return ("sampled+scored" if sampled else "scored"), self._score(setting, setting_dir, samples_hash)

    def _generate(self, setting: Setting, setting_dir: Path, samples_hash: str) -> None:
        """Draw this rank's batches into parts/ (skipping parts already there); rank 0 merges them."""
        start = time.perf_counter()
        parts = setting_dir / "parts"
        batches = batch_ranges(self.num_samples, self.batch_size)
        mine = batches[self.rank :: self.world]
        bar = tqdm(
            mine, desc=f"{setting.name}: sampling", unit="batch", leave=False, disable=not self.progress
        )
        for r in bar:
            path = part_path(parts, r)
            if npz_hash(path) == samples_hash:  # a batch finished before an interruption (same content)
                continue
            idx = np.arange(r.start, r.stop)
            images = self.generator(setting, self.labels[idx], sample_seeds(idx, self.sample_seed))
            save_npz(path, images=images, labels=self.labels[idx], config_hash=np.array(samples_hash))
        if self.rank == 0:
            merge_parts(parts, batches, setting_dir / "samples.npz", samples_hash, self.labels, start,
                        self.gather_timeout_s, self.poll_s)  # fmt: skip

    def _score(self, setting: Setting, setting_dir: Path, samples_hash: str) -> dict[str, Any]:
        samples_path = setting_dir / "samples.npz"
        images, labels = load_samples(samples_path)
        with np.load(samples_path) as f:
            sampling_seconds = float(f["sampling_seconds"]) if "sampling_seconds" in f.files else None
        start = time.perf_counter()
        class_grid(images, labels, self.grid_per_class, self.class_names, setting_dir / "grid.png")
        metrics = self.scorer(images, labels)
        metrics = {
            **setting.as_row(), **metrics, "num_samples": int(len(images)),
            "seeds": f"{self.sample_seed}..{self.sample_seed + len(images) - 1} (sample i: sample_seed + i)",
            **self.generator.describe(setting),
            "sampling_seconds": sampling_seconds, "scoring_seconds": time.perf_counter() - start,
            "grid": str(Path(setting.name) / "grid.png"), "config_hash": self.metrics_hash(setting),
            "samples_hash": samples_hash, "sweep_hash": self.sweep_hash(),
        }  # fmt: skip
        atomic_write_json(setting_dir / "metrics.json", metrics, sort_keys=False)  # row order = column order
        return metrics

