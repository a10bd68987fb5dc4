"""The sample store of a sweep setting: npz files, their hashes, the per-batch parts and their merge.

    samples.npz    arr_0 uint8 (N, H, W, C), arr_1 int64 labels (N,) (guided-diffusion's layout), plus
                   `config_hash` and `sampling_seconds`
    parts/<start>-<stop>.npz
                   one finished batch (`images`, `labels`, `config_hash`), written atomically by the rank
                   that drew it; merged into samples.npz by rank 0, then removed
    grid.png       rows = classes, `grid_per_class` samples each

Every file carries the hash of what determined its content, so a file from another configuration (or a
torn one) is never mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.images import make_grid_png
from core.io import atomic_open

__all__ = ["class_grid", "load_samples", "merge_parts", "npz_hash", "part_path", "save_npz"]


def save_npz(path: Path, **arrays: Any) -> Path:
    """np.savez written atomically (a reader never sees half a file)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def npz_hash(path: Path) -> str | None:
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


def part_path(parts: Path, indices: range) -> Path:
    """parts/<start>-<stop>.npz of the batch of sample indices [start, stop)."""
    return parts / f"{indices.start:07d}-{indices.stop:07d}.npz"


def merge_parts(
    parts: Path,
    batches: Sequence[range],
    out: Path,
    samples_hash: str,
    expected_labels: np.ndarray,
    start: float,
    timeout_s: float,
    poll_s: float,
) -> Path:
    """Wait for every batch's part (other ranks write theirs), then write samples.npz in index order, with
    the sampling time since `start` (perf_counter), and drop parts/. Raises TimeoutError after `timeout_s`
    (a dead rank), RuntimeError when the merged labels are not `expected_labels`."""
    paths = [part_path(parts, r) for r in batches]
    deadline = time.monotonic() + timeout_s
    while missing := [p for p in paths if npz_hash(p) != samples_hash]:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 waited {timeout_s:.0f} s for the other ranks' samples; still "
                f"missing {len(missing)} parts, e.g. {missing[0]} (did a rank die? re-run to resume)"
            )
        time.sleep(poll_s)
    images, labels = [], []
    for p in paths:
        with np.load(p) as f:
            images.append(f["images"])
            labels.append(f["labels"])
    labels_all = np.concatenate(labels)
    if not np.array_equal(labels_all, expected_labels):
        raise RuntimeError(f"merged labels in {parts} do not match the class-balanced plan")
    save_npz(out, arr_0=np.concatenate(images), arr_1=labels_all, config_hash=np.array(samples_hash),
             sampling_seconds=np.array(time.perf_counter() - start))  # fmt: skip
    shutil.rmtree(parts, ignore_errors=True)
    return out


def class_grid(
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
