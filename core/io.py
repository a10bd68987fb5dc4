"""Atomic, durable file writes and the small serialisation helpers built on them.

Every file the pipeline writes (checkpoints, manifests, shards, results) goes through `atomic_open`:
a temporary file in the destination directory (same filesystem, so the rename is atomic) is written,
flushed and fsynced, given the permissions a plain `open` would (the umask is honoured), renamed over
the destination with `os.replace`, and the directory is fsynced so the rename survives a power cut.
A killed job never leaves a half-written file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once: reading it means setting it, and a file another thread created in
    between would get the wrong mode."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that renames and creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on error it is removed.

    Creates the parent directory if needed. `mode` must be a write mode ("w", "wb", ...).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open needs a write mode, got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:  # owns (and closes) fd from here on
            # mkstemp makes the file owner-only; outputs get the permissions `open` would give them.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed `atomic_open` writes to `path` left beside it; returns them. Only
    for a caller that is the sole writer of `path` (another process's write in progress would be lost)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably; returns the path."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """A structure `json.dumps` writes as strict JSON: NaN/inf -> None, numpy scalars and arrays -> Python,
    tuples -> lists, paths -> str, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and type(obj).__module__ == "numpy":  # np.generic and np.ndarray
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """Write `obj` as indented strict JSON (see `json_safe`), keys sorted unless `sort_keys=False` (a
    row whose column order is meant for readers), atomically."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=sort_keys, default=str)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike, default: Any = None, strict: bool = False) -> Any:
    """The JSON in `path`; `default` when the file is missing, and when it is not valid JSON unless
    `strict` (then ValueError naming the file: for files whose loss must not pass unnoticed)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if strict:
            raise ValueError(f"{path} is not valid JSON ({e}): restore it or delete it to start over") from e
        return default


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plain_container(obj: Any) -> Any:
    """`obj` with OmegaConf containers, dict subclasses and tuples turned into plain dicts and lists (what
    `torch.load(weights_only=True)` reads back: hyper-parameters saved in checkpoints)."""
    obj = to_container(obj)
    if isinstance(obj, dict):
        return {k: plain_container(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_container(v) for v in obj]
    return obj


def to_container(cfg: Any) -> Any:
    """A resolved plain container of an OmegaConf config; anything else is returned as it is."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def config_hash(cfg: Any, keys: Iterable[str] | None = None) -> str:
    """sha256 of the canonical JSON of a (resolved) config or any JSON-able object; with `keys`, of
    those top-level keys only. The one hash of the project: stage configs, sweeps, manifests, samples."""
    data = to_container(cfg)
    if keys is not None:
        data = {k: data.get(k) for k in keys}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and directory under `path` (and `path` itself): what a library wrote there with
    plain `open` becomes durable before the tree is renamed into place."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def check_publishable(path: str | os.PathLike, force: bool = False) -> None:
    """Raise FileExistsError unless `publish_directory(path, ..., force)` may write `path`: it is absent or
    an empty directory, or a directory and `force` is set (the error says to pass force=true)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} exists and is not empty; pass force=true to replace it")


def publish_directory(path: str | os.PathLike, write: Callable[[Path], Any], force: bool = False) -> Path:
    """Create directory `path` atomically: `write(tmp)` fills a temporary directory beside it, which is
    synced (`fsync_tree`) and renamed to `path`. An existing non-empty `path` is refused (FileExistsError)
    unless `force`; then it is moved aside, replaced, and removed only once the new one is in place. A
    failed `write` removes its temporary directory and leaves `path` as it was. Returns `path`."""
    path = Path(path)
    check_publishable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        write(tmp)
        fsync_tree(tmp)
        aside = None
        if path.is_dir():
            aside = Path(
                tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.replaced.", suffix=TMP_SUFFIX)
            )
            os.replace(path, aside / path.name)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return path
