"""Cached latents: encode the train split once into WebDataset shards of posterior moments, train from them.

Each cached sample holds `__key__`, `moments.npy` ((2C, h, w) mean and log-variance of q(z | x), the
parameters of `DiagonalGaussian`, so training still draws z from the posterior), `cls` and `txt`. A
`manifest.json` in the shard layout of `datamodules.shards` (so `urls_for` and `verify_shards` read it)
records the autoencoder's weight fingerprint and the image dataset's content hash: a cache made from other
weights or other data is rebuilt, never reused. Shards are written to temp files and renamed, the manifest
last.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from core.io import atomic_open, atomic_write_json, sha256_file
from datamodules.shards import MANIFEST, ShardChecksumError, load_manifest, verify_shards
from datamodules.webdata import WebDataModule, raise_naming_shard, urls_for
from lightning_modules.codec import LatentCodec

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _every_shard(src: Any, group: Any = None) -> Any:
    """WebDataset splitter that keeps all shards: the encoder process reads the whole split."""
    yield from src


def _batches(dm: WebDataModule, url: str, batch_size: int):
    """Decoded image samples of one shard, in order, as lists of at most `batch_size`."""
    ds = wds.WebDataset(url, shardshuffle=False, nodesplitter=_every_shard, workersplitter=_every_shard,
                        handler=raise_naming_shard, empty_check=False).map(dm.decoder)  # fmt: skip
    chunk: list[dict] = []
    for s in ds:
        if s is not None:
            chunk.append(s)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def _write_latent_shard(codec: LatentCodec, dm: WebDataModule, url: str, path: Path, batch_size: int,
                        device: torch.device, dtype: np.dtype) -> int:  # fmt: skip
    count = 0
    # an int mtime: no PAX header per member (see shards.py)
    with atomic_open(path, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
        for chunk in _batches(dm, url, batch_size):
            images = torch.stack([s["image"] for s in chunk]).to(device)
            moments = codec.moments(images).float().cpu().numpy().astype(dtype)  # (B, 2C, h, w)
            for s, m in zip(chunk, moments):
                sink.write({"__key__": s["key"], "moments.npy": m, "cls": s["label"], "txt": s["caption"]})
            count += len(chunk)
    return count


def cache_identity(fingerprint: str, dm: WebDataModule, dtype: str) -> dict[str, Any]:
    """What a cache depends on: the autoencoder weights, the dataset content and how images are fitted."""
    return {"version": CACHE_VERSION, "autoencoder_fingerprint": fingerprint, "dtype": dtype,
            "source_content_hash": dm.manifest.get("content_hash"), "image_size": dm.image_size,
            "channels": dm.channels, "resize": dm.decoder.resize}  # fmt: skip


def ensure_latent_cache(
    cache_dir: str | os.PathLike,
    dm: WebDataModule,
    autoencoder_checkpoint: str | os.PathLike,
    dtype: str = "float16",
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode `dm`'s train split into latent shards in `cache_dir` unless a matching, intact cache is there.

    One latent shard per image shard (same name). Returns the cache manifest.
    """
    cache_dir = Path(cache_dir)
    codec = LatentCodec.load(autoencoder_checkpoint)
    identity = cache_identity(codec.fingerprint, dm, dtype)
    if (cache_dir / MANIFEST).exists():
        old = load_manifest(cache_dir)
        if old.get("identity") == identity:
            try:
                verify_shards(cache_dir, old)
                log.info("latent cache %s matches the autoencoder and data: reusing it", cache_dir)
                return old
            except ShardChecksumError as err:
                log.warning("latent cache %s is damaged (%s): re-encoding", cache_dir, err)
        (cache_dir / MANIFEST).unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    codec.to(device)
    shards, total = [], 0
    for url in tqdm(dm._urls("train"), desc="encoding latents", unit="shard", disable=not progress):
        path = cache_dir / Path(url).name
        n = _write_latent_shard(codec, dm, url, path, batch_size, torch.device(device), np.dtype(dtype))
        shards.append({"name": path.name, "num_samples": n, "sha256": sha256_file(path)})
        total += n
    manifest = {"identity": identity, "latent_channels": codec.latent_channels,
                "splits": {"train": {"num_samples": total, "shards": shards}}}  # fmt: skip
    atomic_write_json(cache_dir / MANIFEST, manifest)
    return manifest


def decode_latent_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw cached sample -> dict(moments (2C, h, w) float32, label, caption, key)."""
    moments = np.load(io.BytesIO(sample["moments.npy"]))
    return {"moments": torch.from_numpy(moments.astype(np.float32)), "label": int(sample["cls"]),
            "caption": sample["txt"].decode("utf-8"), "key": sample["__key__"]}  # fmt: skip


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "moments": torch.stack([s["moments"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


class LatentCacheDataModule(WebDataModule):
    """`WebDataModule` that, with `cache_latents`, trains from cached latent shards.

    `prepare_data` (once per node, before any process reads data) encodes the train split with the frozen
    autoencoder if `cache_dir` holds no matching cache; training then streams the cached moments exactly as
    the parent streams images (resampled shards, split by node and worker, fixed epoch length).
    Validation and test still read images. Without `cache_latents` it is the parent unchanged.
    Random horizontal flips are not applied to cached latents (the cache holds unflipped images).
    """

    def __init__(self, *, cache_latents: bool = False, cache_dir: str | None = None,
                 autoencoder_checkpoint: str | None = None, cache_dtype: str = "float16",
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        if cache_latents and (cache_dir is None or autoencoder_checkpoint is None):
            raise ValueError("cache_latents needs cache_dir and autoencoder_checkpoint")
        self.cache_latents, self.cache_dir = cache_latents, cache_dir
        self.autoencoder_checkpoint, self.cache_dtype = autoencoder_checkpoint, cache_dtype
        if cache_latents and self.hflip:
            warnings.warn("cache_latents: horizontal flips are not applied to cached latents", stacklevel=2)

    def prepare_data(self) -> None:
        if not self.cache_latents:
            return
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        ensure_latent_cache(self.cache_dir, self, self.autoencoder_checkpoint, self.cache_dtype,
                            batch_size=self.eval_batch_size, device=device)  # fmt: skip

    def make_train_dataset(self) -> wds.WebDataset:
        if not self.cache_latents:
            return super().make_train_dataset()
        rank, _ = self._world()
        urls = urls_for(self.cache_dir, load_manifest(self.cache_dir), "train")
        ds = wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node,
                            workersplitter=wds.split_by_worker, handler=raise_naming_shard,
                            seed=self.seed + 1000 * rank)  # fmt: skip
        ds = ds.shuffle(self.shuffle_buffer).map(decode_latent_sample)
        return ds.batched(self.batch_size, collation_fn=collate_latents, partial=False)
