"""Image conversion between the pipeline's two layouts, and PNG grids.

Models see float (B, C, H, W) in [-1, 1]; files (samples.npz, PNGs) hold uint8 (B, H, W, C). The one
quantisation is x -> round((clamp(x, -1, 1) + 1) * 127.5), so a float batch and the uint8 file written
from it score the same.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from core.io import atomic_write_bytes

Images = np.ndarray | torch.Tensor


def to_float_nchw(images: Images) -> torch.Tensor:
    """uint8 (B, H, W, C) in [0, 255] or float (B, C, H, W) in [-1, 1] -> float (B, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be 4-d, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.float()


def to_uint8_nchw(images: Images) -> torch.Tensor:
    """uint8 (B, H, W, C) or float (B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be 4-d, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.permute(0, 3, 1, 2)
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """float (B, C, H, W) in [-1, 1] (any device, any float dtype) -> uint8 numpy (B, H, W, C)."""
    return np.ascontiguousarray(to_uint8_nchw(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy())


def _grid_canvas(
    images: np.ndarray, nrow: int, padding: int, label_height: int
) -> tuple[Image.Image, int, int]:
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    ncol_rows = math.ceil(n / nrow)
    cell_w, cell_h = w + padding, h + label_height + padding
    canvas = Image.new("L" if c == 1 else "RGB", (nrow * cell_w + padding, ncol_rows * cell_h + padding))
    return canvas, cell_w, cell_h


def make_grid_png(
    images: np.ndarray,
    nrow: int,
    path: str | os.PathLike,
    labels: Sequence[Any] | None = None,
    padding: int = 2,
) -> Path:
    """Tile uint8 images (N, H, W, C), C in {1, 3}, `nrow` per row, into one PNG written atomically.

    labels: optional per-image text (class names or ids) drawn in a strip under each tile.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    label_height = 12 if labels is not None else 0
    canvas, cell_w, cell_h = _grid_canvas(images, nrow, padding, label_height)
    font = ImageFont.load_default()
    for i, image in enumerate(images):
        left, top = padding + (i % nrow) * cell_w, padding + (i // nrow) * cell_h
        canvas.paste(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image), (left, top))
        if labels is not None:
            # Drawn on a tile-wide strip so long labels are clipped instead of spilling onto neighbours.
            strip = Image.new(canvas.mode, (image.shape[1], label_height))
            ImageDraw.Draw(strip).text((0, 0), str(labels[i]), fill="white", font=font)
            canvas.paste(strip, (left, top + image.shape[0]))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
