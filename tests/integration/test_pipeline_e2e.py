"""The whole pipeline through `pipeline.run` on tiny real data: every stage, the evaluation artefacts,
W&B run groups; a changed upstream re-runs what depends on it (slow); the Slurm chain of all stages (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.integration.test_local_slurm import cluster  # noqa: F401

RUN = "default/fashion_mnist"
STAGES = "stages=[feature_net_perceptual,feature_net_eval,autoencoder,diffusion,classifier,evaluate]"
TINY_EVAL = ["num_samples=150", "batch_size=75", "guidance.scales=[1,3]", "sampler.num_steps=4"]
TINY_GRIDS = ["stage.module.sampler.num_steps=4"]  # the diffusion stage's training grids (a training key)


@pytest.fixture(scope="module")
def pipeline_run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = [STAGES, "debug=limit", "logger=wandb", f"paths.data_dir={tiny_data}", f"paths.runs_dir={runs}", *TINY_EVAL,
            *TINY_GRIDS]
    out = run_cli("pipeline.run", *args, timeout=1800)
    return runs / RUN, args, out


def test_every_stage_done_and_evaluation_artefacts(pipeline_run):
    run, _, out = pipeline_run
    for stage in ("feature_net_perceptual", "feature_net_eval", "autoencoder", "diffusion", "classifier"):
        assert (run / stage / "DONE").exists() and (run / stage / "checkpoints" / "final.ckpt").exists(), stage
    sweep = run / "eval" / "cfg"
    for setting in ("cfg_s1", "cfg_s3"):
        npz = np.load(sweep / setting / "samples.npz")
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (150, 32, 32, 1)
        assert npz["arr_1"].shape == (150,)
        assert set(json.loads((sweep / setting / "metrics.json").read_text())) >= {"fid", "is_mean", "precision", "recall"}
    assert (sweep / "report.md").exists() and list((sweep / "plots").glob("*.png"))
    assert "report:" in out.stdout and "total" in out.stdout
    assert json.loads((run / "autoencoder" / "DONE").read_text())["upstream"]["feature_net_perceptual"]


def test_wandb_runs_share_the_group_and_carry_metrics(pipeline_run):
    run, _, _ = pipeline_run
    offline = list((run / "wandb").glob("offline-run-*"))
    blobs = {p.name: b"".join(f.read_bytes() for f in p.glob("*.wandb")) for p in offline}
    assert len(blobs) >= 5
    for name, blob in blobs.items():
        assert b"default/fashion_mnist" in blob, name  # group = <experiment>/<run_name>
    joined = b"".join(blobs.values())
    for job_type in (b"feature_net_eval", b"autoencoder", b"diffusion", b"classifier"):
        assert job_type in joined
    for metric in (b"train/loss", b"val/psnr", b"test/acc"):
        assert metric in joined, metric


def test_rerun_skips_everything(pipeline_run):
    run, args, _ = pipeline_run
    out = run_cli("pipeline.run", *args)
    for stage in ("feature_net_perceptual", "feature_net_eval", "autoencoder", "diffusion", "classifier"):
        assert f"{stage}: done" in out.stdout, out.stdout[-3000:]


@pytest.mark.slow
def test_changed_upstream_reruns_downstream(pipeline_run):
    run, args, _ = pipeline_run
    args = [a for a in args if not a.startswith("stages=")]
    out = run_cli("pipeline.run", "stages=[autoencoder,diffusion]", *args, "model.autoencoder.ch=24", timeout=1800)
    assert "autoencoder: running (config changed)" in out.stdout
    assert "diffusion: running (upstream autoencoder changed)" in out.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_whole_chain_on_slurm_with_ddp(cluster, tiny_data, tmp_path):  # noqa: F811
    out = run_cli("pipeline.run", STAGES, "debug=fdr", "logger=csv", "launcher=slurm", "launcher.wait=true",
                  "launcher.ntasks_per_node=2", "launcher.cpus_per_task=1", "trainer=ddp_cpu",
                  f"paths.data_dir={tiny_data}", f"paths.runs_dir={tmp_path}", *TINY_EVAL, *TINY_GRIDS,
                  timeout=3000)  # fmt: skip
    # 5 training stages and the sweep's report job; the sweep itself is an array job of 2 settings.
    assert out.stdout.count("submitted job") == 6 and "evaluate_report: submitted job" in out.stdout
    assert "evaluate: submitted array job" in out.stdout and "(2 sweep settings" in out.stdout
    assert (tmp_path / RUN / "eval" / "cfg" / "report.md").exists()
