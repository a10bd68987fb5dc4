"""Prepare's memory does not grow with the dataset size (issue 14): the peak of the Python allocations
(tracemalloc: Python objects and numpy buffers) while preparing 400 and 1,600 generated images.

What may grow with the size: the packed file list (`datamodules.sources.PackedStrings`: the name's bytes and
an offset, plus a label: ~40 bytes per image here), the seeded hold-out permutation (8 bytes per image) and
one manifest entry per shard. The budget is 100 bytes per added image; what it catches: a `Path` per file
(~400 bytes, the listing before issue 14), a decoded image kept per sample (8x8x3 here: ~300 bytes), a
record per sample. Memory outside tracemalloc's view (Pillow's image buffers, the interpreter, torch) is
measured by bench/prepare.py at 20k and 100k images instead.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shards import prepare_dataset
from datamodules.sources import ImageFolder

BUDGET_BYTES_PER_IMAGE = 100


def make_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    for i in range(n):
        Image.fromarray(patterns[i % 16]).save(root / ("a" if i % 2 else "b") / f"{i:06d}.png", compress_level=0)
    return root


def peak_python_bytes(folder: Path, out: Path, holdout: int = 50) -> int:
    """tracemalloc's peak over one prepare of `folder` (allocations alive before it are not counted)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        prepare_dataset(ImageFolder(str(folder), channels=3), out, name="mem", config={}, val_size=holdout,
                        test_size=holdout, shard_size=100, progress=False)  # fmt: skip
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path):
    small, large = 400, 1600  # tracemalloc slows prepare ~5x: sizes that keep the test near 10 s
    make_folder(tmp_path / "small", small)
    make_folder(tmp_path / "large", large)
    make_folder(tmp_path / "tiny", 40)
    peak_python_bytes(tmp_path / "tiny", tmp_path / "warm", holdout=4)  # first-call imports and caches first
    a = peak_python_bytes(tmp_path / "small", tmp_path / "out_small")
    b = peak_python_bytes(tmp_path / "large", tmp_path / "out_large")
    per_image = (b - a) / (large - small)
    assert per_image < BUDGET_BYTES_PER_IMAGE, (
        f"peak Python memory {a / 1e6:.2f} MB at {small} images, {b / 1e6:.2f} MB at {large}: "
        f"{per_image:.0f} bytes per added image > {BUDGET_BYTES_PER_IMAGE} (something is kept per image)"
    )
