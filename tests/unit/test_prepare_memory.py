"""Prepare's memory does not grow with the dataset size (issue 14): the peak of the Python allocations
(tracemalloc: Python objects and numpy buffers) while preparing 400 and 1,600 generated images.

What may grow with the size: the packed file list (`datamodules.sources.PackedStrings`: the name's bytes and
an offset, plus a label: ~40 bytes per image here), the seeded hold-out permutation (8 bytes per image) and
one manifest entry per shard. The budget is 100 bytes per added image; what it catches: a `Path` per file
(~400 bytes, the listing before issue 14), a decoded image kept per sample (8x8x3 here: ~300 bytes), a
record per sample. A captioned folder (`metadata.jsonl`, 60-character captions) may add the captions
themselves, packed the same way (the text's bytes, an offset and an index per image: ~72 bytes here), so its
budget is 100 bytes plus the caption's length; what it catches: a Python dict or a `str` per caption (~200
bytes beyond the text: the listing before the packed captions). Memory outside tracemalloc's view
(Pillow's image buffers, the interpreter, torch) is measured by bench/prepare.py at 20k and 100k images
instead.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.shards import prepare_dataset
from datamodules.sources import ImageFolder

BUDGET_BYTES_PER_IMAGE = 100
CAPTION_CHARS = 60


def caption(i: int) -> str:
    """A caption of `CAPTION_CHARS` characters, distinct per image."""
    return f"a generated photo of an 8x8 pattern, image number {i:010d}"


def make_folder(root: Path, n: int, captions: str | None = None) -> Path:
    """`n` 8x8 PNGs in class folders `a`, `b`; `captions`: None (no captions), "classes" (folder `a` has its
    own `metadata.jsonl`, folder `b`'s captions are in the root's, keyed `b/<file>`) or "flat" (no class
    folders: the images and one `metadata.jsonl` in `root`, the Hugging Face image-caption layout)."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
    folders = ("",) if captions == "flat" else ("a", "b")
    rows: dict[Path, list[str]] = {}
    for c in folders:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = folders[i % len(folders)] if len(folders) == 1 else ("a" if i % 2 else "b")
        file = f"{i:06d}.png"
        Image.fromarray(patterns[i % 16]).save(root / folder / file, compress_level=0)
        if captions:
            meta, key = (root / folder, file) if folder in ("", "a") else (root, f"{folder}/{file}")
            rows.setdefault(meta / "metadata.jsonl", []).append(json.dumps({"file_name": key, "text": caption(i)}))
    for path, lines in rows.items():
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def peak_python_bytes(folder: Path, out: Path, holdout: int = 50) -> int:
    """tracemalloc's peak over one prepare of `folder` (allocations alive before it are not counted; the
    garbage of earlier tests is collected first, so a collection it would trigger does not move the peak)."""
    gc.collect()
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


@pytest.mark.parametrize("captions", [None, "classes", "flat"])
def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path, captions):
    small, large = 400, 1600  # tracemalloc slows prepare ~5x: sizes that keep each case near 10 s
    make_folder(tmp_path / "small", small, captions)
    make_folder(tmp_path / "large", large, captions)
    make_folder(tmp_path / "tiny", 40, captions)
    peak_python_bytes(tmp_path / "tiny", tmp_path / "warm", holdout=4)  # first-call imports and caches first
    a = peak_python_bytes(tmp_path / "small", tmp_path / "out_small")
    b = peak_python_bytes(tmp_path / "large", tmp_path / "out_large")
    per_image = (b - a) / (large - small)
    budget = BUDGET_BYTES_PER_IMAGE + (len(caption(0)) if captions else 0)
    print(f"captions={captions}: {per_image:.0f} bytes per added image (budget {budget})")
    assert per_image < budget, (
        f"peak Python memory {a / 1e6:.2f} MB at {small} images, {b / 1e6:.2f} MB at {large}: "
        f"{per_image:.0f} bytes per added image > {budget} (something is kept per image)"
    )
