"""Scoring samples: features by the evaluation extractor, metrics against the real split's statistics, and
the real images those statistics are computed from."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eval.features import FeatureExtractor, extract_features
from eval.metrics import (
    class_accuracy,
    describe_is_splits,
    feature_statistics,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

__all__ = ["PROVENANCE_KEYS", "Scorer", "real_image_batches"]


# What a scorer adds to every row besides the metrics: which features, weights, reference and IS convention
# the numbers were computed with (the same for every row of a sweep; `eval.sweep_report` lists them once).
PROVENANCE_KEYS = ("feature_net", "feature_weights_sha256", "reference", "reference_sha256", "is_convention")


@dataclass
class Scorer:
    """Features of samples by the evaluation extractor, and metrics against the real split's statistics.

    reference: `eval.features.reference_statistics(...)` of the real split, or `load_reference_batch(...)` of a
        guided-diffusion reference batch ({"mu", "sigma", ["mu_s", "sigma_s"], "pooled" (None: no precision/
        recall, KID), "n", "key", "source"[, "sha256"]}).
    num_classes: the generator's classes; class accuracy is reported only when the extractor's logits
        are over the same classes (the domain feature net), not for Inception's 1008 ImageNet classes.
    is_splits / is_split_size: the Inception Score's split convention (`eval.metrics.inception_score_splits`):
        `is_splits` equal splits (torch-fidelity, Salimans et al.), or, when `is_split_size` is set, splits of
        that many samples (guided-diffusion: 5000). Every row names the one used (`is_convention`).
    sFID needs spatial features (InceptionFeatures) and the reference's mu_s/sigma_s; else it is None (n/a).
    """

    extractor: FeatureExtractor
    reference: Mapping[str, Any]
    manifest_hash: str
    num_classes: int
    is_splits: int = 10
    is_split_size: int | None = None
    pr_k: int = 3
    kid: bool = False
    kid_subset_size: int = 1000
    batch_size: int = 256
    device: str | torch.device | None = None
    _fingerprint: dict | None = field(default=None, init=False, repr=False)

    def fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            n = self.reference.get("n")
            self._fingerprint = {
                "extractor": self.extractor.fingerprint(), "manifest": self.manifest_hash,
                "reference": self.reference.get("key"),  # split, data, count, preprocessing (reference_key)
                "reference_n": None if n is None else int(n), "is_splits": self.is_splits,
                "is_split_size": self.is_split_size, "pr_k": self.pr_k,
                "kid": self.kid, "kid_subset_size": self.kid_subset_size,
            }  # fmt: skip
        return self._fingerprint

    def provenance(self) -> dict[str, Any]:
        """The `PROVENANCE_KEYS` but is_convention (which depends on the sample count)."""
        return {"feature_net": self.extractor.name, "feature_weights_sha256": self.extractor.weights_sha256(),
                "reference": self.reference.get("source"),
                "reference_sha256": self.reference.get("sha256") or self.reference.get("key")}  # fmt: skip

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """images uint8 (N, H, W, C), labels (N,) -> {fid, sfid, is_mean, is_std, precision, recall,
        [kid_mean, kid_std], class_accuracy, and the `PROVENANCE_KEYS`}; a metric that cannot be computed
        with this extractor or reference is None."""
        feats = extract_features(self.extractor, images, batch_size=self.batch_size)
        fake_mu, fake_sigma = feature_statistics(feats["pooled"])
        fid = frechet_distance(self.reference["mu"], self.reference["sigma"], fake_mu, fake_sigma)
        sfid = None
        if "spatial" in feats and self.reference.get("mu_s") is not None:
            sfid = frechet_distance(self.reference["mu_s"], self.reference["sigma_s"], *feature_statistics(feats["spatial"]))
        n = len(images)
        splits = None if self.is_split_size is not None else min(self.is_splits, n)
        is_mean, is_std = inception_score(feats["logits"], splits=splits, split_size=self.is_split_size)
        real = self.reference.get("pooled")
        precision, recall = (None, None) if real is None else precision_recall(real, feats["pooled"], k=self.pr_k,
                                                                                device=self.device)  # fmt: skip
        out: dict[str, Any] = {"fid": fid, "sfid": sfid, "is_mean": is_mean, "is_std": is_std,
                               "precision": precision, "recall": recall}  # fmt: skip
        if self.kid:
            out["kid_mean"], out["kid_std"] = (None, None) if real is None else kid(
                real, feats["pooled"], subset_size=self.kid_subset_size)  # fmt: skip
        same_classes = self.extractor.num_classes == self.num_classes
        out["class_accuracy"] = class_accuracy(feats["logits"], labels) if same_classes else None
        return {**out, **self.provenance(), "is_convention": describe_is_splits(n, splits, self.is_split_size)}


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

