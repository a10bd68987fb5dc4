"""`python -m pipeline.evaluate [guidance=cfg|classifier|both] [sweep.samplers=[ddim,dpmpp_2m]]
[sweep.steps=[5,10,20,50]] [sweep_index=i] [report_only=true] ...`

A guidance sweep (optionally crossed with samplers and step counts) scored with FID / IS /
precision-recall / class accuracy; the logic is in `eval/` (settings, sampler_sweep, checks, generator,
job, samples, scoring, sweep_report, wandb_log).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from core.dist import exact_dist_env
from core.io import read_json
from core.processes import forget_parent_services
from datamodules.shards import manifest_hash
from eval.checks import check_data_compatible
from eval.features import load_reference_batch, reference_key, reference_statistics
from eval.generator import SampleGenerator
from eval.job import SweepJob
from eval.metrics import check_sample_count
from eval.report import best_row
from eval.sampler_sweep import SweepSetting, cross_settings, step_counts
from eval.scoring import Scorer, real_image_batches
from eval.settings import expand_settings, select_setting
from eval.sweep_report import collect_rows, format_table, write_sweep_report
from eval.wandb_log import log_to_wandb
from lightning_modules.artifacts import check_eval_feature_net, load_classifier, load_diffusion
from pipeline.common import save_config, scrub_secrets
from pipeline.config_checks import EVALUATE_RULES, ConfigError, check_config
from pipeline.resolvers import sampling_dtype

CONF = Path(__file__).resolve().parents[1] / "conf"


def sweep_settings(g: DictConfig) -> list:
    """The settings of the `guidance` config. A kind's file holds only the keys it reads (cfg: no
    classifier_scales/pairing; classifier: no scales/pairing/rescale_phi/negative): the rest default."""
    return expand_settings(g.kind, g.get("scales"), g.get("classifier_scales"), g.get("pairing", "grid"),
                           g.get("rescale_phi", 0.0), g.get("negative"))  # fmt: skip


def _best_scales(cfg: DictConfig, for_count: bool) -> dict[str, list[float]]:
    """`sweep.best_scale_from=<sweep name>`: the guidance scales of that sweep's lowest-FID row (its
    results.json under ${paths.run_dir}/eval/), as guidance overrides; {} when unset. `for_count`: only the
    number of settings is wanted (a Slurm array sized before that sweep ran): a placeholder scale."""
    source = (cfg.get("sweep") or {}).get("best_scale_from")
    if not source:
        return {}
    if for_count:
        return {"scales": [1.0], "classifier_scales": [0.0]}
    path = Path(cfg.paths.run_dir) / "eval" / str(source) / "results.json"
    best = best_row(read_json(path) or [], "fid")
    if best is None:
        raise ValueError(
            f"sweep.best_scale_from={source}: {path} holds no finished setting with an FID; run that sweep "
            f"first (python -m pipeline.evaluate guidance.name={source} ...) or give the scales instead "
            f"(sweep.best_scale_from=null guidance.scales=[3])"
        )
    scales = {"scales": best.get("cfg_scale"), "classifier_scales": best.get("cls_scale")}
    return {key: [float(v)] for key, v in scales.items() if v is not None}


def _sampler_config(name: str) -> DictConfig:
    path = CONF / "sampler" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))
        raise ValueError(f"sweep.samplers: no sampler config {name!r} ({path}); expected some of {options}")
    return OmegaConf.load(path)


def sampler_chains(cfg: DictConfig) -> list[tuple[str, object]] | None:
    """The (config name, sampler) chains of a sampler sweep, sampler-major then by step count; None when
    neither `sweep.samplers` nor `sweep.steps` is set (the `sampler` config draws every setting).
    `sweep.samplers`: names of conf/sampler/ files (null: the `sampler` config, named by its class);
    `sweep.steps`: the step counts each runs at (null: each config's num_steps); `sweep.spacing`: one
    timestep spacing for all (null: each config's)."""
    sweep = cfg.get("sweep") or {}
    steps = step_counts(OmegaConf.to_container(sweep.steps) if sweep.get("steps") is not None else None)
    names = sweep.get("samplers")
    if names is None and steps is None:
        return None
    if names is not None and (isinstance(names, str) or not len(names)):
        raise ValueError(f"sweep.samplers must be a non-empty list of conf/sampler names, got {names!r}")
    configs = {str(n): _sampler_config(str(n)) for n in names} if names is not None else {
        cfg.sampler._target_.rsplit(".", 1)[-1]: cfg.sampler}  # fmt: skip
    if len(configs) != len(names or [None]):
        raise ValueError(f"sweep.samplers names a sampler twice: {list(names)}")
    chains = []
    for name, sampler_cfg in configs.items():
        for n in steps or [sampler_cfg.num_steps]:
            chain_cfg = OmegaConf.merge(sampler_cfg, {"num_steps": n})
            if sweep.get("spacing") is not None:
                chain_cfg.spacing = sweep.spacing
            chains.append((name, instantiate(chain_cfg)))
    return chains


def sweep_points(cfg: DictConfig, for_count: bool = False) -> list[SweepSetting]:
    """Every setting of the evaluation: the guidance settings (at `sweep.best_scale_from`'s scales when
    set), each drawn by every sampler chain of `sampler_chains` (or by the `sampler` config alone)."""
    guidance = OmegaConf.to_container(cfg.guidance, resolve=True)
    g = OmegaConf.create({**guidance, **_best_scales(cfg, for_count)})
    return cross_settings(sweep_settings(g), sampler_chains(cfg))


def build_job(cfg: DictConfig, rank: int, world: int, local_rank: int) -> SweepJob:
    """Every check and every load before any sampling: settings, checkpoints, data, scoring net, counts."""
    g = cfg.guidance
    settings = sweep_points(cfg)
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
    if not cfg.reference.get("stats"):
        check_sample_count(dm.num_samples(cfg.reference.split), extractor.feature_dim)
    generator = SampleGenerator(
        diffusion, instantiate(cfg.sampler), classifier=classifier, class_names=dm.class_names,
        caption_template=g.caption_template, device=device, dtype=sampling_dtype(cfg.sampling_dtype, device),
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
    """The scorer with the reference statistics: a guided-diffusion reference batch (`reference.stats`), or the
    real split's (computed once, cached by everything that changes them: `eval.features.reference_key` and
    the extractor's weights)."""
    data_hash = manifest_hash(datamodule.manifest)
    m = cfg.metrics
    if cfg.reference.get("stats"):
        reference = load_reference_batch(cfg.reference.stats, extractor, cfg.reference.cache_dir,
                                         m.feature_batch_size, progress=cfg.progress)  # fmt: skip
    else:
        real = real_image_batches(datamodule, cfg.reference.split, world)
        key = reference_key(datamodule, cfg.reference.split)
        reference = reference_statistics(
            extractor, real, cfg.reference.cache_dir, key, m.feature_batch_size, progress=cfg.progress
        )
    return Scorer(
        extractor, reference, data_hash, num_classes, is_splits=m.is_splits,
        is_split_size=m.get("is_split_size"), pr_k=m.pr_k, kid=m.kid, kid_subset_size=m.kid_subset_size,
        batch_size=m.feature_batch_size, device=device,
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
    check_config(cfg, EVALUATE_RULES, where=str(sweep_dir))
    rank, world, local_rank = exact_dist_env()
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
    if (cfg.get("sweep") or {}).get("best_scale_from"):
        meta["guidance scales from"] = f"the lowest-FID setting of sweep `{cfg.sweep.best_scale_from}`"
    outputs = write_sweep_report(sweep_dir, rows, f"Guidance sweep `{cfg.sweep_name}` ({cfg.run_name})", meta)
    print(format_table(rows))
    print(f"[evaluate] report: {outputs['report']}")
    if cfg.sweep_index is None or cfg.report_only:
        log_wandb(cfg, rows, outputs)  # array tasks leave W&B to the final report_only job
    return rows


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    forget_parent_services()  # this job logs through a W&B service of its own, not its caller's
    try:
        evaluate(cfg)
    except ConfigError as e:  # the user's mistake, said without a traceback; nothing was touched
        raise SystemExit(f"[evaluate] {e}") from None


if __name__ == "__main__":
    main()
