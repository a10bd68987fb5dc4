"""A manifest for WebDataset shards written by another producer (img2dataset's ``jpg``/``txt``/``json`` keys, or
any tars with an image key): `scan_shards` reads each tar once and writes the same manifest.json as
`datamodules.shards.prepare_dataset` (`data=webdataset`)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from core.io import atomic_write_json, config_hash, sha256_file
from datamodules.shards import MANIFEST, MANIFEST_VERSION, load_manifest, manifest_hash, verify_shards

IMAGE_EXTS = {"png", "jpg", "jpeg", "webp"}


def _scan_tar(path: Path) -> dict[str, Any]:
    """Samples, labels and the first image of one WebDataset tar (any producer: img2dataset's jpg/txt/json)."""
    keys: dict[str, dict[str, Any]] = {}
    first = None
    with tarfile.open(path) as tar:
        for m in tar:
            match = re.match(r"^((?:.*/|)[^./]+)[.]([^/]*)$", m.name)  # WebDataset's key/extension split
            if not m.isfile() or match is None:
                continue
            key, ext = match.groups()
            rec = keys.setdefault(key, {})
            ext = ext.lower()
            if ext in IMAGE_EXTS:
                rec["image"] = True
                if first is None:
                    first = tar.extractfile(m).read()
            elif ext == "cls":
                rec["cls"] = int(tar.extractfile(m).read().decode().strip())
            elif ext == "json" and "cls" not in rec:
                try:
                    meta = json.loads(tar.extractfile(m).read())
                except json.JSONDecodeError:
                    meta = {}
                if isinstance(meta, dict) and isinstance(meta.get("label"), int):
                    rec["cls"] = meta["label"]
                    if meta.get("class_name"):
                        rec["class_name"] = str(meta["class_name"])
    samples = [r for r in keys.values() if r.get("image")]
    return {"num_samples": len(samples), "labels": {r["cls"]: r.get("class_name") for r in samples if "cls" in r},
            "first": first}  # fmt: skip


def scan_shards(
    root: str | os.PathLike, out_dir: str | os.PathLike, *, name: str, config: dict, val_shards: int = 1,
    test_shards: int = 1, force: bool = False, progress: bool = True,
) -> dict:  # fmt: skip
    """A manifest for existing WebDataset shards under `root` (`data=webdataset`); the shards are not copied.

    Shards named `train-*.tar`, `val-*.tar`, `test-*.tar` form those splits; otherwise all `*.tar` files
    (sorted) are the training split except the last `val_shards` (validation) and, before them,
    `test_shards` (test). Samples are counted by scanning each tar; images may be `png`, `jpg`, `jpeg` or
    `webp`; labels come from `cls` or the `label` of `json` (none: one class); captions from `txt`.
    The manifest lists the shards by absolute path with their sha256 and size, written atomically.
    """
    root, out_dir = Path(root).resolve(), Path(out_dir)
    manifest_path = out_dir / MANIFEST
    chash = config_hash(config)
    if manifest_path.exists() and not force:
        old = load_manifest(out_dir)
        if old.get("config_hash") == chash:
            verify_shards(out_dir, old, progress=progress)
            return old
        raise FileExistsError(f"{manifest_path} was written with a different config; re-run with force=true")
    tars = sorted(p for p in root.rglob("*.tar") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not tars:
        raise FileNotFoundError(f"no .tar shards under {root} (data.source.root)")
    named = {s: [p for p in tars if p.name.startswith(f"{s}-")] for s in ("train", "val", "test")}
    if named["train"] and named["val"]:
        groups = {**named, "test": named["test"] or named["val"]}
    else:
        if len(tars) < 1 + val_shards + test_shards:
            raise ValueError(f"{len(tars)} shard(s) under {root}: need at least {1 + val_shards + test_shards} for "
                             f"train + data.val_shards={val_shards} + data.test_shards={test_shards}")  # fmt: skip
        n_train = len(tars) - val_shards - test_shards
        groups = {"train": tars[:n_train], "test": tars[n_train : n_train + test_shards],
                  "val": tars[n_train + test_shards :]}  # fmt: skip
    splits, labels, first = {}, {}, None
    for split, paths in groups.items():
        shards = []
        for p in tqdm(paths, desc=f"scanning {split}", disable=not progress):
            info = _scan_tar(p)
            labels.update({k: v for k, v in info["labels"].items() if v or k not in labels})
            first = first or info["first"]
            shards.append({"name": str(p), "num_samples": info["num_samples"], "sha256": sha256_file(p),
                           "bytes": p.stat().st_size})  # fmt: skip
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    if first is None:
        raise ValueError(f"no image (png/jpg/jpeg/webp) in the shards under {root}")
    with Image.open(io.BytesIO(first)) as im:
        w, h = im.size
        c = 1 if im.mode in ("L", "I;16", "I", "1") else 3
    num_classes = max(labels, default=0) + 1
    class_names = [labels.get(i) or str(i) for i in range(num_classes)]
    manifest = {"version": MANIFEST_VERSION, "name": name, "splits": splits, "image_shape": [h, w, c],
                "num_classes": num_classes, "class_names": class_names, "caption_templates": [],
                "config": config, "config_hash": chash, "source_root": str(root)}  # fmt: skip
    manifest["content_hash"] = manifest_hash(manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest_path, manifest)
    return manifest
