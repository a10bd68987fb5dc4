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
    feature_statistics,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

__all__ = ["Scorer", "real_image_batches"]


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
                "reference": self.reference.get("key"),  # split, data, count, preprocessing (reference_key)
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

