"""Feature extractors that score samples, and cached feature statistics of the real data.

Two extractors share one interface (`FeatureExtractor`): InceptionV3 with the FID weights for natural
images, and the domain feature net (stage feature_net) where no Inception weights are available.
Both map images to a pooled feature vector (FID, KID, precision/recall) and class logits (Inception
Score, class accuracy); Inception also to the spatial features of sFID. Nothing is ever downloaded: missing
weights are an error naming the file. Reference statistics come from the real split (`reference_statistics`,
cached) or from a guided-diffusion reference batch `.npz` (`load_reference_batch`).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.images import Images, to_float_nchw, to_uint8_nchw
from core.io import atomic_open, config_hash, sha256_file
from eval.metrics import feature_statistics
from lightning_modules.artifacts import load_feature_net

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_CONFIG_KEY = "model.features.weights_path"

class FeatureExtractor(nn.Module):
    """A frozen network: images -> {"pooled": (B, D), "logits": (B, K)[, "spatial": (B, S)]}.

    Subclasses set `name`, `feature_dim`, `num_classes`, `spatial_dim` (None: no spatial features, sFID
    n/a), `weights_file` (the file the weights were read from, named with its sha256 in reports) and
    implement `forward`, accepting uint8 (B, H, W, C) or float (B, C, H, W) in [-1, 1] (see
    `to_float_nchw` / `to_uint8_nchw`).
    """

    name: str = "feature_extractor"
    feature_dim: int
    num_classes: int
    spatial_dim: int | None = None
    weights_file: Path | None = None
    _weights_sha256: str | None = None

    def _freeze(self) -> None:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Metrics must not depend on dropout or batch-norm batch statistics: stay in eval mode.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        tensor = next(itertools.chain(self.parameters(), self.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def weights_sha256(self) -> str | None:
        """sha256 of `weights_file` (read once), as reports name the network's weights; None without a file."""
        if self._weights_sha256 is None and self.weights_file is not None:
            self._weights_sha256 = sha256_file(self.weights_file)
        return self._weights_sha256

    def fingerprint(self) -> str:
        """sha256 hex digest of the extractor name and its weights (names, dtypes, shapes, bytes)."""
        digest = hashlib.sha256(self.name.encode())
        for key, value in sorted(self.state_dict().items()):
            t = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{key}|{t.dtype}|{tuple(value.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


class DomainFeatures(FeatureExtractor):
    """The domain feature net (stage feature_net) as a metrics feature extractor.

    Args:
        checkpoint_path: the feature_net stage's final.ckpt, read (weights only) by
            `lightning_modules.artifacts.load_feature_net`; `check_eval_feature_net` checks its role.
        role: refuse a net trained for another role (None: any); user: who needs it, for the message.
    """

    name = "domain_feature_net"

    def __init__(self, checkpoint_path: str | os.PathLike, role: str | None = None, user: str = "") -> None:
        super().__init__()
        path = Path(checkpoint_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"feature-net checkpoint not found: {path} (train stage feature_net first, or set "
                f"{WEIGHTS_CONFIG_KEY})"
            )
        self.net = load_feature_net(path, role=role, user=user or "this feature extractor")
        self.weights_file = path
        self.feature_dim = self.net.feature_dim
        self.num_classes = self.net.num_classes
        self._freeze()

    def forward(self, images: Images) -> dict[str, torch.Tensor]:
        """images: uint8 (B, H, W, C) or float (B, C, H, W) in [-1, 1] -> pooled (B, D), logits (B, K)."""
        x = to_float_nchw(images).to(self.device)
        if x.shape[1] != self.net.in_channels:
            raise ValueError(f"{self.name} expects {self.net.in_channels}-channel images, got {x.shape[1]}")
        out = self.net(x)
        return {"pooled": out["pooled"], "logits": out["logits"]}


def default_inception_weights_path() -> Path:
    """Where torch hub (and pytorch-fid) cache the FID InceptionV3 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _inception_backend() -> type[nn.Module] | None:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None
    return FeatureExtractorInceptionV3


# sFID's features (guided-diffusion `evaluations/evaluator.py`: FID_SPATIAL_NAME = "mixed_6/conv:0", then
# `spatial[..., :7]`): TF's mixed_6/conv is torch-fidelity's Mixed_6d.branch1x1 (its weight converter,
# `utils/util_convert_inception_weights.py`, maps "mixed_6/conv/conv2d_params" -> "Mixed_6d.branch1x1.conv"),
# a conv + batch norm + ReLU with 192 channels at 17x17; the tensor mixed_6/conv:0 is its ReLU output.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_SIZE = 17


def spatial_features(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, 17, 17) Mixed_6d.branch1x1 output -> (B, 7 * 17 * 17 = 2023): the first 7 channels, flattened
    in TF's (H, W, C) order as guided-diffusion's evaluator does (`spatial_pred.reshape([N, -1])` of an
    NHWC tensor), so that a reference batch's `mu_s` / `sigma_s` line up element by element."""
    first = feature_map[:, :SPATIAL_CHANNELS]
    return first.permute(0, 2, 3, 1).reshape(len(first), -1).to(torch.float32)


class InceptionFeatures(FeatureExtractor):
    """InceptionV3 with the TF FID weights (2048-d pool features, 1008 logits, 2023-d spatial features for
    sFID), via torch-fidelity, the backend torchmetrics' FID uses. Grayscale is repeated to RGB;
    torch-fidelity resizes to 299x299 with its TF1-compatible bilinear resize, which reference FID numbers
    depend on.

    Args:
        weights_path: the weights file; default the torch hub cache file `INCEPTION_WEIGHTS_FILE`.
    """

    name = "inception_v3_fid"
    feature_dim = 2048
    num_classes = 1008
    spatial_dim = SPATIAL_CHANNELS * SPATIAL_SIZE * SPATIAL_SIZE

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path else default_inception_weights_path()
        backend = _inception_backend()
        hint = (
            f"No download is attempted: put {INCEPTION_WEIGHTS_FILE} there or set {WEIGHTS_CONFIG_KEY}=<file>, "
            f"or score with the domain feature net."
        )
        if not path.is_file():
            raise FileNotFoundError(f"InceptionV3 FID weights not found: expected {path}. {hint}")
        if backend is None:
            raise ImportError(
                f"InceptionFeatures needs torch-fidelity (torchmetrics' FID backend), which is not installed "
                f"(weights file: {path}, config key {WEIGHTS_CONFIG_KEY}). {hint}"
            )
        # 'logits_unbiased' (no fc bias) is what torch-fidelity and the TF reference use for IS.
        self.net = backend(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(path),
        )
        self.weights_file = path
        self._freeze()

    def forward(self, images: Images) -> dict[str, torch.Tensor]:
        """images: uint8 (B, H, W, C) or float (B, C, H, W) in [-1, 1] -> pooled (B, 2048), logits (B, 1008),
        spatial (B, 2023)."""
        x = to_uint8_nchw(images).to(self.device)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        captured: list[torch.Tensor] = []
        hook = self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            pooled, logits = self.net(x)
        finally:
            hook.remove()
        return {"pooled": pooled, "logits": logits, "spatial": spatial_features(captured[0])}


def _batches(images: Images | Iterable[Images], batch_size: int) -> Iterator[Images]:
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size]
    else:
        yield from images


@torch.inference_mode()
def extract_features(
    extractor: FeatureExtractor,
    images: Images | Iterable[Images],
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run `extractor` over uint8 images (N, H, W, C), or an iterable of such batches.

    Returns {"pooled": (N, D), "logits": (N, K)[, "spatial": (N, S) when the extractor has spatial
    features]} as float32 numpy arrays (metrics upcast to float64).
    """
    batches = _batches(images, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"features ({extractor.name})", unit="batch")
    keys = ["pooled", "logits"] + (["spatial"] if extractor.spatial_dim else [])
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for batch in batches:
        out = extractor(batch)
        for key, chunks in outputs.items():
            chunks.append(out[key].float().cpu().numpy())
    if not outputs["pooled"]:
        raise ValueError("no images to extract features from")
    return {key: np.concatenate(chunks) for key, chunks in outputs.items()}


# Bump when the way reference statistics are computed changes (e.g. what is stored, the covariance).
REFERENCE_FORMAT = 3


def reference_key(datamodule: Any, split: str) -> dict[str, Any]:
    """Everything about the real images that changes their feature statistics (the extractor's weights
    are added by `reference_cache_path`): the split, its content (the sha256 of each of its shards in
    the manifest, or, for a `data.urls` override, a hash of the URL pattern, never the URL itself, which
    may carry credentials), the number of images, and the decoding (image size, channels, pad/resize).

    datamodule: a `datamodules.webdata.WebDataModule` (its manifest, `urls`, `decoder`).
    """
    manifest = datamodule.manifest
    if split not in manifest["splits"]:
        raise KeyError(f"reference.split={split!r} is not a split of {datamodule.data_dir} "
                       f"(has {list(manifest['splits'])})")  # fmt: skip
    entry = manifest["splits"][split]
    override = (getattr(datamodule, "urls", None) or {}).get(split)
    decoder = datamodule.decoder
    return {
        "format": REFERENCE_FORMAT,
        "split": split,
        "content": {"urls_sha256": hashlib.sha256(str(override).encode()).hexdigest()} if override
        else {"shards_sha256": [shard["sha256"] for shard in entry["shards"]]},
        "num_images": int(entry["num_samples"]),
        "preprocessing": {"image_size": int(decoder.image_size), "channels": int(decoder.channels),
                          "resize": str(decoder.resize)},
    }  # fmt: skip


def reference_cache_path(cache_dir: str | os.PathLike, key: Mapping[str, Any], extractor: FeatureExtractor) -> Path:
    """`<cache_dir>/ref_<split>_<sha256(key + extractor fingerprint)[:16]>.npz`: another split, other data,
    another image count or preprocessing, or other weights, another file (`reference_key`)."""
    if not key or "split" not in key:
        raise ValueError(f"a reference key needs at least the split (see eval.features.reference_key), got {key!r}")
    return Path(cache_dir) / f"ref_{key['split']}_{_full_key_hash(key, extractor)[:16]}.npz"


def _full_key_hash(key: Mapping[str, Any], extractor: FeatureExtractor) -> str:
    return config_hash({"real": dict(key), "extractor": extractor.name, "weights": extractor.fingerprint()})


def reference_statistics(
    extractor: FeatureExtractor,
    images: Images | Iterable[Images],
    cache_dir: str | os.PathLike,
    key: Mapping[str, Any],
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Feature statistics of the real (reference-split) images, computed once and cached per `key`.

    images: uint8 (N, H, W, C) or an iterable of such batches; only consumed on a cache miss, so a lazy
    iterable costs nothing when the cache is warm. key: `reference_key(datamodule, split)` (what the
    images are); the file also stores the full key's hash and is only reused when it matches.
    Returns {"mu": (D,), "sigma": (D, D) float64, ["mu_s": (S,), "sigma_s": (S, S) of the spatial features
    when the extractor has them (sFID)], "pooled": (N, D) float32 (for precision/recall, KID), "n": int,
    "key": the hash of key + extractor (part of the scorer's fingerprint), "source": what a report names}.
    """
    path = reference_cache_path(cache_dir, key, extractor)
    full = _full_key_hash(key, extractor)
    source = f"split {key['split']}"
    if path.is_file():
        with np.load(path) as cached:
            stats = {name: cached[name] for name in cached.files}
        if str(stats.get("key", "")) == full:
            stats["n"], stats["key"] = int(stats["n"]), full
            return {**stats, "source": f"{source} ({stats['n']} images)"}
    feats = extract_features(extractor, images, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(feats["pooled"])
    stats = {"mu": mu, "sigma": sigma, "pooled": feats["pooled"], "n": len(feats["pooled"]), "key": full}
    if "spatial" in feats:
        stats["mu_s"], stats["sigma_s"] = feature_statistics(feats["spatial"])
    with atomic_open(path, "wb") as f:
        np.savez(f, **{**stats, "key": np.array(full)})
    return {**stats, "source": f"{source} ({stats['n']} images)"}


REFERENCE_BATCH_CONFIG_KEY = "reference.stats"
# (mean key, covariance key, the extractor attribute giving their dimension) of a guided-diffusion reference
# batch (`evaluations/evaluator.py`, `read_statistics`): pool features (FID) and spatial features (sFID).
REFERENCE_BATCH_STATS = (("mu", "sigma", "feature_dim"), ("mu_s", "sigma_s", "spatial_dim"))


def _batch_moments(npz: Any, path: Path, mean_key: str, cov_key: str, dim: int, extractor: FeatureExtractor) -> tuple:
    where = f"{REFERENCE_BATCH_CONFIG_KEY}={path}"
    mu, sigma = npz[mean_key], npz[cov_key]
    for key, value, shape in ((mean_key, mu, (dim,)), (cov_key, sigma, (dim, dim))):
        if value.shape != shape:
            raise ValueError(
                f"{where}: key {key!r} has shape {value.shape}, but the {extractor.name} features are {dim}-d "
                f"(expected {shape}); a reference batch must come from the same feature network (guided-diffusion's "
                "batches are InceptionV3 pool_3 / mixed_6/conv statistics: use model/features=inception)"
            )
        if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
            raise ValueError(f"{where}: key {key!r} must hold finite floats, got dtype {value.dtype}"
                             + ("" if not np.issubdtype(value.dtype, np.floating) else " with non-finite values"))
    return mu.astype(np.float64), sigma.astype(np.float64)


def _npz_image_batches(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """arr_0 of a reference batch in batches (read only when the pooled-feature cache misses)."""
    with np.load(path) as npz:
        images = npz["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{REFERENCE_BATCH_CONFIG_KEY}={path}: key 'arr_0' must be uint8 images (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}")  # fmt: skip
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def load_reference_batch(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    cache_dir: str | os.PathLike,
    batch_size: int = 256,
    progress: bool = False,
) -> dict:
    """Reference statistics from a guided-diffusion reference batch `.npz` (e.g. VIRTUAL_imagenet256_labeled.npz,
    the format `evaluations/evaluator.py` reads): `mu` (D,), `sigma` (D, D) of the pool features, `mu_s` (S,),
    `sigma_s` (S, S) of the spatial features (sFID) and `arr_0`, images uint8 (N, H, W, 3).

    The file's mu/sigma (and mu_s/sigma_s) replace the statistics of our real split. Its images, when present,
    give the pooled features that precision/recall and KID compare with (as the evaluator does), computed once
    and cached in `cache_dir` under the file's sha256; without `arr_0` those metrics are n/a, without
    mu_s/sigma_s sFID is. Every array is checked against the extractor's feature sizes before anything runs;
    an error names the file, the key, its shape and the expected one.

    Returns `reference_statistics`'s dict ("pooled" and "n" None without images) with "source" (the file)
    and "sha256" (its content).
    """
    path = Path(path)
    where = f"{REFERENCE_BATCH_CONFIG_KEY}={path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file (a guided-diffusion reference batch .npz with mu, sigma, "
                                f"mu_s, sigma_s; or set {REFERENCE_BATCH_CONFIG_KEY}=null to use reference.split)")  # fmt: skip
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where} is not a readable .npz file ({type(e).__name__}: {e})") from None
    stats: dict[str, Any] = {}
    with npz:
        files = set(npz.files)
        for mean_key, cov_key, dim_attr in REFERENCE_BATCH_STATS:
            dim = getattr(extractor, dim_attr)
            if mean_key == "mu_s" and (dim is None or not {mean_key, cov_key} & files):
                continue  # sFID n/a: the extractor has no spatial features, or the file no spatial statistics
            missing = [k for k in (mean_key, cov_key) if k not in files]
            if missing:
                raise KeyError(f"{where}: lacks {missing} (has {sorted(files)}); a guided-diffusion reference batch "
                               "holds mu, sigma (pool features) and mu_s, sigma_s (spatial features)")  # fmt: skip
            stats[mean_key], stats[cov_key] = _batch_moments(npz, path, mean_key, cov_key, dim, extractor)
    sha = sha256_file(path)
    stats.update({"pooled": None, "n": None, "source": str(path), "sha256": sha})
    if "arr_0" in files:
        key = {"split": "reference_batch", "content": {"npz_sha256": sha}}  # the file's content: its images too
        pooled = reference_statistics(extractor, _npz_image_batches(path, batch_size), cache_dir, key,
                                      batch_size=batch_size, progress=progress)  # fmt: skip
        stats.update({"pooled": pooled["pooled"], "n": int(pooled["n"])})
    stats["key"] = config_hash({"reference_batch": sha, "extractor": extractor.name, "weights": extractor.fingerprint()})
    return stats
