"""Hydra's `.hydra/` record of a job (config.yaml, hydra.yaml, overrides.yaml), written with credentials masked.

Hydra's own writer (`hydra.output_subdir`) copies the command line verbatim into overrides.yaml and
hydra.yaml, so a URL with a token or a bearer header typed as an override lands on disk. `train.yaml` and
`evaluate.yaml` turn it off (`hydra.output_subdir: null`) and register this callback instead, which writes
the same three files through `core.secrets.scrub` before the task runs (and, in a `-m` sweep, rewrites the
sweep's multirun.yaml the same way). It also masks what the job's log handlers print, Hydra's own
"Error executing job with overrides: [...]" included. See docs/ARCHITECTURE.md, "Secrets".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_text
from core.secrets import ScrubbingFilter, scrub


def _write(obj: Any, path: Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(scrub(obj))))


class ScrubbedHydraOutput(Callback):
    """Write `<job output dir>/<subdir>/{config,hydra,overrides}.yaml` scrubbed (unresolved, as Hydra does)."""

    def __init__(self, subdir: str = ".hydra") -> None:
        self.subdir = subdir

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        for handler in logging.getLogger().handlers:  # configured by hydra.job_logging before this call
            if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
                handler.addFilter(ScrubbingFilter())
        out = Path(config.hydra.runtime.output_dir) / self.subdir
        everything = OmegaConf.to_container(config, resolve=False)  # `${oc.env:...}` stays a reference
        hydra = everything.pop("hydra")
        _write(everything, out / "config.yaml")
        _write({"hydra": hydra}, out / "hydra.yaml")
        _write(OmegaConf.to_container(config.hydra.overrides.task, resolve=False), out / "overrides.yaml")
        if str(config.hydra.mode) == "RunMode.MULTIRUN":
            self._scrub_multirun(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._scrub_multirun(config)

    @staticmethod
    def _scrub_multirun(config: DictConfig) -> None:
        """The sweeper saves the sweep's config, overrides included, as <sweep dir>/multirun.yaml."""
        path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if path.exists():
            _write(OmegaConf.to_container(OmegaConf.load(path), resolve=False), path)
