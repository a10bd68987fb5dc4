"""Image sources that the shard writer turns into WebDataset shards.

A source yields `(image, label, meta)` with `image` a uint8 array (H, W, C), `label` an int and
`meta` a JSON-able dict. Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.images.shape[1:])

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


class UndecodableImage(ValueError):
    """An image file that cannot be decoded; prepare skips it and lists it in the manifest."""


def decode_image(
    path: str | Path,
    channels: int = 3,
    image_size: int | None = None,
    background: Sequence[int] = (255, 255, 255),
) -> np.ndarray:
    """Decode one image file to uint8 (H, W, channels) under the decoding policy of prepare.

    Policy (docs/ARCHITECTURE.md, "Shards and manifest"):
    - EXIF orientation is applied (`ImageOps.exif_transpose`), so the image is stored upright.
    - 16-bit images (`I;16*`, `I`) are scaled to 8 bits (v / 257, rounded), not clipped.
    - Palette images (`P`) are expanded; with a transparent colour they are treated as RGBA.
    - Alpha (`RGBA`, `LA`, `PA`) is composited on `background` (white by default), never dropped.
    - CMYK (and YCbCr, LAB, 1-bit) are converted with Pillow's conversion to RGB/L (no ICC colour management).
    - With `image_size`, the shorter side is resized to `image_size` (bicubic, antialiased) and the centre
      cropped to a square, as LDM's ImageNet preprocessing does (Rombach et al. 2022).
    - A file Pillow cannot decode raises `UndecodableImage` naming it (prepare skips it and lists it).
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr = np.asarray(im).astype(np.float64)
                im = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(
                    np.clip(np.rint(arr * (255.0 if arr.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
                )
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (*[int(b) for b in background], 255))
                im = Image.alpha_composite(bg, rgba).convert("RGB")
            im = im.convert("L" if channels == 1 else "RGB")
            if image_size is not None and im.size != (image_size, image_size):
                w, h = im.size
                scale = image_size / min(w, h)
                nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                im = im.resize((nw, nh), Image.BICUBIC)
                left, top = (nw - image_size) // 2, (nh - image_size) // 2
                im = im.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"cannot decode image {path}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def original_bytes(path: str | Path, channels: int, image_size: int | None) -> tuple[str, bytes] | None:
    """`("jpg" | "png", the file's bytes)` when storing the file untouched gives the same pixels as
    `decode_image` (a JPEG/PNG already upright, in the target mode and size); otherwise None."""
    try:
        with Image.open(path) as im:
            fmt, mode, size = im.format, im.mode, im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    if fmt not in ("JPEG", "PNG") or mode != ("L" if channels == 1 else "RGB") or orientation not in (0, 1):
        return None
    if image_size is not None and size != (image_size, image_size):
        return None
    with open(path, "rb") as f:
        return ("jpg" if fmt == "JPEG" else "png"), f.read()


def _visible_name(name: str) -> bool:
    return not name.startswith(".")


def _visible(p: Path) -> bool:
    return _visible_name(p.name)


def _is_image(entry: os.DirEntry) -> bool:
    """A visible image file (by extension) of an `os.scandir` listing."""
    return (_visible_name(entry.name) and entry.is_file()
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS)  # fmt: skip


def _has_images(folder: Path) -> bool:
    """Whether `folder` holds an image file directly (stops at the first one: no full listing)."""
    with os.scandir(folder) as entries:
        return any(_is_image(e) for e in entries)


class PackedStrings:
    """A list of strings packed in one buffer with an offset table: about one byte per character, where a
    list of `Path` objects costs ~400 bytes per entry (38 MB for 100k files) and a `str` ~50 bytes plus its
    characters. Built by appending. Any `str` round-trips, lone surrogates included (UTF-8 with
    `surrogatepass`: a file name's undecodable bytes, `os.fsdecode`'s escapes, come back as they were)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ends = array("q")

    def append(self, item: str) -> None:
        self._buf += item.encode("utf-8", "surrogatepass")
        self._ends.append(len(self._buf))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:
        start = self._ends[index - 1] if index > 0 else 0
        return self._buf[start : self._ends[index]].decode("utf-8", "surrogatepass")


class MetadataCaptions:
    """The captions of one folder's `metadata.jsonl` (lines `{"file_name": ..., "text": ...}`, the diffusers /
    Hugging Face imagefolder convention), looked up by file name relative to the folder, without a dict.

    The texts are appended to `texts` (shared by the folders of a listing: row r of this file is
    `texts[self.start + r]`); the file names are packed (`PackedStrings`) and found through their sorted
    hashes. Memory while it is alive: the names' bytes plus ~32 bytes per row (a dict of `str` held ~250
    bytes per row besides the texts). A file name listed twice takes its last row, as a dict did. No
    `metadata.jsonl`: no captions.
    """

    def __init__(self, folder: Path, texts: PackedStrings) -> None:
        self.start = len(texts)
        self._names = PackedStrings()
        hashes = array("q")
        path = folder / "metadata.jsonl"
        if path.exists():
            with open(path, encoding="utf-8") as f:  # streamed: neither the file's text nor a list of lines
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        name, text = str(row["file_name"]), str(row["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(
                            f"{path} line {n}: expected a JSON object with 'file_name' and 'text' ({e!r})"
                        ) from e
                    self._names.append(name)
                    texts.append(text)
                    hashes.append(hash(name))  # str hashes are fixed within a process: built and used here
        keys = np.frombuffer(hashes, dtype=np.int64) if hashes else np.zeros(0, np.int64)
        self._order = np.argsort(keys, kind="stable")  # the rows of one hash in file order: the last one wins
        self._keys = keys[self._order]

    def __len__(self) -> int:
        return len(self._names)

    def row(self, name: str) -> int:
        """The index in `texts` of the caption of `name` (its last row), or -1 when it has none."""
        key = hash(name)
        lo, hi = np.searchsorted(self._keys, key, "left"), np.searchsorted(self._keys, key, "right")
        for j in range(int(hi) - 1, int(lo) - 1, -1):
            r = int(self._order[j])
            if self._names[r] == name:
                return self.start + r
        return -1


class FileSource:
    """A lazy list of image files: decoded one at a time by `item`, so memory does not grow with the dataset
    beyond the packed file names (`PackedStrings`), a label per file and the packed captions.

    `names` are paths relative to `root`. `captions[caption_rows[i]]` is the `metadata.jsonl` caption of file
    i, none where `caption_rows[i]` is -1 (int32: 4 bytes per file, plus the caption's own bytes and an
    8-byte offset in `captions`); a `.txt` sidecar next to the image, read when the image is, takes
    precedence.
    """

    def __init__(self, root: Path, names: PackedStrings, labels: np.ndarray, captions: PackedStrings,
                 caption_rows: np.ndarray, channels: int, image_size: int | None, background: Sequence[int],
                 keep_original: bool = False) -> None:  # fmt: skip
        if not len(names) == len(labels) == len(caption_rows):
            raise ValueError(f"{len(names)} file names, {len(labels)} labels, {len(caption_rows)} caption rows")
        self.root, self.names, self.labels = root, names, labels
        self.captions, self.caption_rows = captions, caption_rows
        self.channels, self.image_size, self.background = channels, image_size, tuple(background)
        self.keep_original = keep_original
        root_str = os.fspath(root)
        self._prefix = "" if root_str == "." else os.path.join(root_str, "")

    def __len__(self) -> int:
        return len(self.names)

    def path(self, index: int) -> str:
        """The file's path, `str(root / name)`, built as a string: a `Path` would intern every part of it
        (`sys.intern`, pathlib's parser), a churn of the interpreter's interned-string table per image."""
        return self._prefix + self.names[index]

    def caption(self, index: int) -> str | None:
        """The `metadata.jsonl` caption of file `index`, or None."""
        row = int(self.caption_rows[index])
        return self.captions[row] if row >= 0 else None

    def fingerprint(self, indices: Sequence[int]) -> str:
        """A hash of the files (names and labels) at `indices`: a plan made from another listing differs."""
        h = hashlib.sha256()
        for i in indices:
            h.update(f"{self.names[int(i)]}\0{int(self.labels[int(i)])}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def item(self, index: int) -> tuple[np.ndarray, int, dict]:
        path = self.path(index)
        image = decode_image(path, self.channels, self.image_size, self.background)
        meta: dict = {"file": self.names[index], "index": int(index)}
        sidecar = os.path.splitext(path)[0] + ".txt"  # Path.with_suffix(".txt")
        if os.path.exists(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                caption = f.read().strip()
        else:
            caption = self.caption(index)
        if caption is not None:
            meta["caption"] = caption
        if self.keep_original and (raw := original_bytes(path, self.channels, self.image_size)) is not None:
            meta["_encoded"] = raw  # the writer stores these bytes under their own key, not re-encoded
        return image, int(self.labels[index]), meta


class ImageFolder:
    """A folder of images: class sub-folders (`root/<class>/<image>`, like torchvision's ImageFolder), or the
    images themselves (`root/<image>`, a diffusers / Hugging Face image-caption folder: one class).

    Layouts:
    - `root/<class>/<image>`: one class per sub-folder, labels in sorted folder order.
    - `root/<image>` with `root/metadata.jsonl` or `<image>.txt` captions (a folder without class sub-folders):
      one class, label 0, named after the folder (`root`'s name). Sub-folders, when present, are classes.
    - Either of these under `root/train/` (the Hugging Face `imagefolder` split layout) is the train split; the
      folder's own held-out split becomes the test split: `root/test/`, else `root/validation/`, `root/val/` or
      `root/valid/` (the first that exists; with `test/`, a validation folder is not used), with the layout of
      `train/`. Without one the test split is held out of train. The val split is always a seeded hold-out of
      train (`data.val_size`), as for every source.
    Hidden folders and files (names starting with `.`, e.g. `.ipynb_checkpoints`) are ignored.
    Class folders may be ImageNet synsets (`n01440764`); `class_map` names a file of lines
    `<folder> <class name...>` (ImageNet's `LOC_synset_mapping.txt`) giving the class names.
    Captions: a sidecar `<image stem>.txt` next to an image, or a `metadata.jsonl` in the image's folder or
    the split root (`file_name`, `text`); images without one get a template caption from the class.
    Images are decoded by `decode_image` (the policy is stated there). With `keep_original`, a JPEG or PNG
    that needs no conversion (upright, target mode and size) is stored as its original bytes (`jpg`/`png`
    key) instead of a re-encoded PNG: no generation loss, smaller shards; the DataModule decodes both.
    """

    HELD_OUT = ("test", "validation", "val", "valid")  # the folders that become the test split, by preference

    def __init__(self, root: str, channels: int = 3, image_size: int | None = None,
                 class_map: str | None = None, background: Sequence[int] = (255, 255, 255),
                 keep_original: bool = False) -> None:  # fmt: skip
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (data.source.root)")
        self.channels = channels
        self.image_size = image_size
        self.background = tuple(background)
        self.keep_original = keep_original
        self.base = base = self.root / "train" if (self.root / "train").is_dir() else self.root
        folders = sorted(p.name for p in base.iterdir() if p.is_dir() and _visible(p) and p.name != "test")
        if not folders and not _has_images(base):
            raise ValueError(
                f"image folder {base} has neither class sub-folders nor images {IMAGE_EXTENSIONS}. Put the images "
                f"in {base}/<class>/ (one folder per class), or directly in {base} (one class) with captions in "
                f"{base}/metadata.jsonl (lines {{\"file_name\": ..., \"text\": ...}}) or <image>.txt sidecars"
            )
        # "": the images lie in the split folder itself, one class named after the dataset folder
        self.folders = folders or [""]
        self.class_names = list(folders) or [self.root.resolve().name]
        if class_map:
            mapping = self._read_class_map(Path(class_map))
            missing = [f for f in self.class_names if f not in mapping]
            if missing:
                raise ValueError(
                    f"class map {class_map} has no entry for class folder(s) {missing[:5]} of {base}"
                )
            self.class_names = [mapping[f] for f in self.class_names]
        held_out = (self.root / n for n in self.HELD_OUT) if base != self.root else ()
        self.test_dir = next((p for p in held_out if p.is_dir()), None)
        self.has_test = self.test_dir is not None
        self.image_shape = (image_size, image_size, channels) if image_size else None

    @staticmethod
    def _read_class_map(path: Path) -> dict[str, str]:
        if not path.exists():
            raise FileNotFoundError(f"class map {path} does not exist (data.source.class_map)")
        out = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                parts = line.strip().split(maxsplit=1)
                if len(parts) != 2:
                    raise ValueError(f"{path} line {n}: expected '<folder> <class name>', got {line!r}")
                out[parts[0]] = parts[1].split(",")[0].strip()
        return out

    def _listing(self, base: Path) -> FileSource:
        """The images of `base/<class>/` (or of `base` itself, one class), sorted by name within each class
        folder (hidden ones left out), with their `metadata.jsonl` captions: a class folder's own, else the
        split root's (`file_name` relative to the folder that holds the metadata.jsonl).

        Captions are packed as they are read (`MetadataCaptions`: every row's text, referenced by the images
        through `caption_rows`), so no dict of captions is held, neither per folder nor for the dataset:
        besides the packed result, the transient memory is the names of one class folder's files (a sorted
        list) and the lookup of the split root's and one class folder's metadata.jsonl (~32 bytes per row
        plus the file name's bytes). Rows that match no image keep their text (bounded by the metadata's size).
        """
        names, labels, captions, rows = PackedStrings(), array("q"), PackedStrings(), array("i")
        top = MetadataCaptions(base, captions)
        for label, name in enumerate(self.folders):
            folder = base / name
            if not folder.is_dir():
                continue
            local = MetadataCaptions(folder, captions) if name else None
            with os.scandir(folder) as entries:
                files = sorted(e.name for e in entries if _is_image(e))
            for file in files:
                rel = f"{name}/{file}" if name else file
                row = local.row(file) if local is not None else -1
                rows.append(row if row >= 0 else top.row(rel))
                names.append(rel)
                labels.append(label)
            del local, files
        return FileSource(base, names, np.array(labels, dtype=np.int64), captions, np.array(rows, dtype=np.int32),
                          self.channels, self.image_size, self.background, self.keep_original)  # fmt: skip

    def load(self, split: str) -> FileSource:
        base = self.test_dir if split == "test" and self.test_dir is not None else self.base
        source = self._listing(base)
        if not len(source):
            raise ValueError(f"no images found under {base} (extensions {IMAGE_EXTENSIONS})")
        return source
