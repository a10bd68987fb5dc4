"""Improved DDPM through the real CLI: experiment=fashion_mnist_iddpm trains the diffusion stage with the
learned-range variance and the hybrid loss under debug=fdr (its upstream replaced by fdr placeholders), the
checkpoint records the variance type, and `pipeline.evaluate sampler=iddpm` samples that checkpoint with the
learned variance; the same sampler on a fixed-variance checkpoint is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules.artifacts import load_diffusion
from tests import tiny_checkpoints as tiny
from tests.conftest import run_cli, tiny_overrides

EXPERIMENT = ["experiment=fashion_mnist_iddpm"]
RUN = Path("fashion_mnist_iddpm") / "fashion_mnist"
# 40 samples per setting: above the tiny feature net's 16 feature dimensions (FID's minimum is 17).
SMALL = ["num_samples=40", "batch_size=20", "sampler.num_steps=3", "grid_per_class=2", "progress=false",
         "guidance.scales=[3]"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """The diffusion stage of experiment=fashion_mnist_iddpm trained under debug=fdr; returns the runs dir."""
    runs = tmp_path_factory.mktemp("runs")
    run_cli("pipeline.train", "stage=diffusion", "debug=fdr", *EXPERIMENT, "callbacks=none",
            *tiny_overrides(tiny_data, runs))  # fmt: skip
    return runs


def test_stage_trains_with_the_hybrid_loss_and_records_the_variance(trained):
    stage = trained / RUN / "diffusion"
    done = json.loads((stage / "DONE").read_text())
    assert {"train/loss", "val/loss"} <= set(done["metrics"])
    ckpt = torch.load(stage / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["variance_type"] == "learned_range"
    assert ckpt["unet_hparams"]["out_channels"] == 2 * ckpt["latent_shape"][0]
    assert ckpt["hyper_parameters"]["variance_type"] == "learned_range"
    bundle = load_diffusion(stage / "checkpoints" / "final.ckpt")
    assert bundle.variance_type == "learned_range"


def test_evaluation_samples_with_the_learned_variance(tiny_data, trained):
    tiny.write_feature_net(trained / RUN / "feature_net_eval" / "checkpoints" / "final.ckpt")
    run_cli("pipeline.evaluate", *EXPERIMENT, "sampler=iddpm", "sweep_name=iddpm", "logger=none",
            *tiny_overrides(tiny_data, trained), *SMALL)  # fmt: skip
    metrics = json.loads((trained / RUN / "eval" / "iddpm" / "cfg_s3" / "metrics.json").read_text())
    assert metrics["sampler"] == "IDDPMSampler" and metrics["num_steps"] == 3
    assert metrics["fid"] == metrics["fid"]  # a number, not NaN


def test_iddpm_sampler_refuses_a_fixed_variance_checkpoint(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    tiny.write_upstream_run(runs / "default" / "fashion_mnist")
    out = run_cli("pipeline.evaluate", "sampler=iddpm", "sweep_name=refused", "logger=none",
                  *tiny_overrides(tiny_data, runs), *SMALL, check=False)  # fmt: skip
    assert out.returncode != 0
    assert "IDDPMSampler needs a learned-variance model" in out.stdout + out.stderr
    assert not (runs / "default" / "fashion_mnist" / "eval" / "refused" / "cfg_s3").exists()
