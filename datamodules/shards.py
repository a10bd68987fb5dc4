"""Write sources as WebDataset tar shards plus a `manifest.json` (the data contract of
docs/ARCHITECTURE.md, "Shards and manifest").

Each sample has the standard keys `__key__`, `png` (lossless image), `cls` (integer label), `txt`
(caption) and `json` (metadata), so other WebDataset tools can read the shards. Every shard is
written to a temporary file and renamed into place, and the manifest is written last: a killed
prepare never leaves a manifest that points at a half-written shard.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from core.io import atomic_open, atomic_write_json, config_hash, read_json, remove_stale_temps, sha256_file
from core.processes import exit_with_parent
from datamodules.sources import UndecodableImage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"  # per-shard completion records of a prepare in progress
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


# The sources and constants of the prepare in progress, inherited by the forked writer processes
# (so an in-memory source such as Fashion-MNIST is not pickled once per shard).
_JOB: dict[str, Any] = {}


@dataclass(frozen=True)
class ShardTask:
    """One shard of a plan: its split, file name, the source indices of its samples (in order) and `plan`,
    the hash its `.progress` record must carry to count as finished (config, name, indices, source files)."""

    split: str
    name: str
    indices: np.ndarray
    plan: str


@dataclass
class DatasetPlan:
    """What a prepare writes, computed from the config and the source listing alone (no file written), so
    every process that plans the same config gets the same shards: the Slurm array tasks and the manifest
    job each compute it (`shard_range` picks a task's shards)."""

    out_dir: Path
    name: str
    config: dict
    config_hash: str
    sources: dict[str, Any]
    shards: list[ShardTask]
    class_names: list[str]
    caption_templates: list[str]
    seed: int
    image_shape: tuple[int, int, int]


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS_DIR / f"{name}.json"


def _write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard of the plan in `_JOB` (in a writer process or inline); return its manifest entry +
    skipped files.

    Samples are decoded one at a time and streamed into the tar, so memory is one image plus the tar
    buffer, and the tar's member list: `tarfile.TarFile` keeps a `TarInfo` per member for as long as it is
    open (`members`; 4 per sample here, ~1.3 kB per sample measured: 13 MB for a 10,000-sample shard). The
    tar is opened and closed here, once per shard (and a writer process writes one shard), so that list is
    bounded by `data.shard_size`, never by the dataset. When the shard is complete, a record `.progress/<shard>.json` (its sha256 and the plan hash)
    is written atomically: a re-run after a kill verifies the shard against it and skips it.
    """
    plan: DatasetPlan = _JOB["plan"]
    source, out_dir = plan.sources[task.split], plan.out_dir
    final = out_dir / task.name
    remove_stale_temps(final)  # a killed earlier prepare's half shard (prepare is the only writer)
    skipped, written = [], 0
    # A fixed *integer* mtime: byte-identical re-runs, and plain ustar headers. A float mtime (even 0.0)
    # makes tarfile add a PAX header to every member: twice the bytes and twice the read time.
    with atomic_open(final, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
        for idx in task.indices:
            try:
                image, label, meta = source.item(int(idx))
            except UndecodableImage as e:
                skipped.append({"file": str(source.path(int(idx))), "error": str(e.__cause__ or e)})
                continue
            if tuple(image.shape) != plan.image_shape:
                raise ValueError(f"{meta}: image shape {image.shape} != {plan.image_shape} of the first image; "
                                 "set data.image_size so every image is resized to one size")  # fmt: skip
            key = f"{task.split}_{int(idx):07d}"
            names = plan.class_names
            caption = meta.get("caption") or caption_for(label, key, names, plan.caption_templates, plan.seed)
            meta = {**meta, "label": label, "class_name": names[label], "split": task.split}
            encoded = meta.pop("_encoded", None)
            ext, data = encoded if encoded is not None else ("png", encode_png(image))
            sink.write({"__key__": key, ext: data, "cls": label, "txt": caption, "json": meta})
            written += 1
    entry = {
        "name": task.name,
        "num_samples": written,
        "sha256": sha256_file(final),
        "bytes": final.stat().st_size,
    }
    atomic_write_json(_record_path(out_dir, task.name), {**entry, "plan": task.plan, "skipped": skipped})
    return {**entry, "skipped": skipped}


def _finished(out_dir: Path, name: str, plan: str) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier (killed) run with the same plan, if its sha256 checks."""
    rec = read_json(_record_path(out_dir, name))
    path = out_dir / name
    if not isinstance(rec, dict) or rec.get("plan") != plan or not path.exists():
        return None
    if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
        return None
    return {k: rec[k] for k in ("name", "num_samples", "sha256", "bytes", "skipped")}


def _plan_hash(chash: str, name: str, indices: np.ndarray, source: Any) -> str:
    fingerprint = getattr(source, "fingerprint", None)
    return config_hash({"config": chash, "name": name,
                        "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest(),
                        "files": fingerprint(indices) if fingerprint else None})  # fmt: skip


def plan_dataset(
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
) -> DatasetPlan:
    """The shards of a prepare (see `prepare_dataset` for the arguments); lists and reads the source only.

    `val_size` samples of the train split are a seeded hold-out; `test_size` likewise when the source has
    no test split of its own; `limit` caps the samples of every split. Splits are cut into shards of at
    most `shard_size` samples (the evaluation splits into at least `min_eval_shards`), in the order val,
    train, test. Deterministic: the same config and source listing give the same plan in every process.
    """
    train = source.load("train")
    has_test = getattr(source, "has_test", True)
    holdouts = [val_size] if has_test else [val_size, test_size]
    parts = split_indices(len(train), holdouts, seed)
    splits = {"val": (train, parts[0]), "train": (train, parts[-1])}
    if has_test:
        test = source.load("test")
        splits["test"] = (test, np.arange(len(test)))
    else:
        splits["test"] = (train, parts[1])
    if limit is not None:
        splits = {split: (src, idx[:limit]) for split, (src, idx) in splits.items()}
    chash = config_hash(config)
    shards = []
    for split, (src, indices) in splits.items():
        per_shard = _shard_sizes(len(indices), shard_size, 1 if split == "train" else min_eval_shards)
        for s, start in enumerate(range(0, len(indices), per_shard)):
            shard_name = f"{split}-{s:05d}.tar"
            chunk = indices[start : start + per_shard]
            shards.append(ShardTask(split, shard_name, chunk, _plan_hash(chash, shard_name, chunk, src)))
    image_shape = getattr(train, "image_shape", None) or _first_shape(train, splits["train"][1])
    return DatasetPlan(out_dir=Path(out_dir), name=name, config=config, config_hash=chash,
                       sources={k: v[0] for k, v in splits.items()}, shards=shards,
                       class_names=list(source.class_names), caption_templates=list(caption_templates), seed=seed,
                       image_shape=tuple(int(x) for x in image_shape))  # fmt: skip


def shard_range(shards: Sequence[ShardTask], task: int, num_tasks: int) -> list[ShardTask]:
    """The shards of array task `task` of `num_tasks`: a contiguous range of the plan, the ranges disjoint,
    covering every shard, balanced by sample count (shard k goes to task floor(start_k * num_tasks / total),
    start_k the samples before it). A task may get none when there are fewer shards than tasks."""
    if num_tasks < 1 or not 0 <= task < num_tasks:
        raise ValueError(f"shard task {task} of {num_tasks}: need 0 <= shard_task < shard_tasks and shard_tasks >= 1")
    total = max(1, sum(len(s.indices) for s in shards))
    starts = np.cumsum([0] + [len(s.indices) for s in shards[:-1]])
    return [s for s, start in zip(shards, starts, strict=True) if min(num_tasks - 1, start * num_tasks // total) == task]


def write_shards(
    plan: DatasetPlan,
    shards: Sequence[ShardTask],
    *,
    num_workers: int = 1,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Write `shards` of `plan` with `num_workers` processes; return each shard's manifest entry (with
    `skipped`, the undecodable files) by name. Shards finished by an earlier run with the same plan and a
    matching sha256 are kept (`resume`)."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    tasks, done = [], {}
    for task in shards:
        rec = _finished(plan.out_dir, task.name, task.plan) if resume else None
        if rec is not None:
            done[task.name] = rec
        else:
            tasks.append(task)
    bar = tqdm(total=sum(len(s.indices) for s in shards), desc="writing shards", unit="img", disable=not progress,
               smoothing=0.1)  # fmt: skip
    bar.update(sum(r["num_samples"] + len(r["skipped"]) for r in done.values()))
    if done:
        log.info("resuming: %d verified shard(s) kept, %d to write", len(done), len(tasks))
    _JOB.clear()
    _JOB["plan"] = plan
    try:
        if num_workers > 1 and len(tasks) > 1:
            # Forked writers share the parent's pages until they write to them, and a garbage collection in a
            # writer writes to every object it traverses: over a long prepare the writers ended up with
            # private copies of the parent's heap (the tree's memory grew with the dataset: +31% from 20k to
            # 100k images at 2 writers). gc.freeze() before the fork keeps the parent's objects out of the
            # writers' collections (the Python docs' recipe for fork without exec), and one shard per
            # writer process (maxtasksperchild=1) returns what a writer did copy when its shard is done.
            gc.freeze()
            try:
                # exit_with_parent: a prepare killed with SIGKILL takes its writers with it (an orphan would
                # go on writing its shard while the re-run writes the same one).
                with mp.get_context("fork").Pool(min(num_workers, len(tasks)), maxtasksperchild=1,
                                                 initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:  # fmt: skip
                    for entry in pool.imap_unordered(_write_shard, tasks):
                        done[entry["name"]] = entry
                        bar.update(entry["num_samples"] + len(entry["skipped"]))
            finally:
                gc.unfreeze()
        else:
            for task in tasks:
                entry = _write_shard(task)
                done[entry["name"]] = entry
                bar.update(entry["num_samples"] + len(entry["skipped"]))
    finally:
        _JOB.clear()
        bar.close()
    return done


def recorded_shards(plan: DatasetPlan) -> dict[str, dict[str, Any]]:
    """The manifest entries of every shard of `plan` from its `.progress` record (the manifest job after a
    Slurm array): each record must carry the plan's hash and the shard's sha256 and size must match it.

    Raises:
        FileNotFoundError: some shards have no such record (named, with the array task that writes them).
    """
    done, missing = {}, []
    for task in plan.shards:
        rec = _finished(plan.out_dir, task.name, task.plan)
        if rec is None:
            missing.append(task.name)
        else:
            done[task.name] = rec
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(plan.shards)} shard(s) in {plan.out_dir} are not finished for this config "
            f"(no matching {PROGRESS_DIR}/<shard>.json record, or the shard's sha256 differs), e.g. {missing[:5]}. "
            "Run the array tasks that write them (python -m pipeline.prepare ... shard_task=i shard_tasks=N) "
            "or a plain prepare, then the manifest again; a source folder changed since the tasks ran makes "
            "another plan."
        )
    return done


def write_manifest(plan: DatasetPlan, entries: dict[str, dict[str, Any]]) -> dict:
    """Build the manifest of `plan` from the shards' entries, write it (atomically, last) and remove the
    `.progress` records it supersedes."""
    manifest_path = plan.out_dir / MANIFEST
    splits = {}
    for split in plan.sources:
        shard_entries = [entries[s.name] for s in plan.shards if s.split == split]
        skipped = [x for e in shard_entries for x in e["skipped"]]
        shards = [{k: e[k] for k in ("name", "num_samples", "sha256", "bytes")} for e in shard_entries]
        splits[split] = {"num_samples": sum(e["num_samples"] for e in shards), "shards": shards}
        if skipped:
            splits[split]["skipped"] = skipped
    skipped = [x for v in splits.values() for x in v.get("skipped", [])]
    if skipped:
        log.warning("%d undecodable image(s) skipped (listed in %s), e.g. %s", len(skipped), manifest_path,
                    skipped[0]["error"])  # fmt: skip
    h, w, c = plan.image_shape
    manifest = {
        "version": MANIFEST_VERSION,
        "name": plan.name,
        "splits": splits,
        "image_shape": [int(h), int(w), int(c)],
        "num_classes": len(plan.class_names),
        "class_names": plan.class_names,
        "caption_templates": plan.caption_templates,
        "config": plan.config,
        "config_hash": plan.config_hash,
    }
    if skipped:
        manifest["num_skipped"] = len(skipped)
    manifest["content_hash"] = manifest_hash(manifest)
    # Shards not listed in the new manifest (a previous, larger run) are left alone; the manifest is the truth.
    atomic_write_json(manifest_path, manifest)
    shutil.rmtree(plan.out_dir / PROGRESS_DIR, ignore_errors=True)  # the manifest now records every shard
    return manifest


def _first_shape(source: Any, indices: np.ndarray) -> tuple[int, int, int]:
    """The shape of the first decodable image of `indices` (the shape every image must have)."""
    for i in indices:
        try:
            return tuple(int(x) for x in source.item(int(i))[0].shape)
        except UndecodableImage:
            continue
    raise ValueError("no decodable image in the training split")


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
    return config_hash(
        {"shards": {s: [x["sha256"] for x in v["shards"]] for s, v in manifest["splits"].items()}}
    )


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


def existing_manifest(out_dir: str | os.PathLike, config: dict, force: bool = False) -> dict | None:
    """The manifest of a finished prepare of this config in `out_dir` (to verify and reuse), or None: when
    there is none, or with `force`. Reads nothing but the manifest, so it answers before the source is
    listed (the source may be gone once its shards are written).

    Raises:
        FileExistsError: a manifest of another config, without `force` (the old data may be in use by runs).
    """
    manifest_path = Path(out_dir) / MANIFEST
    if force or not manifest_path.exists():
        return None
    old = load_manifest(out_dir)
    if old.get("config_hash") != config_hash(config):
        raise FileExistsError(
            f"{manifest_path} was written with a different prepare config; re-run with force=true to "
            f"rewrite it, or choose another data directory (paths.data_dir / data.name)."
        )
    return old


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
    num_workers: int = 1,
) -> dict:
    """Write train/val/test shards and the manifest for `source`; idempotent.

    With an existing manifest of the same config, the shards' checksums are verified and nothing is
    rewritten; a different config is refused unless `force` (the old data may be in use by runs).
    The shards are those of `plan_dataset` (its docstring gives the splits). Shards are streamed (memory
    bounded by one shard per writer and the packed file list and captions, whatever the dataset size) by
    `num_workers` processes; a killed prepare re-run keeps the shards it had finished (verified by sha256) and
    writes the rest; the manifest is written last, atomically. Undecodable images are skipped and listed under
    `splits.<split>.skipped` (see `datamodules.sources.decode_image`).
    """
    out_dir = Path(out_dir)
    old = existing_manifest(out_dir, config, force)
    if old is not None:
        verify_shards(out_dir, old, progress=progress)
        log.info("dataset %s is complete and verified at %s: skipping", name, out_dir)
        return old
    plan = plan_dataset(source, out_dir, name=name, config=config, val_size=val_size, test_size=test_size,
                        limit=limit, seed=seed, shard_size=shard_size, min_eval_shards=min_eval_shards,
                        caption_templates=caption_templates)  # fmt: skip
    # force: the old manifest goes first, so it never lists a half-rewritten shard
    (out_dir / MANIFEST).unlink(missing_ok=True)
    entries = write_shards(plan, plan.shards, num_workers=num_workers, resume=not force, progress=progress)
    return write_manifest(plan, entries)
