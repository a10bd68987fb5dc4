"""`python -m pipeline.prepare data=fashion_mnist`: sources -> WebDataset shards + manifest.json.

`data=imagefolder` streams a folder of class folders into shards (`num_workers=N` writer processes,
resumable); `data=webdataset` takes existing shards as they are and writes only the manifest.

`launcher=slurm` submits the same work as sbatch jobs instead (`pipeline.slurm_chain.submit_prepare`): an
array of `launcher.prepare_tasks` tasks, task i running `shard_task=i shard_tasks=N` (a contiguous range of
the planned shards, no manifest), then one job after them (afterok) with `manifest_only=true` that checks
every shard's record and writes the manifest. Every process plans the same shards from the config and the
source listing (`datamodules.shards.plan_dataset`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from core.machine import usable_cpus
from datamodules.shard_scan import scan_shards
from datamodules.shards import (
    DatasetPlan,
    existing_manifest,
    plan_dataset,
    prepare_dataset,
    recorded_shards,
    shard_range,
    verify_shards,
    write_manifest,
    write_shards,
)
from pipeline.config_checks import PREPARE_RULES, check_config

log = logging.getLogger(__name__)


def prepare_config(cfg: DictConfig) -> dict:
    """What makes the shards (recorded in the manifest; its hash decides whether they are reused)."""
    # Resolve against the whole config: `data.source` interpolates `${data.channels}` etc., which a copy
    # of the node in a fresh config could not resolve (the InterpolationKeyError of issue 14).
    resolved = OmegaConf.to_container(cfg.data, resolve=True)
    if is_scan(cfg):
        return {"source": resolved["source"], "val_shards": resolved["val_shards"],
                "test_shards": resolved["test_shards"]}  # fmt: skip
    return {
        "source": resolved["source"],
        "val_size": resolved["val_size"],
        "test_size": resolved["test_size"],
        "limit": cfg.limit,
        "seed": resolved["seed"],
        "shard_size": resolved["shard_size"],
        "caption_templates": resolved["caption_templates"],
    }


def is_scan(cfg: DictConfig) -> bool:
    """data=webdataset: existing shards, a manifest by scanning them (nothing to split over tasks)."""
    return cfg.data.get("prepare", "write") == "scan"


def dataset_plan(cfg: DictConfig) -> DatasetPlan:
    """The shards this config writes; the source is built (a bad path fails here) and listed, nothing written."""
    data = cfg.data
    return plan_dataset(instantiate(data.source), data.dir, name=data.name, config=prepare_config(cfg),
                        val_size=data.val_size, test_size=data.test_size, limit=cfg.limit, seed=data.seed,
                        shard_size=data.shard_size, caption_templates=list(data.caption_templates))  # fmt: skip


def writers(cfg: DictConfig) -> int:
    """`num_workers`: a count, or `auto`, the CPUs this process may use (`core.machine.usable_cpus`: in a
    Slurm job, its allocation)."""
    return usable_cpus() if cfg.num_workers == "auto" else int(cfg.num_workers)


def prepare(cfg: DictConfig, overrides: list[str] | None = None) -> dict | None:
    """Run the prepare `cfg` asks for; the manifest, or None for an array task or a Slurm submission.
    `overrides` (the command line) are what the Slurm jobs get, less the launcher's."""
    data = cfg.data
    check_config(cfg, PREPARE_RULES, str(data.dir))
    if cfg.launcher.name == "slurm":
        from pipeline.slurm_chain import submit_prepare

        submit_prepare(cfg, [o for o in overrides or [] if not o.lstrip("+~").startswith("launcher")])
        return None
    config = prepare_config(cfg)
    if is_scan(cfg):
        manifest = scan_shards(config["source"]["root"], data.dir, name=data.name, config=config,
                               val_shards=data.val_shards, test_shards=data.test_shards, force=cfg.force,
                               progress=cfg.progress)  # fmt: skip
        return _report(manifest, data)
    if cfg.shard_task is not None or cfg.manifest_only:
        old = existing_manifest(data.dir, config, cfg.force)
        if old is not None:  # finished earlier: the manifest job verifies the shards, the tasks have nothing to do
            if cfg.manifest_only:
                verify_shards(data.dir, old, progress=cfg.progress)
            print(f"[prepare] {data.name}: complete at {data.dir}, nothing to write", flush=True)
            return _report(old, data) if cfg.manifest_only else None
        plan = dataset_plan(cfg)
        if cfg.manifest_only:
            return _report(write_manifest(plan, recorded_shards(plan)), data)
        return _write_task(cfg, plan)
    manifest = prepare_dataset(
        instantiate(data.source),
        data.dir,
        name=data.name,
        config=config,
        val_size=data.val_size,
        test_size=data.test_size,
        limit=cfg.limit,
        seed=data.seed,
        shard_size=data.shard_size,
        caption_templates=list(data.caption_templates),
        force=cfg.force,
        progress=cfg.progress,
        num_workers=writers(cfg),
    )
    return _report(manifest, data)


def _write_task(cfg: DictConfig, plan: DatasetPlan) -> None:
    """Array task `shard_task` of `shard_tasks`: write its range of the planned shards (with their
    `.progress` records; verified ones of an earlier run are kept), and no manifest."""
    mine = shard_range(plan.shards, int(cfg.shard_task), int(cfg.shard_tasks))
    if cfg.force:  # the old manifest goes first, so it never lists a half-rewritten shard
        (Path(plan.out_dir) / "manifest.json").unlink(missing_ok=True)
    entries = write_shards(plan, mine, num_workers=writers(cfg), resume=not cfg.force, progress=cfg.progress)
    span = f"{mine[0].name} .. {mine[-1].name}" if mine else "none"
    print(f"[prepare] shard task {cfg.shard_task} of {cfg.shard_tasks}: {len(entries)} of {len(plan.shards)} "
          f"shard(s) ({span}), {sum(e['num_samples'] for e in entries.values())} samples -> {plan.out_dir}",
          flush=True)  # fmt: skip


def _report(manifest: dict, data: DictConfig) -> dict:
    counts = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    log.info("dataset %s at %s: %s", data.name, data.dir, counts)
    print(f"[prepare] {data.name}: {counts} -> {data.dir}")
    return manifest


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    prepare(cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
