"""Turn a composed train config into Lightning objects (trainer, callbacks, loggers)."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytorch_lightning as pl
from hydra.utils import instantiate
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from core.dist import env_rank
from core.io import atomic_write_json, config_hash, fsync_dir, read_json
from pipeline.checkpoints import DurableCheckpointIO
from pipeline.common import read_done, scrub_secrets
from pipeline.preemption import SlurmRequeue

# Trainer keys that say where/how fast a run goes, not what it computes: a change of these does not
# invalidate a finished stage (a stage trained on 8 GPUs is not redone on 1).
VOLATILE_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "enable_progress_bar",
                         "default_root_dir", "log_every_n_steps", "plugins")  # fmt: skip
VOLATILE_DATA_KEYS = ("num_workers",)


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
    """Hash of everything that determines a stage's result, including its upstream stages' hashes.

    `data.urls` (shards read from elsewhere) is part of it when set, with the credentials of each URL
    left out (`url_identity`); unset, the hash is the one of a config that never had the key.
    See docs/ARCHITECTURE.md, "DONE markers and config hashes".
    """
    data = _without_optional_defaults(OmegaConf.to_container(cfg, resolve=True))
    trainer = {k: v for k, v in data.get("trainer", {}).items() if k not in VOLATILE_TRAINER_KEYS}
    dataset = {k: v for k, v in data.get("data", {}).items() if k not in VOLATILE_DATA_KEYS}
    dataset.pop("datamodule", None)
    urls = dataset.pop("urls", None)
    if urls:
        dataset["urls"] = {split: url_identity(str(url)) for split, url in urls.items()}
    upstream = {name: (read_done(path) or {}).get("config_hash") for name, path in upstream_dirs(cfg).items()}
    manifest = Path(cfg.data.dir) / "manifest.json"
    content = (read_json(manifest, strict=True) or {}).get("content_hash")
    return config_hash(
        {"stage": _stage_identity(data["stage"]), "model": data.get("model"), "data": dataset, "trainer": trainer,
         "seed": data.get("seed"), "upstream": upstream, "dataset_content": content}  # fmt: skip
    )


# Options that, at their default, leave the hash what it was before they existed (finished stages of older
# configs are not retrained for a key they never had): dotted key -> default. The autoencoder's options appear
# twice, under model.autoencoder and resolved into the module's `autoencoder: ${model.autoencoder}`.
OPTIONAL_KEYS = {
    "stage.module.init_from_diffusers": None,
    "stage.module.init_subfolder": None,
    "stage.module.freeze_pretrained": False,
    "model.autoencoder.norm_num_groups": None,
    "stage.module.autoencoder.norm_num_groups": None,
}
PRETRAINED_SUBFOLDER = {"autoencoder": "vae", "diffusion": "unet"}


def _without_optional_defaults(data: dict) -> dict:
    """`data` (a resolved config, changed in place) without the OPTIONAL_KEYS that are at their defaults."""
    for dotted, default in OPTIONAL_KEYS.items():
        *parents, key = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == default:
            del node[key]
    return data


def _stage_identity(stage: dict) -> dict:
    """The stage block as hashed: a diffusers model to start from (`init_from_diffusers`) identified by its
    files' content as well as its path."""
    module = dict(stage.get("module") or {})
    if module.get("init_from_diffusers"):
        from lightning_modules.interop.pretrained import model_dir_content_hash

        sub = PRETRAINED_SUBFOLDER.get(str(stage.get("name")), "")
        module["init_from_diffusers_content"] = model_dir_content_hash(
            module["init_from_diffusers"], module.get("init_subfolder"), sub
        )
    return {**stage, "module": module} if "module" in stage else dict(stage)


def url_identity(url: str) -> str:
    """What a shard URL says about the data, without its credentials: for `scheme://user:token@host/path?sig=..`
    the scheme, host and path (a rotated token or signature does not retrain a stage); a local path or a
    `pipe:` command as written."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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
            save_on_exception=False,  # a stopped run (NaN, full disk) never overwrites the last good checkpoint
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
    plugins: list[Any] = [DurableCheckpointIO(stage_dir)]
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


SUPERSEDED_PREFIX = "checkpoints.superseded-"
SUPERSEDED_RECORD = "SUPERSEDED.json"  # inside a set-aside folder: its config hash, the stage files it holds
# Files of the stage folder that belong to its checkpoints' config and travel with them when set aside.
STAGE_STATE_FILES = ("DONE", "metrics.json", "config.yaml")


def superseded_dir(stage_dir: Path, chash: str) -> Path:
    return stage_dir / f"{SUPERSEDED_PREFIX}{chash[:12]}"


def _stage_state_files(stage_dir: Path) -> list[Path]:
    return [p for p in [*(stage_dir / n for n in STAGE_STATE_FILES), *sorted(stage_dir.glob("hpc_ckpt_*.ckpt"))]
            if p.is_file()]  # fmt: skip


def _checkpoints_owner(stage_dir: Path, started: str | None) -> str | None:
    """The config hash the stage's checkpoints belong to: the record of an interrupted set-aside or restore
    in `checkpoints/`, else STARTED, else DONE (a stage finished before STARTED existed)."""
    record = read_json(stage_dir / "checkpoints" / SUPERSEDED_RECORD, strict=True)
    if record:
        return record["config_hash"]
    return started or (read_done(stage_dir) or {}).get("config_hash")


def set_aside(stage_dir: Path, owner: str) -> Path | None:
    """Move `checkpoints/` with DONE, metrics.json, config.yaml and `hpc_ckpt_*.ckpt` (the state of config
    `owner`) to `checkpoints.superseded-<owner[:12]>/`; None when there is nothing to move.

    The stage files first go into `checkpoints/` with a record naming them; one rename then sets the whole
    folder aside, so a job killed midway leaves a state the next run completes. An older folder of the same
    name is kept, renamed `<name>.<n>` (n = 1, 2, ... in the order they were displaced): nothing is deleted.
    """
    ckpts = stage_dir / "checkpoints"
    loose = _stage_state_files(stage_dir)
    if not ckpts.is_dir() and not loose:
        return None
    ckpts.mkdir(exist_ok=True)
    record = read_json(ckpts / SUPERSEDED_RECORD, strict=True) or {}
    names = sorted({*record.get("stage_files", []), *(p.name for p in loose)})
    atomic_write_json(ckpts / SUPERSEDED_RECORD, {"config_hash": owner, "stage_files": names})
    for p in loose:
        p.rename(ckpts / p.name)
    target = superseded_dir(stage_dir, owner)
    if target.exists():
        n = next(i for i in range(1, 1 << 20) if not target.with_name(f"{target.name}.{i}").exists())
        target.rename(target.with_name(f"{target.name}.{n}"))
    ckpts.rename(target)
    fsync_dir(stage_dir)
    return target


def _unnest(stage_dir: Path) -> None:
    """Finish a restore: the stage files listed in `checkpoints/SUPERSEDED.json` back into the stage folder."""
    ckpts = stage_dir / "checkpoints"
    record = read_json(ckpts / SUPERSEDED_RECORD, strict=True)
    if record is None:
        return
    for name in record.get("stage_files", []):
        if (ckpts / name).is_file():
            (ckpts / name).rename(stage_dir / name)
    (ckpts / SUPERSEDED_RECORD).unlink()
    fsync_dir(stage_dir)


def restore_superseded(stage_dir: Path, chash: str) -> Path | None:
    """Bring back the state of config `chash` set aside earlier (checkpoints, DONE, metrics, config.yaml),
    when the stage folder holds no other state; returns the folder it came from, or None."""
    source = superseded_dir(stage_dir, chash)
    if not source.is_dir() or (stage_dir / "checkpoints").exists() or _stage_state_files(stage_dir):
        return None
    record = read_json(source / SUPERSEDED_RECORD, strict=True)
    if record is not None and record.get("config_hash") != chash:
        return None  # another config whose hash starts with the same 12 characters
    if record is None:  # set aside before records existed: the checkpoints alone
        atomic_write_json(source / SUPERSEDED_RECORD, {"config_hash": chash, "stage_files": []})
    source.rename(stage_dir / "checkpoints")
    fsync_dir(stage_dir)
    return source


def _requeued_forced_run(started: dict, chash: str) -> bool:
    """Whether this is a forced run of `chash` requeued by Slurm (same job id, restart count > 0): it resumes
    what the forced run trained instead of setting it aside again."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    return bool(job) and restarts not in ("", "0") and started.get("forced_by") == job and \
        started.get("config_hash") == chash  # fmt: skip


def supersede_stale(stage_dir: Path, chash: str, *, force: bool = False) -> None:
    """Mark the stage as started with `chash`, after setting aside the state of another config and bringing
    back this config's own state if it was set aside before (docs/ARCHITECTURE.md, "Resume and skip rules").

    `force`: the stage's current state is set aside even when it belongs to `chash`, and nothing is brought
    back, so training starts at step 0 (a preempted forced job, requeued under the same Slurm job id,
    resumes instead). Called on every rank after the config was checked and its objects built; only rank 0
    (by environment) moves files, before the trainer exists.
    """
    if env_rank() != 0:
        return
    marker = stage_dir / "STARTED"
    started = read_json(marker, strict=True) or {}
    owner = _checkpoints_owner(stage_dir, started.get("config_hash"))
    requeued = force and _requeued_forced_run(started, chash)
    if owner is not None and (owner != chash or (force and not requeued)):
        moved = set_aside(stage_dir, owner)
        if moved is not None:
            why = "force=true" if owner == chash else f"config changed ({owner[:12]} -> {chash[:12]})"
            print(f"[train] {stage_dir.name}: {why}; its checkpoints, DONE and metrics moved to {moved}", flush=True)
    if not force and owner != chash and (source := restore_superseded(stage_dir, chash)) is not None:
        print(f"[train] {stage_dir.name}: checkpoints of this config ({chash[:12]}) restored from {source}", flush=True)
    _unnest(stage_dir)
    if started.get("config_hash") != chash or (force and not requeued):
        job = os.environ.get("SLURM_JOB_ID") if force else None
        atomic_write_json(marker, {"config_hash": chash, **({"forced_by": job} if job else {})})
