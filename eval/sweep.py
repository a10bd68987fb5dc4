"""The guidance-sweep job: generate class-balanced samples per guidance setting, score them, report.

A sweep is a list of `GuidanceSetting`s (`expand_settings`). For each one, `SweepJob.run_setting`
writes into `<out_dir>/<setting.name>/`:

    samples.npz    arr_0 uint8 (N, H, W, C), arr_1 int64 labels (N,) (guided-diffusion's layout), plus
                   `config_hash` and `sampling_seconds`
    grid.png       rows = classes, `grid_per_class` samples each
    metrics.json   FID, IS, precision/recall, (KID), class accuracy, the setting and its hashes

Resumability: a setting whose metrics.json carries the current config hash is skipped; samples.npz with
the current samples hash is scored without sampling again; sampling itself is checkpointed per batch
(`parts/<start>-<stop>.npz`), so an interrupted setting only redoes its unfinished batches.

Distribution (torchrun / srun / Lightning DDP environments, no process group needed): the N samples
are cut into batches of `batch_size` consecutive indices, batch b is drawn by rank b % world and written
atomically to `parts/`; rank 0 waits for every part, merges them into samples.npz and scores. Sample i
is drawn from its own generator seeded with `sample_seed + i`, so the result depends neither on the
batch size nor on the number of ranks.

Scale conventions (DESIGN.md): classifier-free `eps_u + s (eps_c - eps_u)`, s = 1 no guidance;
classifier guidance s_cls = 0 no guidance. Kind `classifier` samples the diffusion model with the null
condition (unconditionally) and steers it with the classifier alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from core.images import make_grid_png, to_uint8_nhwc
from core.io import atomic_open, atomic_write_json, config_hash, read_json
from eval.features import FeatureExtractor, extract_features
from eval.metrics import (
    class_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)
from eval.report import best_row, describe_machine, plot_sweep, write_report, write_results
from lightning_modules.artifacts import (
    DiffusionBundle,
    StageMismatchError,
    check_eval_feature_net,
    state_fingerprint,
)
from lightning_modules.diffusion import CFGDenoiser, Sampler, classifier_cond_fn, sample

GUIDANCE_KINDS = ("cfg", "classifier", "both")
PAIRINGS = ("grid", "paired")
HASH_KEYS = ("config_hash", "samples_hash", "sweep_hash")
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "GuidanceSetting",
    "SampleGenerator",
    "Scorer",
    "SweepJob",
    "check_data_compatible",
    "check_eval_feature_net",
    "class_balanced_labels",
    "collect_rows",
    "expand_settings",
    "format_table",
    "load_samples",
    "log_to_wandb",
    "real_image_batches",
    "sample_seeds",
    "select_setting",
    "write_sweep_report",
]


# --- settings --------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Short stable number text for directory names: 3.0 -> "3", 1.5 -> "1.5", 1e-3 -> "0.001"."""
    return f"{x:g}" if abs(x) >= 1e-4 or x == 0 else f"{x:.3e}"


def _slug(value: Any) -> str:
    text = str(value)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:24]
    return slug if slug == text else f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class GuidanceSetting:
    """One point of a sweep.

    kind: "cfg" (classifier-free guidance at `cfg_scale`), "classifier" (null condition, classifier
    guidance at `cls_scale`) or "both". rescale_phi: guidance rescale (Lin et al. 2023). negative: the
    condition the unconditional half uses instead of the null one (a class index/name or a prompt).
    """

    kind: str
    cfg_scale: float = 1.0
    cls_scale: float = 0.0
    rescale_phi: float = 0.0
    negative: int | str | None = None

    @property
    def conditional(self) -> bool:
        """Whether the diffusion model sees the requested class (all kinds but "classifier")."""
        return self.kind != "classifier"

    @property
    def name(self) -> str:
        """Stable directory name, e.g. cfg_s3, cls_s10, both_s3_c1, cfg_s5_phi0.7_neg2."""
        base = {
            "cfg": f"cfg_s{_fmt(self.cfg_scale)}",
            "classifier": f"cls_s{_fmt(self.cls_scale)}",
            "both": f"both_s{_fmt(self.cfg_scale)}_c{_fmt(self.cls_scale)}",
        }[self.kind]
        if self.rescale_phi:
            base += f"_phi{_fmt(self.rescale_phi)}"
        if self.negative is not None:
            base += f"_neg{_slug(self.negative)}"
        return base

    def as_row(self) -> dict[str, Any]:
        """The setting's columns of a results row (cfg_scale is None for kind "classifier": no CFG at all)."""
        return {
            "setting": self.name,
            "guidance": self.kind,
            "cfg_scale": self.cfg_scale if self.conditional else None,
            "cls_scale": self.cls_scale,
            "rescale_phi": self.rescale_phi,
            "negative": self.negative,
        }


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
        return [GuidanceSetting("cfg", cfg_scale=s, **extra) for s in _number_list("guidance.scales", scales)]
    if kind == "classifier":
        cls = _number_list("guidance.classifier_scales", classifier_scales)
        return [GuidanceSetting("classifier", cls_scale=c, rescale_phi=0.0, negative=None) for c in cls]
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
    return [GuidanceSetting("both", cfg_scale=s, cls_scale=c, **extra) for s, c in pairs]


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


# --- checks ----------------------------------------------------------------------------------------


def check_data_compatible(
    diffusion: DiffusionBundle, channels: int, image_size: int, num_classes: int
) -> None:
    """Refuse a diffusion model whose decoded samples cannot be compared with the data's real images:
    decoded (C, H, W) = (autoencoder out channels, latent h * f, latent w * f) must be the data's shape,
    the latent channels the autoencoder's, and the classes the data's."""
    ae = diffusion.autoencoder
    z_channels, h, w = diffusion.latent_shape
    decoded = (ae.hparams()["out_channels"], h * ae.downsample_factor, w * ae.downsample_factor)
    where = f"diffusion checkpoint {diffusion.path}"
    if z_channels != ae.z_channels:
        raise StageMismatchError(
            f"{where}: latents have {z_channels} channels, its autoencoder {ae.z_channels}"
        )
    if decoded != (channels, image_size, image_size):
        raise StageMismatchError(
            f"{where}: decoded samples are {decoded} (C, H, W), but the data (data.channels, "
            f"data.image_size) are {(channels, image_size, image_size)}: FID against them is meaningless"
        )
    if diffusion.num_classes != num_classes:
        raise StageMismatchError(
            f"{where}: {diffusion.num_classes} classes, the data (data.num_classes) {num_classes}"
        )


# --- generation ------------------------------------------------------------------------------------


def _sampler_description(sampler: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(sampler) if dataclasses.is_dataclass(sampler) else dict(vars(sampler))
    return {"type": type(sampler).__name__, **fields}


class SampleGenerator:
    """Decoded samples of one guidance setting: conditioning, guided sampling, decoding.

    Args:
        diffusion: the bundle of `load_diffusion` (EMA U-Net, conditioner, schedule, autoencoder).
        sampler: a DDIM/DDPM sampler (its step count and spacing define the chain).
        classifier: the noisy-latent classifier, needed by settings with s_cls != 0.
        class_names: for text conditioners: captions are `caption_template.format(class_name)`.
        device: where sampling runs.
        dtype: "fp32", or "bf16"/"fp16" autocast for the U-Net and classifier calls (the latent state,
            the sampler arithmetic and decoding stay float32).
        progress_steps: a progress bar over the sampling steps of every batch.
    """

    def __init__(
        self,
        diffusion: DiffusionBundle,
        sampler: Sampler,
        classifier: torch.nn.Module | None = None,
        class_names: Sequence[str] | None = None,
        caption_template: str = "a photo of a {}",
        device: str | torch.device = "cpu",
        dtype: str = "fp32",
        progress_steps: bool = False,
    ) -> None:
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"sampling_dtype must be one of {list(AUTOCAST_DTYPES)}, got {dtype!r}")
        self.diffusion = diffusion
        self.dtype = dtype
        self.sampler = sampler
        self.classifier = classifier
        self.class_names = list(class_names) if class_names is not None else None
        self.caption_template = caption_template
        self.device = torch.device(device)
        self.progress_steps = progress_steps
        for module in (diffusion.unet, diffusion.conditioner, diffusion.autoencoder, classifier):
            if module is not None:
                module.to(self.device).eval()
        self._fingerprints: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """Sampler columns of a results row."""
        return {"sampler": type(self.sampler).__name__, "num_steps": getattr(self.sampler, "num_steps", None),
                "dtype": self.dtype}  # fmt: skip

    @property
    def text_conditioned(self) -> bool:
        return not isinstance(self.diffusion.conditioner.null_condition(1), torch.Tensor)

    def fingerprint(self, setting: GuidanceSetting) -> dict[str, Any]:
        """What determines the samples of `setting` besides indices and seeds (weights by content)."""
        if self._fingerprints is None:
            d = self.diffusion
            self._fingerprints = {
                "unet": state_fingerprint(d.unet.state_dict()),
                "conditioner": state_fingerprint(d.conditioner.state_dict()),
                "autoencoder": d.autoencoder_fingerprint,
                "schedule": d.schedule.to_dict(),
                "prediction_type": d.prediction_type,
                "scale_factor": d.scale_factor,
                "sampler": _sampler_description(self.sampler),
                "dtype": self.dtype,
                "captions": self.caption_template if self.text_conditioned else None,
                "classifier": state_fingerprint(self.classifier.state_dict()) if self.classifier else None,
            }
        out = dict(self._fingerprints)
        if setting.cls_scale == 0:
            out["classifier"] = None  # an unused classifier does not change the samples
        return out

    def condition(self, labels: torch.Tensor) -> Any:
        """Labels (B,) -> what the conditioner takes: the labels, or one caption per label."""
        if not self.text_conditioned:
            return labels
        names = self.class_names or [str(i) for i in range(self.diffusion.num_classes)]
        return [self.caption_template.format(names[int(y)]) for y in labels]

    def negative_condition(self, negative: int | str) -> Any:
        """A batch-1 negative condition: a class index (or name) for class conditioners, else a prompt."""
        if self.text_conditioned:
            return [str(negative)]
        if isinstance(negative, str) and self.class_names and negative in self.class_names:
            negative = self.class_names.index(negative)
        try:
            index = int(negative)
        except (TypeError, ValueError):
            raise ValueError(
                f"guidance.negative={negative!r}: a class-conditioned model takes a class index or class name"
            ) from None
        return torch.tensor([index], device=self.device)

    def _context(self, condition: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        context, mask = self.diffusion.conditioner(condition)
        return context.to(self.device), None if mask is None else mask.to(self.device)

    def denoiser(self, setting: GuidanceSetting, labels: torch.Tensor) -> CFGDenoiser:
        """The guided denoiser (x, t) -> prediction of `setting` for a batch of requested labels (B,)."""
        conditioner = self.diffusion.conditioner
        null = conditioner.null_condition(1)
        cond = self._context(self.condition(labels) if setting.conditional else null)
        uncond = self._context(
            null if setting.negative is None else self.negative_condition(setting.negative)
        )
        return CFGDenoiser(self.diffusion.unet, *cond, *uncond, scale=setting.cfg_scale,
                           rescale_phi=setting.rescale_phi)  # fmt: skip

    @torch.no_grad()
    def __call__(self, setting: GuidanceSetting, labels: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """labels (B,), seeds (B,) -> uint8 images (B, H, W, C), decoded x = D(z / scale_factor)."""
        if setting.cls_scale and self.classifier is None:
            raise ValueError(f"setting {setting.name} needs a classifier (guidance.classifier_checkpoint)")
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
        cond_fn = classifier_cond_fn(self.classifier, y, setting.cls_scale) if setting.cls_scale else None
        d = self.diffusion
        dtype = AUTOCAST_DTYPES[self.dtype]
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = sample(self.denoiser(setting, y), (len(y), *d.latent_shape), d.schedule, self.sampler,
                       prediction_type=d.prediction_type, seeds=list(seeds), cond_fn=cond_fn,
                       progress=self.progress_steps, device=self.device)  # fmt: skip
        x = d.autoencoder.decode(z.float() / d.scale_factor).clamp(-1.0, 1.0)
        return to_uint8_nhwc(x)


# --- sample files ----------------------------------------------------------------------------------


def _save_npz(path: Path, **arrays: Any) -> Path:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def _npz_hash(path: Path) -> str | None:
    """The `config_hash` stored in an npz, or None when the file is missing, unreadable or has none."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return str(f["config_hash"]) if "config_hash" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """samples.npz -> (uint8 images (N, H, W, C), int64 labels (N,))."""
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


def _class_grid(
    images: np.ndarray, labels: np.ndarray, per_class: int, class_names: Sequence[str] | None, path: Path
) -> Path:
    """grid.png: one row per class (in label order), the first `per_class` samples of each."""
    classes = np.unique(labels)
    per_class = max(1, min(per_class, min(int((labels == c).sum()) for c in classes)))
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in classes])
    names = [
        class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c)) for c in classes
    ]
    captions = [names[i // per_class] if i % per_class == 0 else "" for i in range(len(picks))]
    return make_grid_png(images[picks], nrow=per_class, path=path, labels=captions)


# --- scoring ---------------------------------------------------------------------------------------


@dataclass
class Scorer:
    """Features of samples by the evaluation extractor, and metrics against the real split's statistics.

    reference: `eval.features.reference_statistics(...)` of the real split ({"mu", "sigma", "pooled", "n"}).
    num_classes: the generator's classes; class accuracy is reported only when the extractor's logits
        are over the same classes (the domain feature net), not for Inception's 1008 ImageNet classes.
    """

    extractor: FeatureExtractor
    reference: Mapping[str, Any]
    manifest_hash: str
    num_classes: int
    is_splits: int = 10
    pr_k: int = 3
    kid: bool = False
    kid_subset_size: int = 1000
    batch_size: int = 256
    device: str | torch.device | None = None
    _fingerprint: dict | None = field(default=None, init=False, repr=False)

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            self._fingerprint = {
                "extractor": self.extractor.fingerprint(), "manifest": self.manifest_hash,
                "reference_n": int(self.reference["n"]), "is_splits": self.is_splits, "pr_k": self.pr_k,
                "kid": self.kid, "kid_subset_size": self.kid_subset_size,
            }  # fmt: skip
        return self._fingerprint

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
        """images uint8 (N, H, W, C), labels (N,) -> {fid, is_mean, is_std, precision, recall,
        [kid_mean, kid_std], class_accuracy}."""
        feats = extract_features(self.extractor, images, batch_size=self.batch_size)
        fake_mu, fake_sigma = feature_statistics(feats["pooled"])
        fid = frechet_distance(self.reference["mu"], self.reference["sigma"], fake_mu, fake_sigma)
        is_mean, is_std = inception_score(feats["logits"], splits=min(self.is_splits, len(images)))
        precision, recall = precision_recall(self.reference["pooled"], feats["pooled"], k=self.pr_k,
                                             device=self.device)  # fmt: skip
        out: dict[str, float | None] = {"fid": fid, "is_mean": is_mean, "is_std": is_std,
                                        "precision": precision, "recall": recall}  # fmt: skip
        if self.kid:
            out["kid_mean"], out["kid_std"] = kid(self.reference["pooled"], feats["pooled"],
                                                  subset_size=self.kid_subset_size)  # fmt: skip
        same_classes = self.extractor.num_classes == self.num_classes
        out["class_accuracy"] = class_accuracy(feats["logits"], labels) if same_classes else None
        return out


# --- the job ---------------------------------------------------------------------------------------


@dataclass
class SweepJob:
    """Run settings into `out_dir/<setting.name>/`; see the module docstring for files and resume rules.

    generator: called as generator(setting, labels (B,), seeds (B,)) -> uint8 (B, H, W, C), with
        `fingerprint(setting) -> dict` and `describe() -> dict` (columns), i.e. a `SampleGenerator`.
    scorer: rank 0 only (None elsewhere): scorer(images, labels) -> metrics, with `fingerprint()`.
    """

    out_dir: Path
    settings: Sequence[GuidanceSetting]
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

    def samples_hash(self, setting: GuidanceSetting) -> str:
        return config_hash({**self._generation_common(), "setting": setting.as_row(),
                      "generator": self.generator.fingerprint(setting)})  # fmt: skip

    def metrics_hash(self, setting: GuidanceSetting) -> str:
        return config_hash({"samples": self.samples_hash(setting), "scorer": self.scorer.fingerprint()})

    def sweep_hash(self) -> str:
        """Everything but the settings themselves: rows with this hash belong in one report."""
        generator = self.generator.fingerprint(GuidanceSetting("cfg"))
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

    def run_setting(self, setting: GuidanceSetting) -> tuple[str, dict[str, Any] | None]:
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
        sampled = self.force or _npz_hash(samples_path) != samples_hash
        if sampled:
            self._generate(setting, setting_dir, samples_hash)
        if self.rank != 0:
            return ("sampled" if sampled else "samples exist"), None
        return ("sampled+scored" if sampled else "scored"), self._score(setting, setting_dir, samples_hash)

    def _generate(self, setting: GuidanceSetting, setting_dir: Path, samples_hash: str) -> None:
        """Draw this rank's batches into parts/ (skipping parts already there); rank 0 merges them."""
        start = time.perf_counter()
        parts = setting_dir / "parts"
        batches = batch_ranges(self.num_samples, self.batch_size)
        mine = batches[self.rank :: self.world]
        bar = tqdm(
            mine, desc=f"{setting.name}: sampling", unit="batch", leave=False, disable=not self.progress
        )
        for r in bar:
            path = parts / f"{r.start:07d}-{r.stop:07d}.npz"
            if _npz_hash(path) == samples_hash:  # a batch finished before an interruption (same content)
                continue
            idx = np.arange(r.start, r.stop)
            images = self.generator(setting, self.labels[idx], sample_seeds(idx, self.sample_seed))
            _save_npz(path, images=images, labels=self.labels[idx], config_hash=np.array(samples_hash))
        if self.rank == 0:
            self._merge(parts, batches, setting_dir / "samples.npz", samples_hash, start)

    def _merge(self, parts: Path, batches: list[range], out: Path, samples_hash: str, start: float) -> None:
        """Wait for every part (other ranks), then write samples.npz in index order and drop parts/."""
        paths = [parts / f"{r.start:07d}-{r.stop:07d}.npz" for r in batches]
        deadline = time.monotonic() + self.gather_timeout_s
        while missing := [p for p in paths if _npz_hash(p) != samples_hash]:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rank 0 waited {self.gather_timeout_s:.0f} s for the other ranks' samples; still "
                    f"missing {len(missing)} parts, e.g. {missing[0]} (did a rank die? re-run to resume)"
                )
            time.sleep(self.poll_s)
        images, labels = [], []
        for p in paths:
            with np.load(p) as f:
                images.append(f["images"])
                labels.append(f["labels"])
        labels_all = np.concatenate(labels)
        if not np.array_equal(labels_all, self.labels):
            raise RuntimeError(f"merged labels in {parts} do not match the class-balanced plan")
        _save_npz(out, arr_0=np.concatenate(images), arr_1=labels_all, config_hash=np.array(samples_hash),
                  sampling_seconds=np.array(time.perf_counter() - start))  # fmt: skip
        shutil.rmtree(parts, ignore_errors=True)

    def _score(self, setting: GuidanceSetting, setting_dir: Path, samples_hash: str) -> dict[str, Any]:
        samples_path = setting_dir / "samples.npz"
        images, labels = load_samples(samples_path)
        with np.load(samples_path) as f:
            sampling_seconds = float(f["sampling_seconds"]) if "sampling_seconds" in f.files else None
        start = time.perf_counter()
        _class_grid(images, labels, self.grid_per_class, self.class_names, setting_dir / "grid.png")
        metrics = self.scorer(images, labels)
        metrics = {
            **setting.as_row(), **metrics, "num_samples": int(len(images)), **self.generator.describe(),
            "sampling_seconds": sampling_seconds, "scoring_seconds": time.perf_counter() - start,
            "grid": str(Path(setting.name) / "grid.png"), "config_hash": self.metrics_hash(setting),
            "samples_hash": samples_hash, "sweep_hash": self.sweep_hash(),
        }  # fmt: skip
        atomic_write_json(setting_dir / "metrics.json", metrics)
        return metrics


# --- real images -----------------------------------------------------------------------------------


def real_image_batches(datamodule: Any, split: str, world: int = 1) -> Iterator[torch.Tensor]:
    """Every image of `split` as float (B, C, H, W) in [-1, 1].

    In a multi-process environment webdataset splits shards by RANK/WORLD_SIZE, but the reference
    statistics need the whole split on rank 0: there the shards are read without a node split.
    """
    if world == 1:
        for batch in datamodule.eval_dataloader(split):
            yield batch["image"]
        return
    import webdataset as wds

    from datamodules.webdata import raise_naming_shard, urls_for

    urls = urls_for(datamodule.data_dir, datamodule.manifest, split, datamodule.urls.get(split))
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, handler=raise_naming_shard)
    chunk: list[torch.Tensor] = []
    for decoded in map(datamodule.decoder, dataset):
        if decoded is not None:
            chunk.append(decoded["image"])
        if len(chunk) == datamodule.eval_batch_size:
            yield torch.stack(chunk)
            chunk = []
    if chunk:
        yield torch.stack(chunk)


# --- results and report ----------------------------------------------------------------------------


def _sort_key(row: Mapping[str, Any]) -> tuple:
    kind = (
        GUIDANCE_KINDS.index(row["guidance"])
        if row.get("guidance") in GUIDANCE_KINDS
        else len(GUIDANCE_KINDS)
    )
    return (kind, row.get("cls_scale") or 0.0, row.get("cfg_scale") or 0.0, str(row.get("setting")))


def collect_rows(out_dir: str | os.PathLike, sweep_hash: str | None = None) -> list[dict[str, Any]]:
    """metrics.json of every setting directory under `out_dir`, sorted by kind and scales; with
    `sweep_hash`, only settings made with the same models, sampler, sample count and scorer."""
    rows = []
    for path in sorted(Path(out_dir).glob("*/metrics.json")):
        metrics = read_json(path)
        if metrics is not None and (sweep_hash is None or metrics.get("sweep_hash") == sweep_hash):
            rows.append(metrics)
    return sorted(rows, key=_sort_key)


def _axes(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(x key, group key) of the plots: CFG scale (grouped by s_cls when several), or s_cls alone."""
    kinds = {row.get("guidance") for row in rows}
    if kinds == {"classifier"}:
        return "cls_scale", None
    cls_values = {row.get("cls_scale") for row in rows if row.get("guidance") != "classifier"}
    return "cfg_scale", ("cls_scale" if len(cls_values) > 1 else None)


TABLE_COLUMNS = ("setting", "cfg_scale", "cls_scale", "fid", "is_mean", "precision", "recall", "kid_mean",
                 "class_accuracy")  # fmt: skip


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of the main columns, for the terminal."""
    columns = [c for c in TABLE_COLUMNS if any(row.get(c) is not None for row in rows)]

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_sweep_report(
    out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], title: str, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """results.csv/json, plots/*.png and report.md (plots and each setting's grid embedded) in `out_dir`.

    Returns {"results_csv", "results_json", "plots": {name: path}, "grids": {setting: path}, "report",
    "x_key"}. Hash columns are kept out of the tables (they stay in each metrics.json).
    """
    out_dir = Path(out_dir)
    table = [{k: v for k, v in row.items() if k not in HASH_KEYS} for row in rows]
    csv_path, json_path = write_results(table, out_dir)
    x_key, group_key = _axes(table)
    plots = plot_sweep(table, x_key, out_dir / "plots", group_key=group_key) if table else {}
    grids = {
        row["setting"]: out_dir / row["grid"] for row in table if (out_dir / str(row.get("grid"))).is_file()
    }
    best = best_row(table, "fid")
    meta = {**meta, "best setting (FID)": best["setting"] if best else None, "machine": describe_machine()}
    report = write_report(table, plots, grids, out_dir / "report.md", title=title, meta=meta)
    return {"results_csv": csv_path, "results_json": json_path, "plots": plots, "grids": grids,
            "report": report, "x_key": x_key}  # fmt: skip


def log_to_wandb(
    rows: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, Any],
    run_dir: str | os.PathLike,
    run_id: str,
    project: str,
    group: str,
    name: str,
    entity: str | None = None,
    tags: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    offline: bool = True,
) -> str:
    """Log the results table, the plots (images and W&B line plots) and the sample grids to one W&B run
    (job_type "evaluate"); the stable `run_id` makes a re-run continue the same run. Returns its dir."""
    import wandb

    run = wandb.init(dir=str(run_dir), id=run_id, resume="allow", project=project, entity=entity, group=group,
                     job_type="evaluate", name=name, tags=list(tags), config=dict(config or {}),
                     mode="offline" if offline else "online")  # fmt: skip
    try:
        table_rows = [{k: v for k, v in row.items() if k not in HASH_KEYS} for row in rows]
        columns = list(dict.fromkeys(k for row in table_rows for k in row))
        table = wandb.Table(
            columns=columns, data=[[_wandb_cell(row.get(c)) for c in columns] for row in table_rows]
        )
        logs: dict[str, Any] = {"eval/results": table}
        x_key = outputs.get("x_key", "cfg_scale")
        for metric in ("fid", "is_mean", "precision", "recall", "class_accuracy"):
            if x_key in columns and metric in columns:
                logs[f"eval/{metric}_vs_{x_key}"] = wandb.plot.line(
                    table, x_key, metric, title=f"{metric} vs {x_key}"
                )
        logs |= {f"eval/plots/{k}": wandb.Image(str(p)) for k, p in outputs.get("plots", {}).items()}
        logs |= {
            f"eval/grids/{k}": wandb.Image(str(p), caption=k) for k, p in outputs.get("grids", {}).items()
        }
        run.log(logs)
        best = best_row(table_rows, "fid")
        if best is not None:
            run.summary.update({f"best/{k}": v for k, v in best.items() if isinstance(v, int | float | str)})
        return str(run.dir)
    finally:
        run.finish()


def _wandb_cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
