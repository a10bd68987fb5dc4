"""Small helpers shared by the entry points: saved configs (credentials scrubbed) and DONE markers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_json, atomic_write_text, read_json, to_container
from core.secrets import scrub


def scrub_secrets(obj: Any) -> Any:
    """A config container with credentials masked, by key name and by value (`core.secrets.scrub`)."""
    return scrub(obj)


def save_config(cfg: DictConfig | dict, path: str | os.PathLike) -> Path:
    """Save the resolved config as YAML, credentials scrubbed, atomically."""
    data = scrub_secrets(to_container(cfg))
    return atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


def read_done(stage_dir: str | os.PathLike) -> dict | None:
    """The DONE marker of a stage directory, or None when the stage has not finished."""
    done = read_json(Path(stage_dir) / "DONE")
    return done if isinstance(done, dict) else None


def finished(stage_dir: str | os.PathLike, config_hash_: str) -> dict | None:
    """The DONE marker of a stage directory when it was written for config `config_hash_`, else None."""
    done = read_done(stage_dir)
    return done if done is not None and done.get("config_hash") == config_hash_ else None


def write_done(stage_dir: str | os.PathLike, config_hash_: str, **extra: Any) -> Path:
    return atomic_write_json(Path(stage_dir) / "DONE", {"config_hash": config_hash_, **extra})

