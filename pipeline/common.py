"""Small helpers shared by the entry points: atomic writes, config hashing, DONE markers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

SECRET_KEY = re.compile(r"(api[_-]?key|token|password|secret)", re.IGNORECASE)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def scrub_secrets(obj: Any) -> Any:
    """Replace the value of any key that looks like a credential, recursively."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) else scrub_secrets(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub_secrets(v) for v in obj]
    return obj


def to_container(cfg: DictConfig | dict) -> dict:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return cfg


def config_hash(cfg: DictConfig | dict, keys: Iterable[str] | None = None) -> str:
    """sha256 of the canonical JSON of the resolved config (optionally of some top-level keys only)."""
    data = to_container(cfg)
    if keys is not None:
        data = {k: data.get(k) for k in keys}
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def save_config(cfg: DictConfig | dict, path: str | os.PathLike) -> Path:
    """Save the resolved config as YAML, credentials scrubbed, atomically."""
    data = scrub_secrets(to_container(cfg))
    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


def read_done(stage_dir: str | os.PathLike) -> dict | None:
    """The DONE marker of a stage directory, or None when the stage has not finished."""
    path = Path(stage_dir) / "DONE"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_done(stage_dir: str | os.PathLike, config_hash_: str, **extra: Any) -> Path:
    return atomic_write_json(Path(stage_dir) / "DONE", {"config_hash": config_hash_, **extra})


def env_rank() -> int:
    """The global rank from the launcher's environment (before any process group exists)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0
