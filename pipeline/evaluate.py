"""`python -m pipeline.evaluate [guidance=cfg|classifier|both] [sweep_index=i] [report_only=true] ...`

A guidance sweep scored with FID / IS / precision-recall / class accuracy; the logic is in `eval/` (settings,
checks, generator, job, samples, scoring, sweep_report, wandb_log).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from core.dist import dist_env
from datamodules.shards import manifest_hash
from eval.checks import check_data_compatible
from eval.features import reference_statistics
from eval.generator import SampleGenerator
from eval.job import SweepJob
from eval.metrics import check_sample_count
from eval.scoring import Scorer, real_image_batches
from eval.settings import expand_settings, select_setting
from eval.sweep_report import collect_rows, format_table, write_sweep_report
from eval.wandb_log import log_to_wandb
from lightning_modules.artifacts import check_eval_feature_net, load_classifier, load_diffusion
from pipeline.common import save_config, scrub_secrets


def sweep_settings(g: DictConfig) -> list:
    """The settings of the `guidance` config. A kind's file holds only the keys it reads (cfg: no
    classifier_scales/pairing; classifier: no scales/pairing/rescale_phi/negative): the rest default."""
    return expand_settings(g.kind, g.get("scales"), g.get("classifier_scales"), g.get("pairing", "grid"),
                           g.get("rescale_phi", 0.0), g.get("negative"))  # fmt: skip


def build_job(cfg: DictConfig, rank: int, world: int, local_rank: int) -> SweepJob:
    """Every check and every load before any sampling: settings, checkpoints, data, scoring net, counts."""
    g = cfg.guidance
    settings = sweep_settings(g)
    if cfg.sweep_index is not None:
        settings = [select_setting(settings, cfg.sweep_index)]
    needs_classifier = any(s.cls_scale for s in settings)
    if needs_classifier and not g.get("classifier_checkpoint"):
        raise ValueError("classifier guidance (s_cls != 0) needs guidance.classifier_checkpoint=<final.ckpt>")
    device = cfg.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    diffusion = load_diffusion(cfg.checkpoints.diffusion, cfg.checkpoints.autoencoder)
    classifier = load_classifier(g.classifier_checkpoint, diffusion=diffusion) if needs_classifier else None
    dm = instantiate(cfg.data.datamodule)
    check_data_compatible(diffusion, dm.channels, dm.image_size, dm.num_classes)
    if cfg.model.features.get("checkpoint_path"):
        check_eval_feature_net(cfg.model.features.checkpoint_path, cfg.perceptual_feature_net)
    extractor = instantiate(cfg.model.features).to(device)
    check_sample_count(cfg.num_samples, extractor.feature_dim)
    check_sample_count(dm.num_samples(cfg.reference.split), extractor.feature_dim)
    generator = SampleGenerator(
        diffusion, instantiate(cfg.sampler), classifier=classifier, class_names=dm.class_names,
        caption_template=g.caption_template, device=device, dtype=cfg.sampling_dtype,
        progress_steps=cfg.progress_steps,
    )  # fmt: skip
    return SweepJob(
        out_dir=Path(cfg.sweep_dir), settings=settings, generator=generator,
        scorer=build_scorer(cfg, extractor, dm, diffusion.num_classes, world, device) if rank == 0 else None,
        num_samples=cfg.num_samples, num_classes=diffusion.num_classes, batch_size=cfg.batch_size,
        sample_seed=cfg.sample_seed, class_names=dm.class_names, grid_per_class=cfg.grid_per_class,
        rank=rank, world=world, gather_timeout_s=cfg.distributed.gather_timeout_s,
        poll_s=cfg.distributed.poll_s, progress=cfg.progress, force=cfg.force,
    )  # fmt: skip


def build_scorer(cfg: DictConfig, extractor, datamodule, num_classes: int, world: int, device: str) -> Scorer:
    """The scorer with the real split's reference statistics (computed once, cached by manifest + weights)."""
    data_hash = manifest_hash(datamodule.manifest)
    real = real_image_batches(datamodule, cfg.reference.split, world)
    m = cfg.metrics
    reference = reference_statistics(
        extractor, real, cfg.reference.cache_dir, data_hash, m.feature_batch_size, progress=cfg.progress
    )
    return Scorer(
        extractor, reference, data_hash, num_classes, is_splits=m.is_splits, pr_k=m.pr_k, kid=m.kid,
        kid_subset_size=m.kid_subset_size, batch_size=m.feature_batch_size, device=device,
    )  # fmt: skip


def log_wandb(cfg: DictConfig, rows: list[dict], outputs: dict) -> None:
    """Log to W&B when `logger` has a wandb entry; offline without an API key (as the training stages).
    The run is named by the logger config (`job` of evaluate.yaml: <run_name>-eval-<sweep>)."""
    lcfg = (cfg.get("logger") or {}).get("wandb")
    if lcfg is None:
        return
    from pipeline.builders import wandb_run_id

    offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "online"
    run_id = wandb_run_id(cfg.paths.run_dir, f"eval/{cfg.sweep_name}", "")  # a re-run continues this run
    run_dir = log_to_wandb(
        rows, outputs, run_dir=cfg.paths.run_dir, run_id=run_id, project=lcfg.project, group=lcfg.group,
        name=scrub_secrets(lcfg.name), entity=lcfg.entity, tags=scrub_secrets(list(lcfg.tags or [])),
        config=scrub_secrets(OmegaConf.to_container(cfg, resolve=True)), offline=offline,
        settings=OmegaConf.to_container(lcfg.settings) if lcfg.get("settings") else None,
    )  # fmt: skip
    print(f"[evaluate] W&B ({'offline' if offline else 'online'}): {run_dir}")


def evaluate(cfg: DictConfig) -> list[dict]:
    """Run (or with report_only, merge) the sweep; rank 0 writes results + report.md and returns the rows."""
    start = time.time()
    sweep_dir = Path(cfg.sweep_dir)
    rank, world, local_rank = dist_env()
    sweep_hash = None
    if not cfg.report_only:
        job = build_job(cfg, rank, world, local_rank)
        if rank == 0:
            save_config(cfg, sweep_dir / "config.yaml")
        job.run()
        if rank != 0:
            return []
        sweep_hash = job.sweep_hash()
    elif rank != 0:
        return []
    rows = collect_rows(sweep_dir, sweep_hash)
    if not rows:
        print(f"[evaluate] no finished settings in {sweep_dir}")
    meta = {"dataset": cfg.data.name, "sweep": str(sweep_dir), "guidance": cfg.guidance.kind,
            "samples per setting": ", ".join(sorted({str(r.get("num_samples")) for r in rows})),
            "sampler": ", ".join(sorted({f"{r.get('sampler')}, {r.get('num_steps')} steps" for r in rows})),
            "ranks": world, "wall time of this run (s)": round(time.time() - start, 1)}  # fmt: skip
    outputs = write_sweep_report(sweep_dir, rows, f"Guidance sweep `{cfg.sweep_name}` ({cfg.run_name})", meta)
    print(format_table(rows))
    print(f"[evaluate] report: {outputs['report']}")
    if cfg.sweep_index is None or cfg.report_only:
        log_wandb(cfg, rows, outputs)  # array tasks leave W&B to the final report_only job
    return rows


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
