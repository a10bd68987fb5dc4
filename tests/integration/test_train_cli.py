"""The training entry point through the real CLI: fast_dev_run, DDP on CPU, kill + resume, W&B offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from tests.conftest import REPO, SMALL_DIFFUSION, cli_env, run_cli, tiny_overrides

STAGE_DIR = "default/fashion_mnist/feature_net_eval"


def test_feature_net_fast_dev_run(tiny_data, tmp_path):
    out = run_cli("pipeline.train", "stage=feature_net", "debug=fdr", *tiny_overrides(tiny_data, tmp_path))
    stage = tmp_path / STAGE_DIR
    assert (stage / "checkpoints" / "final.ckpt").exists() and (stage / "DONE").exists()
    assert (stage / "config.yaml").exists()
    ckpt = torch.load(stage / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "feature_net" and "feature_net_state_dict" in ckpt
    # a second run with the same config is skipped
    again = run_cli("pipeline.train", "stage=feature_net", "debug=fdr", *tiny_overrides(tiny_data, tmp_path))
    assert "skipping" in again.stdout, out.stdout[-2000:]


def test_feature_net_ddp_cpu_two_processes(tiny_data, tmp_path):
    run_cli("pipeline.train", "stage=feature_net", "trainer=ddp_cpu", "debug=limit",
            *tiny_overrides(tiny_data, tmp_path), timeout=900)  # fmt: skip
    done = json.loads((tmp_path / STAGE_DIR / "DONE").read_text())
    assert done["global_step"] == 6
    assert "test/acc" in done["metrics"]


def test_killed_run_resumes_from_last_ckpt(tiny_data, tmp_path):
    args = ["stage=feature_net", "debug=limit", "trainer.max_steps=400", "data.train_batches_per_epoch=1000",
            "stage.checkpoint_every_n_steps=5", *tiny_overrides(tiny_data, tmp_path)]  # fmt: skip
    last = tmp_path / STAGE_DIR / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), "no checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < step_at_kill < 400
    assert not (tmp_path / STAGE_DIR / "DONE").exists()
    out = run_cli("pipeline.train", *args)
    assert "resuming from" in out.stdout
    done = json.loads((tmp_path / STAGE_DIR / "DONE").read_text())
    assert done["global_step"] == 400
    # the resumed run logged no step before the checkpoint it resumed from
    import csv

    rows = list(csv.DictReader(open(tmp_path / STAGE_DIR / "csv" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps and min(steps) >= step_at_kill - 1


def test_wandb_offline_run_holds_metrics(tiny_data, tmp_path, ended_wandb_service, monkeypatch):
    # Started from a process that had used W&B and has ended: the stage logs through a service of its own
    # (with its caller's, W&B failed to connect; on Slurm, a requeued stage found its run ID "in use").
    monkeypatch.setenv("WANDB_SERVICE", ended_wandb_service)
    run_cli("pipeline.train", "stage=feature_net", "debug=limit", f"paths.data_dir={tiny_data}",
            f"paths.runs_dir={tmp_path}", "logger=wandb")  # fmt: skip
    runs = list((tmp_path / "default" / "fashion_mnist" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"train/loss", b"val/acc", b"test/acc", b"feature_net_eval"):
        assert key in blob, key
    assert b"WANDB_API_KEY" not in blob


def test_fdr_stages_run_without_their_upstream_stages(tiny_data, tmp_path):
    """debug=fdr smoke-tests a stage on its own: a missing upstream artifact is replaced by a random-init one
    built from the config (the real writers), named on stdout, and the upstream stage is never marked done."""
    from lightning_modules.artifacts import load_autoencoder, load_diffusion

    run = tmp_path / "default" / "fashion_mnist"
    out = run_cli("pipeline.train", "stage=diffusion", "debug=fdr", *SMALL_DIFFUSION, *tiny_overrides(tiny_data, tmp_path))
    placeholder = run / "diffusion" / "fdr_placeholders" / "autoencoder" / "checkpoints" / "final.ckpt"
    assert f"debug=fdr: upstream autoencoder has no {run / 'autoencoder' / 'checkpoints' / 'final.ckpt'}" in out.stdout
    assert f"randomly initialised autoencoder built from its config instead: {placeholder}" in out.stdout
    ae, _, fingerprint = load_autoencoder(placeholder)
    assert ae.hparams()["ch"] == 16  # conf/model/autoencoder/kl_f4.yaml
    diffusion_final = run / "diffusion" / "checkpoints" / "final.ckpt"
    assert load_diffusion(diffusion_final).autoencoder_fingerprint == fingerprint
    assert json.loads((run / "diffusion" / "DONE").read_text())["fdr_placeholders"] == ["autoencoder"]
    assert not (run / "autoencoder").exists()

    # classifier: the autoencoder is missing, so the diffusion model (trained on another one) is replaced too
    out = run_cli("pipeline.train", "stage=classifier", "debug=fdr", *tiny_overrides(tiny_data, tmp_path))
    assert "debug=fdr: upstream autoencoder has no" in out.stdout
    assert "debug=fdr: upstream diffusion was trained on the real autoencoder, which is replaced" in out.stdout
    done = json.loads((run / "classifier" / "DONE").read_text())
    assert done["fdr_placeholders"] == ["autoencoder", "diffusion"] and done["global_step"] == 1
    assert torch.load(run / "classifier" / "checkpoints" / "final.ckpt", weights_only=True)["stage"] == "classifier"
    assert not (run / "autoencoder").exists() and (run / "diffusion" / "DONE").exists()

    # autoencoder: its perceptual net (named by model.perceptual.checkpoint_path too) is a placeholder
    out = run_cli("pipeline.train", "stage=autoencoder", "debug=fdr", *tiny_overrides(tiny_data, tmp_path))
    placeholder = run / "autoencoder" / "fdr_placeholders" / "feature_net_perceptual" / "checkpoints" / "final.ckpt"
    assert f"randomly initialised feature_net_perceptual built from its config instead: {placeholder}" in out.stdout
    assert (run / "autoencoder" / "DONE").exists() and not (run / "feature_net_perceptual").exists()
