"""The streaming LightningDataModule over the WebDataset shards described by `manifest.json`.

Training streams resampled shards (each rank and worker draws its own shard sequence) through a
shuffle buffer, and `WebLoader.with_epoch(n)` gives every rank exactly `n` batches, so DDP never
hangs on uneven data. Validation and test read each shard once, split by node then by worker: every
sample is seen exactly once across all ranks and workers, in a deterministic order.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from datamodules.shards import load_manifest

log = logging.getLogger(__name__)


# Image keys a sample may carry: prepare writes `png`; shards of other producers (img2dataset) carry the
# original encoded bytes as `jpg`/`jpeg`/`webp`. Pillow decodes each the same way.
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class ShardReadError(RuntimeError):
    """A shard could not be opened or read (missing, truncated, not a tar)."""


def raise_naming_shard(exn: Exception) -> bool:
    """WebDataset handler for shard-level errors: re-raise with the shard's URL in the message."""
    url = next((a for a in reversed(getattr(exn, "args", ())) if isinstance(a, str) and a), None)
    raise ShardReadError(f"cannot read shard {url or '?'}: {exn!r}") from exn


def _local_path(url: str) -> str | None:
    """The file a shard URL names, or None for a remote one (`pipe:`, `http(s)://`, `s3://`, ...)."""
    if url.startswith("file:"):
        return url.removeprefix("file:").removeprefix("//")
    return None if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url) else url


def check_url_override(data_dir: str | Path, manifest: dict, split: str, pattern: str) -> list[str]:
    """The URLs of the override `data.urls.<split>` (a brace pattern or `pipe:` command), checked against the
    manifest: as many shards as the split has; a local file must exist, carry the name of one of the split's
    shards and its recorded size. Remote URLs can only be counted; errors name the key, never a remote URL
    (it may carry credentials)."""
    where, key = Path(data_dir) / "manifest.json", f"data.urls.{split}"
    if split not in manifest["splits"]:
        raise ValueError(f"{key}: {where} has no split {split!r} (splits: {sorted(manifest['splits'])}); "
                         "fix the key or remove it")  # fmt: skip
    shards = manifest["splits"][split]["shards"]
    urls = list(wds.shardlists.expand_urls(pattern))
    if len(urls) != len(shards):
        raise ValueError(f"{key} names {len(urls)} shard(s) but split {split!r} of {where} has {len(shards)}: "
                         "point it at a copy of exactly those shards")  # fmt: skip
    by_name = {s["name"]: s for s in shards}
    for url in urls:
        if (path := _local_path(url)) is None:
            continue
        if (shard := by_name.get(Path(path).name)) is None:
            raise ValueError(f"{key}: {path} is not a shard of split {split!r} in {where} (its shards are "
                             f"{shards[0]['name']} ... {shards[-1]['name']}); point it at a copy of those shards")  # fmt: skip
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}: shard {path} does not exist; fix the pattern or copy the shards there")
        if "bytes" in shard and (size := os.path.getsize(path)) != shard["bytes"]:
            raise ShardReadError(f"{key}: shard {path} is {size} bytes but {where} records {shard['bytes']} for "
                                 f"{shard['name']}: not a copy of that shard")  # fmt: skip
    return urls


def urls_for(data_dir: str | Path, manifest: dict, split: str, override: str | None = None) -> list[str]:
    """Shard URLs of a split: local files from the manifest, or an override (brace pattern, `pipe:`) checked
    by `check_url_override`."""
    if override:
        return check_url_override(data_dir, manifest, split, override)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in the manifest of {data_dir} (has {list(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    urls = [str(Path(data_dir) / s["name"]) for s in shards]
    missing = [u for u in urls if not os.path.exists(u)]
    if missing:
        raise FileNotFoundError(
            f"shard {missing[0]} (split {split}) listed in {Path(data_dir) / 'manifest.json'} is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; re-run prepare with force=true"
        )
    # A size check costs one stat per shard and catches a truncated copy even when the cut falls on a
    # tar header boundary, where tarfile just sees the end of the archive (the sha256 check is in prepare).
    for url, shard in zip(urls, shards, strict=True):
        if "bytes" in shard and (size := os.path.getsize(url)) != shard["bytes"]:
            raise ShardReadError(
                f"shard {url} (split {split}) is {size} bytes but {Path(data_dir) / 'manifest.json'} records "
                f"{shard['bytes']}: truncated or replaced; re-run prepare with force=true"
            )
    return urls


class SampleDecoder:
    """Raw WebDataset sample -> dict(image (C, H, W) float in [-1, 1], label, caption, key).

    A sample that fails to decode is skipped with a warning and counted in a counter shared by the
    DataLoader workers (so the LightningModule can log how many were lost).
    """

    def __init__(self, image_size: int, channels: int, resize: str, counter: Any) -> None:
        if resize not in ("pad", "resize"):
            raise ValueError(f"data.resize must be 'pad' or 'resize', got {resize!r}")
        self.image_size, self.channels, self.resize = image_size, channels, resize
        self.counter = counter

    def to_tensor(self, png: bytes) -> torch.Tensor:
        mode = "L" if self.channels == 1 else "RGB"
        with Image.open(io.BytesIO(png)) as im:
            if im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        c, h, w = arr.shape
        s = self.image_size
        if (self.resize == "pad" and h <= s and w <= s) or (h, w) == (s, s):
            # Scale and pad (with black, -1) in one numpy pass: no per-sample torch ops on this hot path.
            out = np.full((c, s, s), -1.0, dtype=np.float32)
            top, left = (s - h) // 2, (s - w) // 2
            inner = out[:, top : top + h, left : left + w]
            np.multiply(arr, 1 / 127.5, out=inner, casting="unsafe")
            inner -= 1.0
            return torch.from_numpy(out)
        # resize=resize, or an image larger than image_size (padding cannot shrink it): bicubic, antialiased.
        x = torch.from_numpy(arr.copy()).float().div(127.5).sub(1.0)
        return F.interpolate(x[None], size=(s, s), mode="bicubic", align_corners=False, antialias=True)[0].clamp(-1, 1)

    def __call__(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        try:
            image = self.to_tensor(next(sample[k] for k in IMAGE_KEYS if k in sample))
            label = int(sample["cls"]) if "cls" in sample else 0  # caption-only shards (img2dataset): one class
            caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped, not fatal
            with self.counter.get_lock():
                self.counter.value += 1
            warnings.warn(f"skipping corrupt sample {key} in {sample.get('__url__', '?')}: {e!r}", stacklevel=1)
            return None
        return {"image": image, "label": label, "caption": caption, "key": key}


def collate(samples: list[dict]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def _drop_none(src: Iterator[dict | None]) -> Iterator[dict]:
    return (s for s in src if s is not None)


def _flip(sample: dict) -> dict:
    if torch.rand(()) < 0.5:
        sample["image"] = sample["image"].flip(-1)
    return sample


class WebDataModule(pl.LightningDataModule):
    """Streams the shards of one prepared dataset (see `datamodules.shards`)."""

    def __init__(
        self,
        data_dir: str,
        image_size: int = 32,
        channels: int = 1,
        resize: str = "pad",
        hflip: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        shuffle_buffer: int = 2000,
        train_batches_per_epoch: int | None = None,
        urls: dict[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.train_batches_per_epoch = train_batches_per_epoch
        self.urls = dict(urls or {})
        for split, pattern in self.urls.items():  # a bad override fails here, before a stage touches its files
            check_url_override(self.data_dir, self.manifest, split, pattern)
        self.seed = seed
        self.skipped = mp.Value("l", 0)
        self.decoder = SampleDecoder(image_size, channels, resize, counter=self.skipped)
        self.hflip = hflip

    # --- what the stages need to know about the data -------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def num_samples(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_samples"])

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def batches_per_epoch(self) -> int:
        if self.train_batches_per_epoch:
            return int(self.train_batches_per_epoch)
        _, world = self._world()
        return max(1, self.num_samples("train") // (self.batch_size * world))

    # --- loaders ---------------------------------------------------------------------------------
    def _urls(self, split: str) -> list[str]:
        return urls_for(self.data_dir, self.manifest, split, self.urls.get(split))

    def make_train_dataset(self) -> wds.WebDataset:
        rank, _ = self._world()
        ds = wds.WebDataset(
            self._urls("train"),
            resampled=True,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=raise_naming_shard,
            seed=self.seed + 1000 * rank,
        )
        ds = ds.shuffle(self.shuffle_buffer).map(self.decoder).compose(_drop_none)
        if self.hflip:
            ds = ds.map(_flip)
        return ds.batched(self.batch_size, collation_fn=collate, partial=False)

    def make_eval_dataset(self, split: str) -> wds.WebDataset:
        ds = wds.WebDataset(
            self._urls(split),
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=raise_naming_shard,
            empty_check=False,  # a rank or worker may get no shard when there are few
        )
        ds = ds.map(self.decoder).compose(_drop_none)
        return ds.batched(self.eval_batch_size, collation_fn=collate, partial=True)

    def _loader(self, ds: wds.WebDataset, num_workers: int) -> wds.WebLoader:
        return wds.WebLoader(
            ds,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> wds.WebLoader:
        return self._loader(self.make_train_dataset(), self.num_workers).with_epoch(self.batches_per_epoch())

    def eval_dataloader(self, split: str) -> wds.WebLoader:
        n_shards = len(self._urls(split))
        return self._loader(self.make_eval_dataset(split), min(self.num_workers, n_shards))

    def val_dataloader(self) -> wds.WebLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> wds.WebLoader:
        return self.eval_dataloader("test")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": int(self.skipped.value)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped.value = int(state_dict.get("skipped", 0))
