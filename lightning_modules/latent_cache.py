"""Cached latents: encode the train split once into WebDataset shards of posterior moments, train from them.

Each cached sample holds `__key__`, `moments.npy` ((2C, h, w) mean and log-variance of q(z | x), the
parameters of `DiagonalGaussian`, so training still draws z from the posterior), `cls` and `txt`. A
`manifest.json` in the shard layout of `datamodules.shards` (so `urls_for` and `verify_shards` read it)
records the cache's identity (`cache_identity`: the autoencoder's weight fingerprint, the image dataset's
content hash, ...): a cache of another identity is rebuilt, never reused (docs/ARCHITECTURE.md, "Latent
cache").

Built by every rank of a run at once, on a filesystem the nodes may share: latent shard i is named after
image shard i and written only by rank i % world, atomically (a temp file of its own, renamed), followed by
its record `<shard>.json` (identity hash, samples, sha256, bytes). After a barrier, rank 0 checks every
record, removes the temp files of killed writes and writes the manifest, atomically; after a second barrier
every rank reads it. A shard whose record matches the identity and whose bytes match the record is kept, so
a killed build resumes where it stopped and a finished cache is verified (each rank hashes its own shards)
and reused.
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

from core.dist import group_rank_world, rank_barrier
from core.io import atomic_open, atomic_write_json, config_hash, read_json, remove_stale_temps, sha256_file
from datamodules.shards import MANIFEST, load_manifest
from datamodules.webdata import WebDataModule, raise_naming_shard, urls_for
from lightning_modules.codec import LatentCodec

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RECORD_SUFFIX = ".json"  # <shard>.json: the record of a finished latent shard


def _every_shard(src: Any, group: Any = None) -> Any:
    """WebDataset splitter that keeps all shards: the encoding rank reads the whole image shard."""
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


def _record_path(cache_dir: Path, name: str) -> Path:
    return cache_dir / f"{name}{RECORD_SUFFIX}"


def _intact_record(cache_dir: Path, name: str, identity_hash: str, old_entry: dict | None) -> dict | None:
    """The record of latent shard `name` if it was finished for this identity and its file still matches it
    (size, then sha256); None otherwise. `old_entry`: its entry in a manifest of this identity, the record of
    a cache written before records existed."""
    path = cache_dir / name
    record = read_json(_record_path(cache_dir, name)) or {}
    if record.get("identity_hash") != identity_hash:
        if old_entry is None:
            return None
        record = {**old_entry, "identity_hash": identity_hash}
    if not path.is_file() or path.stat().st_size != record.get("bytes", path.stat().st_size):
        return None
    if sha256_file(path) != record.get("sha256"):
        log.warning("latent shard %s does not match its record (damaged?): re-encoding it", path)
        return None
    return {**record, "bytes": path.stat().st_size}


def _encode(codec: LatentCodec, dm: WebDataModule, url: str, cache_dir: Path, identity_hash: str,
            batch_size: int, device: torch.device, dtype: np.dtype) -> dict:  # fmt: skip
    """Write the latent shard of image shard `url`, then its record; returns the record."""
    name = Path(url).name
    _record_path(cache_dir, name).unlink(missing_ok=True)  # an old record never describes the new file
    path = cache_dir / name
    n = _write_latent_shard(codec, dm, url, path, batch_size, device, dtype)
    return {"name": name, "num_samples": n, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "identity_hash": identity_hash}  # fmt: skip


def _manifest_from_records(cache_dir: Path, names: list[str], identity: dict, identity_hash: str,
                           latent_channels: int) -> dict[str, Any]:  # fmt: skip
    """Rank 0, after every rank finished its shards: the manifest of the records of all `names`."""
    shards = []
    for name in names:
        record = read_json(_record_path(cache_dir, name)) or {}
        if record.get("identity_hash") != identity_hash:
            raise RuntimeError(
                f"latent cache {cache_dir}: no finished record {_record_path(cache_dir, name)} for shard {name} "
                "after every rank passed the barrier (did its rank fail?); re-run the stage to finish the cache"
            )
        shards.append({k: record[k] for k in ("name", "num_samples", "sha256", "bytes")})
    return {"identity": identity, "latent_channels": latent_channels,
            "splits": {"train": {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}}}  # fmt: skip


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

    One latent shard per image shard (same name). Called by every rank of an initialised process group at
    once (each encodes its share, see the module docstring), or by a lone process (it encodes all). Returns
    the cache manifest.
    """
    cache_dir = Path(cache_dir)
    rank, world = group_rank_world()
    urls = dm._urls("train")
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"the train shards of {dm.data_dir} repeat file names (latent shards are named after "
                         f"them): {names}")  # fmt: skip
    codec = LatentCodec.load(autoencoder_checkpoint)
    identity = cache_identity(codec.fingerprint, dm, dtype)
    identity_hash = config_hash(identity)
    old = read_json(cache_dir / MANIFEST)
    old = old if isinstance(old, dict) and old.get("identity") == identity else None
    old_entries = {s["name"]: s for s in old["splits"]["train"]["shards"]} if old else {}
    if rank == 0 and old is None:  # another identity's manifest no longer describes the shards
        (cache_dir / MANIFEST).unlink(missing_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    codec.to(device)
    with rank_barrier() as wait:
        encoded, kept = [], []
        for url in tqdm(urls[rank::world], desc="latent cache", unit="shard", disable=not progress or rank != 0):
            name = Path(url).name
            record = _intact_record(cache_dir, name, identity_hash, old_entries.get(name))
            if record is None:
                record = _encode(codec, dm, url, cache_dir, identity_hash, batch_size, torch.device(device),
                                 np.dtype(dtype))  # fmt: skip
                encoded.append(name)
            else:
                kept.append(name)
            if read_json(_record_path(cache_dir, name)) != record:
                atomic_write_json(_record_path(cache_dir, name), record)
        log.info("latent cache %s: rank %d/%d encoded %d shards [%s], kept %d [%s]", cache_dir, rank, world,
                 len(encoded), " ".join(encoded), len(kept), " ".join(kept))  # fmt: skip
        wait()
        if rank == 0:
            # every rank is past its writes: the temp files left are those of killed writes
            for name in [*names, *(n + RECORD_SUFFIX for n in names), MANIFEST]:
                remove_stale_temps(cache_dir / name)
            manifest = _manifest_from_records(cache_dir, names, identity, identity_hash, codec.latent_channels)
            if manifest != old:
                atomic_write_json(cache_dir / MANIFEST, manifest)
        wait()
    return load_manifest(cache_dir)


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

    `setup("fit")` encodes the train split with the frozen autoencoder if `cache_dir` holds no matching
    cache: on every rank, each its share of the shards (`ensure_latent_cache`). Not in `prepare_data`:
    Lightning runs that on one process per node (`prepare_data_per_node=True`) or on one process in all, never
    on every rank; `setup` runs on every rank once the process group exists. Training then streams the cached
    moments exactly as the parent streams images (resampled shards, split by node and worker, fixed epoch
    length). Validation and test still read images. Without `cache_latents` it is the parent unchanged.
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

    def setup(self, stage: str) -> None:
        if self.cache_latents and stage == "fit":
            self.build_latent_cache()

    def build_latent_cache(self) -> dict[str, Any]:
        """`ensure_latent_cache` on this rank's device (the trainer's, else the CPU); returns the manifest."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        return ensure_latent_cache(self.cache_dir, self, self.autoencoder_checkpoint, self.cache_dtype,
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
