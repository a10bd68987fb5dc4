"""Image sources that the shard writer turns into WebDataset shards.

A source yields `(image, label, meta)` with `image` a uint8 array (H, W, C), `label` an int and
`meta` a JSON-able dict. Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of (Fashion-)MNIST (LeCun et al. 1998)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"IDX file {path} does not exist. Install Debian's `dataset-fashion-mnist` "
            "(apt-get install -y dataset-fashion-mnist) or set data.source.root to the folder holding it."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} values (truncated file?)")
    return data.reshape(shape)


@dataclass
class ArraySource:
    """In-memory images (N, H, W, C) uint8 and labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    origin: str

    def __len__(self) -> int:
        return len(self.labels)

    def item(self, index: int) -> tuple[np.ndarray, int, dict]:
        return self.images[index], int(self.labels[index]), {"origin": self.origin, "index": int(index)}


class FashionMNIST:
    """Fashion-MNIST (Xiao et al. 2017) from the IDX files of Debian's `dataset-fashion-mnist`."""

    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }

    def __init__(self, root: str = "/usr/share/datasets/fashion-mnist") -> None:
        self.root = Path(root)
        self.class_names: Sequence[str] = FASHION_MNIST_CLASSES

    def load(self, split: str) -> ArraySource:
        img_file, lbl_file = self.files[split]
        images = read_idx(self.root / img_file)
        labels = read_idx(self.root / lbl_file)
        if len(images) != len(labels):
            raise ValueError(f"{self.root}: {len(images)} images but {len(labels)} labels in split {split}")
        return ArraySource(images[..., None], labels.astype(np.int64), origin=f"fashion-mnist/{split}")


class ImageFolder:
    """A folder of class sub-folders of images (`root/<class>/<image>`), like torchvision's ImageFolder.

    A `test` sub-folder with the same class layout becomes the test split when present
    (`root/train/<class>/...` and `root/test/<class>/...`); otherwise the test split is held out.
    """

    def __init__(self, root: str, channels: int = 3, image_size: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (data.source.root)")
        self.channels = channels
        self.image_size = image_size
        base = self.root / "train" if (self.root / "train").is_dir() else self.root
        self.class_names = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "test")
        if not self.class_names:
            raise ValueError(f"image folder {base} has no class sub-folders (expected {base}/<class>/<image>)")
        self.has_test = (self.root / "test").is_dir() and base != self.root

    def _files(self, base: Path) -> list[tuple[Path, int]]:
        out = []
        for label, name in enumerate(self.class_names):
            folder = base / name
            if folder.is_dir():
                out += [(p, label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        return out

    def _read(self, path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            if self.image_size is not None and im.size != (self.image_size, self.image_size):
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr

    def load(self, split: str) -> ArraySource:
        base = self.root / "train" if split == "train" and self.has_test else self.root
        base = self.root / "test" if split == "test" and self.has_test else base
        files = self._files(base)
        if not files:
            raise ValueError(f"no images found under {base} (extensions {IMAGE_EXTENSIONS})")
        images = np.stack([self._read(p) for p, _ in files])
        labels = np.array([lbl for _, lbl in files], dtype=np.int64)
        return ArraySource(images, labels, origin=str(base))
