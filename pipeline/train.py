"""`python -m pipeline.train stage=<name> [experiment=...] [trainer=...] [debug=...]`: one stage."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig

from core.io import atomic_write_json
from core.processes import forget_parent_services
from pipeline.builders import (
    TrainTime,
    build_trainer,
    stage_hash,
    supersede_stale,
    upstream_dirs,
)
from pipeline.checkpoints import resume_checkpoint
from pipeline.common import finished, read_done, save_config, write_done
from pipeline.config_checks import TRAIN_RULES, ConfigError, build_or_explain, check_config, check_trainer
from pipeline.placeholders import substitute_missing_upstream
from pipeline.preemption import Preempted, requeue_job

log = logging.getLogger(__name__)


def done_already(cfg: DictConfig, stage_dir: Path, chash: str) -> dict | None:
    """The stage's DONE marker when it was written for `chash` and `force` is off (said on stdout), else None."""
    done = None if cfg.force else finished(stage_dir, chash)
    if done:
        print(f"[train] {cfg.stage.dir_name}: done with this config ({chash[:12]}), skipping: {stage_dir}")
    return done


def train(cfg: DictConfig) -> dict:
    """Train one stage into `cfg.stage.dir`, resuming if it was interrupted, skipping if it is done.

    Validate first, then touch (docs/ARCHITECTURE.md, "Resume and skip rules"): the config's values are
    checked, the datamodule, the module and the trainer are built, and only then are the files of another
    config (or, with `force=true`, of this one) set aside and this config's own earlier state brought back.
    """
    stage_dir = Path(cfg.stage.dir)
    check_config(cfg, TRAIN_RULES, where=str(stage_dir))
    placeholders = substitute_missing_upstream(cfg)  # debug=fdr only: random-init stand-ins for missing upstreams
    chash = stage_hash(cfg)
    if done := done_already(cfg, stage_dir, chash):
        return done
    pl.seed_everything(cfg.stage.seed, workers=True)
    datamodule = build_or_explain(cfg.data.datamodule, "data.datamodule", str(stage_dir))
    module = build_or_explain(cfg.stage.module, "stage.module", str(stage_dir))
    check_trainer(cfg, str(stage_dir))
    supersede_stale(stage_dir, chash, force=cfg.force)
    if done := done_already(cfg, stage_dir, chash):
        return done
    module.nonfinite_tolerance = int(cfg.nonfinite_tolerance)  # the non-finite guard (lightning_modules/base.py)
    trainer = build_trainer(cfg, stage_dir, chash)
    if trainer.is_global_zero:
        save_config(cfg, stage_dir / "config.yaml")
    ckpt = resume_checkpoint(stage_dir, cfg.stage.dir_name)
    if ckpt:
        print(f"[train] {cfg.stage.dir_name}: resuming from {ckpt}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    except Preempted as stop:  # Slurm's signal: every rank saved at one step; no test, no DONE
        if trainer.is_global_zero:
            requeue_job()
        return {"config_hash": chash, "preempted": str(stop.checkpoint)}
    if cfg.stage.test:
        trainer.test(module, datamodule=datamodule)
    trainer.save_checkpoint(stage_dir / "checkpoints" / "final.ckpt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics["time/train_s"] = next(cb.seconds for cb in trainer.callbacks if isinstance(cb, TrainTime))
    if trainer.is_global_zero:
        atomic_write_json(stage_dir / "metrics.json", metrics)
        upstream = {name: (read_done(path) or {}).get("config_hash") for name, path in upstream_dirs(cfg).items()}
        write_done(stage_dir, chash, stage=cfg.stage.name, global_step=trainer.global_step, metrics=metrics,
                   upstream=upstream, **({"fdr_placeholders": sorted(placeholders)} if placeholders else {}))  # fmt: skip
        print(f"[train] {cfg.stage.dir_name}: done -> {stage_dir}\n{json.dumps(metrics, indent=1)}")
    return {"config_hash": chash, "metrics": metrics}


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    forget_parent_services()  # this stage logs through a W&B service of its own, not its caller's
    try:
        train(cfg)
    except ConfigError as e:  # the user's mistake, said without a traceback; nothing was touched
        raise SystemExit(f"[train] {e}") from None
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """Close a W&B run this process opened, now rather than in W&B's atexit hook (as lightning-hydra-template
    does): the offline `.wandb` file is complete when the command returns, also on a loaded machine."""
    wandb = sys.modules.get("wandb")  # never imported here when logger != wandb
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


if __name__ == "__main__":
    main()
