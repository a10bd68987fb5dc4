"""Turn a composed train config into Lightning objects (trainer, callbacks, loggers)."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from core.dist import env_rank
from core.io import atomic_open, atomic_write_json, config_hash, read_json
from pipeline.common import read_done, scrub_secrets
from pipeline.preemption import SlurmRequeue

# Trainer keys that say where/how fast a run goes, not what it computes: a change of these does not
# invalidate a finished stage (a stage trained on 8 GPUs is not redone on 1).
VOLATILE_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar",
                         "default_root_dir", "log_every_n_steps", "plugins")  # fmt: skip
VOLATILE_DATA_KEYS = ("num_workers", "urls")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through `core.io.atomic_open`: a killed job never leaves half a .ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        with atomic_open(path, "wb") as f:  # fsyncs the file and its directory
            torch.save(checkpoint, f)


class TrainTime(Callback):
    """Wall seconds spent in training batches (data loading included; validation, testing and sanity
    checks excluded), summed over resumptions: the figure behind "N minutes of training" claims."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # training resumes after it
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seconds = float(state_dict["seconds"])


def stage_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines a stage's result, including its upstream stages' hashes."""
    data = OmegaConf.to_container(cfg, resolve=True)
    trainer = {k: v for k, v in data.get("trainer", {}).items() if k not in VOLATILE_TRAINER_KEYS}
    dataset = {k: v for k, v in data.get("data", {}).items() if k not in VOLATILE_DATA_KEYS}
    dataset.pop("datamodule", None)
    upstream = {name: (read_done(path) or {}).get("config_hash") for name, path in upstream_dirs(cfg).items()}
    manifest = Path(cfg.data.dir) / "manifest.json"
    content = (read_json(manifest, strict=True) or {}).get("content_hash")
    return config_hash(
        {"stage": data["stage"], "model": data.get("model"), "data": dataset, "trainer": trainer,
         "seed": data.get("seed"), "upstream": upstream, "dataset_content": content}  # fmt: skip
    )


def upstream_dirs(cfg: DictConfig) -> dict[str, str]:
    upstream = cfg.stage.get("upstream")
    return dict(OmegaConf.to_container(upstream, resolve=True)) if upstream else {}


def wandb_run_id(run_dir: str, stage_dir_name: str, chash: str) -> str:
    """A stable W&B id: a requeued or resumed stage continues its W&B run instead of starting a new one."""
    return hashlib.sha1(f"{os.path.abspath(run_dir)}|{stage_dir_name}|{chash}".encode()).hexdigest()[:16]


def build_loggers(cfg: DictConfig, chash: str) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        if name == "wandb":
            with open_dict(lcfg):
                lcfg.id = wandb_run_id(cfg.paths.run_dir, cfg.stage.dir_name, chash)
                if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online":
                    lcfg.offline = True
            os.makedirs(lcfg.save_dir, exist_ok=True)
            # W&B records its init arguments (notes, tags, name) in the run: credentials masked first;
            # `settings` (conf/logger/wandb.yaml) keeps the command line out of its metadata.
            lcfg = OmegaConf.create(scrub_secrets(OmegaConf.to_container(lcfg, resolve=True)))
        loggers.append(instantiate(lcfg, _convert_="all"))
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(scrub_secrets(OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def build_callbacks(cfg: DictConfig, stage_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=stage_dir / "checkpoints",
            filename="step{step}",
            save_top_k=0,
            save_last=True,
            every_n_train_steps=cfg.stage.checkpoint_every_n_steps,
            auto_insert_metric_name=False,
        ),
        TQDMProgressBar(refresh_rate=cfg.progress_refresh_rate),
        TrainTime(),
    ]
    if cfg.get("logger"):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    # The stage's rendering / scoring callbacks (conf/callbacks/<stage>.yaml); an entry set to null is off.
    for cb in (cfg.get("callbacks") or {}).values():
        if cb is not None:
            callbacks.append(instantiate(cb))
    return callbacks


def quiet_intended_warnings() -> None:
    """Silence two Lightning warnings that every run of ours would print and that describe intent, not bugs:
    the hint to prepend `srun` (printed on any machine that has Slurm installed, a login node or our test
    cluster; runs meant for Slurm go through `launcher=slurm`, which does use srun, and the hint names the
    wrong script), and "modules in eval mode at the start of training" (EMA copies and frozen upstream nets
    are in eval mode on purpose)."""
    warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def build_trainer(cfg: DictConfig, stage_dir: Path, chash: str) -> pl.Trainer:
    quiet_intended_warnings()
    plugins: list[Any] = [AtomicCheckpointIO()]
    callbacks = build_callbacks(cfg, stage_dir)
    if SLURMEnvironment.detect():
        # A task under srun: ranks from srun's environment as before, but Lightning's own USR1 handler
        # (it saves inside the handler, a collective that can deadlock DDP) is replaced by SlurmRequeue.
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(SlurmRequeue(stage_dir, check_every_n_steps=cfg.requeue_check_every_n_steps))
    return instantiate(
        cfg.trainer,
        default_root_dir=str(stage_dir),
        callbacks=callbacks,
        logger=build_loggers(cfg, chash) or False,
        plugins=plugins,
    )


def resume_checkpoint(stage_dir: Path) -> str | None:
    """The newest of `checkpoints/last.ckpt` and SLURM's `hpc_ckpt_*.ckpt` (written on preemption)."""
    candidates = [stage_dir / "checkpoints" / "last.ckpt", *stage_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.exists()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


def supersede_stale(stage_dir: Path, chash: str) -> None:
    """Mark the stage as started with `chash`; checkpoints of another config are moved aside, not resumed.

    Called on every rank; only rank 0 (by environment) moves files, before the trainer exists.
    """
    marker = stage_dir / "STARTED"
    if env_rank() != 0:
        return
    previous = (read_json(marker, strict=True) or {}).get("config_hash")
    if previous and previous != chash:
        ckpts = stage_dir / "checkpoints"
        if ckpts.exists():
            target = stage_dir / f"checkpoints.superseded-{previous[:12]}"
            shutil.rmtree(target, ignore_errors=True)
            ckpts.rename(target)
            print(f"[train] {stage_dir.name}: config changed ({previous[:12]} -> {chash[:12]}); "
                  f"old checkpoints moved to {target}")  # fmt: skip
        for p in [stage_dir / "DONE", *stage_dir.glob("hpc_ckpt_*.ckpt")]:
            p.unlink(missing_ok=True)
    if previous != chash:
        atomic_write_json(marker, {"config_hash": chash})
