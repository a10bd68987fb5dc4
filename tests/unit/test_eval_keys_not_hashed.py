"""No evaluation setting is part of a training stage's hash: re-evaluating with other settings
(`python -m pipeline.run experiment=fashion_mnist_quick sampler.num_steps=20`) must not retrain anything.

Each evaluation override goes through pipeline.run's forwarding (`accepted`: a stage receives the
overrides its config understands) and every training stage's hash (`stage_hash`, what its DONE marker
records) is compared with the hash without it. No stage is run; the run directory does not exist.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.builders import stage_hash
from pipeline.run import CONF, accepted, plan

EXPERIMENT = "experiment=fashion_mnist_quick"

# Every evaluation key of conf/evaluate.yaml (and its groups), each changed once (a tuple: on that option).
EVAL_OVERRIDES = [
    "sampler.num_steps=20", "sampler.eta=0.5", "sampler.spacing=trailing", "sampler.clip_x0=1.0", "sampler=ddpm",
    "guidance=classifier", "guidance=both", "guidance.scales=[1,2]", "guidance.rescale_phi=0.7",
    "guidance.negative=0", "guidance.caption_template='an image of a {}'", "guidance.name=other",
    ("guidance=both", "guidance.classifier_scales=[0,2]"), ("guidance=both", "guidance.pairing=paired"),
    ("guidance=classifier", "guidance.classifier_checkpoint=/x.ckpt"),
    "num_samples=150", "batch_size=75", "sample_seed=3", "grid_per_class=2", "sweep_name=other",
    "sweep_dir=/tmp/sweep", "sweep_index=1", "report_only=true", "device=cpu", "sampling_dtype=bf16",
    "progress=false", "progress_steps=true", "metrics.is_splits=5", "metrics.is_split_size=5000", "metrics.pr_k=5", "metrics.kid=true",
    "metrics.kid_subset_size=100", "metrics.feature_batch_size=64", "reference.split=val",
    "reference.cache_dir=/tmp/stats", "reference.stats=/x.npz", "distributed.gather_timeout_s=10", "distributed.poll_s=1",
    "model/features=inception", "model.features.checkpoint_path=/x.ckpt", "checkpoints.diffusion=/x.ckpt",
    "checkpoints.autoencoder=/x.ckpt", "perceptual_feature_net=/x.ckpt", "budget=quick",
    "job.name=other", "sampler=dpmpp_2m", ("sampler=dpmpp_2m", "sampler.final_sigmas_type=sigma_min"),
    "sweep.samplers=[ddim,dpmpp_2m]", "sweep.steps=[5,10]", "sweep.spacing=trailing", "sweep.best_scale_from=cfg",
]  # fmt: skip
# Top-level keys both roots have on purpose (not evaluation settings, or unhashed like tags and force).
# time_budget: the demo experiment's reference for pipeline.run (a run-only key, in both roots because the
# experiment file is global); stages see only its outcome, step_scale.
SHARED = {"paths", "data", "model", "logger", "experiment_name", "run_name", "seed", "tags", "force", "job",
          "time_budget"}  # fmt: skip


@pytest.fixture(scope="module")
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        yield
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def training(hydra_conf, tmp_path_factory):
    """(base overrides, the training steps of pipeline.run's DAG, their hashes without evaluation overrides)."""
    base = [EXPERIMENT, f"paths.root_dir={tmp_path_factory.mktemp('root')}"]
    steps = [s for s in plan(compose(config_name="run", overrides=accepted("run", [], base)), base)
             if s.entry == "pipeline.train"]  # fmt: skip
    assert {s.name for s in steps} >= {"autoencoder", "diffusion", "classifier"}
    return base, steps, {s.name: stage_hash(compose(config_name=s.root, overrides=s.argv)) for s in steps}


@pytest.mark.parametrize("override", EVAL_OVERRIDES, ids=str)
def test_an_evaluation_setting_changes_no_training_hash(training, override):
    base, steps, hashes = training
    overrides = [override] if isinstance(override, str) else list(override)
    assert accepted("evaluate", base, overrides) == overrides, f"{override}: not an evaluation setting"
    for step in steps:
        forwarded = accepted(step.root, step.argv, overrides)  # what pipeline.run would pass this stage
        if forwarded:
            cfg = compose(config_name=step.root, overrides=[*step.argv, *forwarded])
            assert stage_hash(cfg) == hashes[step.name], f"{override} changes the hash of stage {step.name}"


def test_the_reevaluation_command_line_reaches_only_the_evaluation(hydra_conf):
    """The issue's command, through plan(): sampler.num_steps=20 reaches both sweeps and no training stage."""
    argv = [EXPERIMENT, "sampler.num_steps=20"]
    steps = plan(compose(config_name="run", overrides=accepted("run", [], argv)), argv)
    for step in steps:
        assert ("sampler.num_steps=20" in step.overrides) == (step.entry == "pipeline.evaluate"), step.name


def test_every_evaluation_key_is_covered(hydra_conf):
    """A new evaluation key joins EVAL_OVERRIDES (or SHARED, when the training stages read it too)."""
    evaluate = set(compose(config_name="evaluate", overrides=[EXPERIMENT]))
    flat = [o for entry in EVAL_OVERRIDES for o in ([entry] if isinstance(entry, str) else entry)]
    covered = {o.split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] for o in flat}
    assert evaluate - SHARED - covered == set()
    assert SHARED <= set(compose(config_name="train", overrides=[EXPERIMENT, "stage=diffusion"]))


def test_the_two_samplers_are_separate_keys(hydra_conf):
    """The evaluation's `sampler` (evaluate.yaml) and the training grids' (stage.module.sampler) are two
    keys: a training config has no global `sampler`, and each demo experiment keeps its sizes."""
    for experiment in ("fashion_mnist_quick", "fashion_mnist_text"):
        train = compose(config_name="train", overrides=[f"experiment={experiment}", "stage=diffusion"])
        assert "sampler" not in train and train.stage.module.sampler.num_steps == 10
        assert train.stage.module.sampler._target_.endswith("DDIMSampler")
        sweep = compose(config_name="evaluate", overrides=[f"experiment={experiment}"])
        assert (sweep.num_samples, sweep.batch_size, sweep.sampler.num_steps) == (1000, 500, 10)
    assert compose(config_name="train", overrides=["stage=diffusion"]).stage.module.sampler.num_steps == 25
    ddpm = compose(config_name="train", overrides=["stage=diffusion", "sampler@stage.module.sampler=ddpm"])
    assert ddpm.stage.module.sampler._target_.endswith("DDPMSampler")
