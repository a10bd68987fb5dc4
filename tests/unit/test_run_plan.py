"""pipeline.run's plan: which steps run and which overrides each one receives (no stage is run)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pipeline.run import CONF, accepted, plan


def planned(argv: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        cfg = compose(config_name="run", overrides=accepted("run", [], argv))
        return {s.name: s.overrides for s in plan(cfg, argv)}


def test_an_override_of_a_stage_not_run_now_is_accepted_and_not_forwarded():
    """The same command line re-runs a subset: evaluation settings with stages=[autoencoder, diffusion]
    are valid (they belong to a stage of the DAG) and reach neither of the two stages."""
    steps = planned(["stages=[autoencoder,diffusion]", "num_samples=150", "guidance.scales=[1,3]",
                     "model.autoencoder.ch=24", "trainer.max_steps=5"])  # fmt: skip
    assert list(steps) == ["autoencoder", "diffusion"]
    assert steps["autoencoder"] == ["model.autoencoder.ch=24", "trainer.max_steps=5"]
    assert steps["diffusion"] == ["trainer.max_steps=5"]  # the autoencoder's width is not the U-Net's


def test_an_override_no_stage_understands_is_an_error():
    with pytest.raises(ValueError, match=r"no stage understands the override\(s\) \['trainer.max_stepz=3'\]"):
        planned(["stages=[diffusion]", "trainer.max_stepz=3"])


def test_experiment_stage_list_and_command_line_subset():
    assert list(planned(["experiment=imagenet256_ldm"])) == [
        "prepare", "autoencoder", "diffusion", "classifier", "evaluate", "evaluate_classifier"]  # fmt: skip
    assert list(planned(["experiment=imagenet256_ldm", "stages=[diffusion]"])) == ["diffusion"]


def test_callback_overrides_reach_the_stages_that_have_the_callback():
    steps = planned(["stages=[autoencoder,diffusion,classifier]", "callbacks.sample_grids.per_row=2",
                     "callbacks.reconstruction_fid=null"])  # fmt: skip
    assert steps["diffusion"] == ["callbacks.sample_grids.per_row=2"]
    assert steps["autoencoder"] == ["callbacks.reconstruction_fid=null"] and steps["classifier"] == []
    steps = planned(["stages=[feature_net_eval,classifier]", "callbacks=none"])
    assert steps == {"feature_net_eval": ["callbacks=none"], "classifier": ["callbacks=none"]}
