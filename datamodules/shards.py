"""Write sources as WebDataset tar shards plus a `manifest.json` (the data contract of
docs/ARCHITECTURE.md, "Shards and manifest").

Each sample has the standard keys `__key__`, `png` (lossless image), `cls` (integer label), `txt`
(caption) and `json` (metadata), so other WebDataset tools can read the shards. Every shard is
written to a temporary file and renamed into place, and the manifest is written last: a killed
prepare never leaves a manifest that points at a half-written shard.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from core.io import atomic_open, atomic_write_json, config_hash, remove_stale_temps, sha256_file
from datamodules.sources import ArraySource

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DEFAULT_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "a black and white photo of a {}",
    "a {} on a plain background",
    "a small image of a {}",
)


class ShardChecksumError(RuntimeError):
    """A shard on disk does not match the sha256 recorded in the manifest."""


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (lossless)."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def caption_for(label: int, key: str, class_names: Sequence[str], templates: Sequence[str], seed: int) -> str:
    """A caption from one of the templates, chosen reproducibly from (seed, key)."""
    rng = random.Random(f"{seed}:{key}")
    return rng.choice(list(templates)).format(class_names[label])


def split_indices(n: int, holdouts: Sequence[int], seed: int) -> list[np.ndarray]:
    """A seeded permutation of range(n) cut into the hold-out sizes, then the remainder."""
    if sum(holdouts) >= n:
        raise ValueError(f"hold-out sizes {list(holdouts)} leave no training samples out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([0, *holdouts])
    return [perm[cuts[i] : cuts[i + 1]] for i in range(len(holdouts))] + [perm[cuts[-1] :]]


def _shard_sizes(n: int, shard_size: int, min_shards: int) -> int:
    """Samples per shard: at most `shard_size`, and small enough to give at least `min_shards` shards
    (so evaluation splits spread over every rank and worker)."""
    return max(1, min(shard_size, math.ceil(n / max(1, min_shards))))


def write_split(
    source: ArraySource,
    indices: np.ndarray,
    split: str,
    out_dir: Path,
    class_names: Sequence[str],
    templates: Sequence[str],
    seed: int,
    shard_size: int,
    min_shards: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the samples `source[indices]` as shards `<split>-NNNNN.tar`; return the split's manifest entry."""
    per_shard = _shard_sizes(len(indices), shard_size, min_shards)
    shards = []
    bar = tqdm(total=len(indices), desc=f"writing {split}", unit="img", disable=not progress)
    for s, start in enumerate(range(0, len(indices), per_shard)):
        name = f"{split}-{s:05d}.tar"
        final = out_dir / name
        chunk = indices[start : start + per_shard]
        # A fixed *integer* mtime: byte-identical re-runs, and plain ustar headers. A float mtime (even 0.0)
        # makes tarfile add a PAX header to every member: twice the bytes and twice the read time.
        remove_stale_temps(final)  # a killed earlier prepare's half shard (prepare is the only writer)
        with atomic_open(final, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
            for idx in chunk:
                image, label, meta = source.item(int(idx))
                key = f"{split}_{int(idx):07d}"
                caption = caption_for(label, key, class_names, templates, seed)
                meta = {**meta, "label": label, "class_name": class_names[label], "split": split}
                sink.write({"__key__": key, "png": encode_png(image), "cls": label, "txt": caption, "json": meta})
                bar.update(1)
        shards.append({"name": name, "num_samples": len(chunk), "sha256": sha256_file(final),
                       "bytes": final.stat().st_size})  # fmt: skip
    bar.close()
    return {"num_samples": int(len(indices)), "shards": shards}


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """Read `<data_dir>/manifest.json`; a missing one is an error that prints the command to make it."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no dataset manifest at {path}. Make the shards first, e.g.\n"
            f"    python -m pipeline.prepare data=fashion_mnist paths.data_dir={Path(data_dir).parent}\n"
            "(or point data.dir at an existing shard folder)."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run prepare with force=true") from e


def manifest_hash(manifest: dict) -> str:
    """A content hash of a dataset: the sha256 of its shards' checksums."""
    return config_hash({"shards": {s: [x["sha256"] for x in v["shards"]] for s, v in manifest["splits"].items()}})


def verify_shards(data_dir: str | os.PathLike, manifest: dict, progress: bool = False) -> None:
    """Check every shard's presence and sha256 against the manifest; raise naming the first bad one."""
    data_dir = Path(data_dir)
    for split, entry in manifest["splits"].items():
        for shard in tqdm(entry["shards"], desc=f"verifying {split}", disable=not progress):
            path = data_dir / shard["name"]
            if not path.exists():
                raise ShardChecksumError(f"shard {path} listed in {data_dir / MANIFEST} is missing")
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                raise ShardChecksumError(
                    f"shard {path} is corrupted: sha256 {digest[:16]}... != {shard['sha256'][:16]}... in the "
                    "manifest. Re-run prepare with force=true to rewrite the dataset."
                )


def prepare_dataset(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    name: str,
    config: dict,
    val_size: int = 5000,
    test_size: int = 0,
    limit: int | None = None,
    seed: int = 0,
    shard_size: int = 10000,
    min_eval_shards: int = 8,
    caption_templates: Sequence[str] = DEFAULT_TEMPLATES,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write train/val/test shards and the manifest for `source`; idempotent.

    With an existing manifest of the same config, the shards' checksums are verified and nothing is
    rewritten; a different config is refused unless `force` (the old data may be in use by runs).
    `val_size` samples of the train split are a seeded hold-out; `test_size` likewise when the source
    has no test split of its own. `limit` caps the samples of every split (for tests and smoke runs).
    """
    out_dir = Path(out_dir)
    chash = config_hash(config)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists() and not force:
        old = load_manifest(out_dir)
        if old.get("config_hash") != chash:
            raise FileExistsError(
                f"{manifest_path} was written with a different prepare config; re-run with force=true to "
                f"rewrite it, or choose another data directory (paths.data_dir / data.name)."
            )
        verify_shards(out_dir, old, progress=progress)
        log.info("dataset %s is complete and verified at %s: skipping", name, out_dir)
        return old
    out_dir.mkdir(parents=True, exist_ok=True)

    train = source.load("train")
    has_test = getattr(source, "has_test", True)
    holdouts = [val_size] if has_test else [val_size, test_size]
    parts = split_indices(len(train), holdouts, seed)
    plan = {"val": (train, parts[0]), "train": (train, parts[-1])}
    if has_test:
        test = source.load("test")
        plan["test"] = (test, np.arange(len(test)))
    else:
        plan["test"] = (train, parts[1])
    class_names = list(source.class_names)
    splits = {}
    for split, (src, idx) in plan.items():
        if limit is not None:
            idx = idx[:limit]
        splits[split] = write_split(
            src, idx, split, out_dir, class_names, caption_templates, seed,
            shard_size=shard_size, min_shards=1 if split == "train" else min_eval_shards, progress=progress,
        )  # fmt: skip
    h, w, c = train.images.shape[1:]
    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "splits": splits,
        "image_shape": [int(h), int(w), int(c)],
        "num_classes": len(class_names),
        "class_names": class_names,
        "caption_templates": list(caption_templates),
        "config": config,
        "config_hash": chash,
    }
    manifest["content_hash"] = manifest_hash(manifest)
    # Shards not listed in the new manifest (a previous, larger run) are left alone; the manifest is the truth.
    atomic_write_json(manifest_path, manifest)
    return manifest
