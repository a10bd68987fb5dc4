"""Stage classifier through the real CLI, on top of tiny upstream checkpoints written by the stages' own
writers (`tests/tiny_checkpoints.py`); then the artefact loader, its refusals, DDP on CPU, and the
classifier-guidance benchmark script. The classifier on upstream stages trained through the CLI is
tests/integration/test_pipeline_e2e.py's chain."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from lightning_modules.artifacts import StageMismatchError, load_classifier, load_diffusion, state_fingerprint
from tests.conftest import REPO, cli_env, run_cli, tiny_overrides
from tests.tiny_checkpoints import write_autoencoder, write_upstream_run


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> dict:
    """A run directory whose upstream stages (autoencoder, diffusion, eval feature net) are done: tiny
    random-weight checkpoints, not four more CLI trainings (test_pipeline_e2e trains the real chain)."""
    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "default" / "fashion_mnist"
    write_upstream_run(run_dir)
    return {
        "data": tiny_data,
        "runs": runs,
        "dir": run_dir,
        "diffusion": run_dir / "diffusion/checkpoints/final.ckpt",
    }


def classifier_cli(run: dict, *extra: str, **kw) -> subprocess.CompletedProcess:
    return run_cli(
        "pipeline.train", "stage=classifier", *extra, *tiny_overrides(run["data"], run["runs"]), **kw
    )


def test_fast_dev_run_exports_a_loadable_classifier(run):
    classifier_cli(run, "debug=fdr")
    stage = run["dir"] / "classifier"
    final = stage / "checkpoints" / "final.ckpt"
    assert (stage / "DONE").exists() and final.exists()
    for png in ("accuracy_vs_t.png", "test_accuracy_vs_t.png"):
        assert (stage / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "classifier"
    assert not [k for k in ckpt["state_dict"] if "autoencoder" in k]  # the frozen autoencoder is not saved
    bundle = load_diffusion(run["diffusion"])
    assert ckpt["schedule"] == bundle.schedule.to_dict() and ckpt["latent_shape"] == list(bundle.latent_shape)
    clf = load_classifier(final, diffusion=bundle)
    assert state_fingerprint(clf.state_dict()) == state_fingerprint(ckpt["classifier_state_dict"])
    z = torch.randn(3, *bundle.latent_shape)
    assert clf(z, torch.tensor([0, 5, bundle.schedule.num_timesteps - 1])).shape == (3, bundle.num_classes)

    # A classifier trained for another schedule / latent shape / autoencoder is refused, naming both sides.
    other_schedule = dataclasses.replace(bundle.schedule, num_timesteps=bundle.schedule.num_timesteps // 2)
    for change, message in [
        (
            {"schedule": other_schedule},
            r"noise schedule .*\(classifier\) vs .*'num_timesteps': \d+.*\(diffusion\)",
        ),
        (
            {"latent_shape": (4, 16, 16)},
            r"latent shape \[4, 8, 8\] \(classifier\) vs \[4, 16, 16\] \(diffusion\)",
        ),
        ({"autoencoder_fingerprint": "0" * 64}, r"autoencoder weights \w+ \(classifier\) vs 000000000000"),
        ({"num_classes": 7}, r"number of classes 10 \(classifier\) vs 7 \(diffusion\)"),
    ]:
        with pytest.raises(StageMismatchError, match=message):
            load_classifier(final, diffusion=dataclasses.replace(bundle, **change))


def test_ddp_cpu_two_processes(run):
    classifier_cli(run, "trainer=ddp_cpu", "debug=limit", "stage.dir_name=classifier_ddp", timeout=900)
    stage = run["dir"] / "classifier_ddp"
    done = json.loads((stage / "DONE").read_text())
    assert done["global_step"] == 6
    assert "test/acc" in done["metrics"] and any(k.startswith("test/acc_bucket") for k in done["metrics"])
    columns = set(next(csv.reader(open(stage / "csv" / "metrics.csv"))))
    for key in ("train/loss", "train/acc", "val/acc", "val/loss"):
        assert key in columns, key
    assert any(c.startswith("val/acc_bucket") for c in columns) and any(
        c.startswith("train/acc_bucket") for c in columns
    )
    # EMA on: the exported weights are the EMA copy, which after 6 steps differs from the trained net.
    ckpt = torch.load(stage / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    ema = {
        k.removeprefix("ema.shadow."): v for k, v in ckpt["state_dict"].items() if k.startswith("ema.shadow.")
    }
    net = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert (
        state_fingerprint(ckpt["classifier_state_dict"]) == state_fingerprint(ema) != state_fingerprint(net)
    )


def test_other_autoencoder_than_the_diffusion_stage_used_is_refused(run, tmp_path):
    other, _ = write_autoencoder(tmp_path / "other_ae.ckpt", seed=7)
    proc = classifier_cli(run, "debug=fdr", f"stage.module.autoencoder_checkpoint={other}",
                          "stage.dir_name=classifier_bad", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "is not the one diffusion checkpoint" in proc.stdout + proc.stderr


def bench(run_dir, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "bench" / "classifier_guidance.py"), "--run-dir", str(run_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_guidance_benchmark_runs_on_the_run_dir(run):
    if not (run["dir"] / "classifier" / "DONE").exists():
        classifier_cli(run, "debug=fdr")
    out = run["dir"] / "bench_out"
    proc = bench(run["dir"], "--num-samples", "10", "--batch-size", "5", "--steps", "2", "--scales", "0", "3",
                 "--out", str(out))  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["s_cls"] for r in rows] == [0.0, 3.0] and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert "s_cls   3.00   accuracy" in proc.stdout
    assert (out / "grid_scls3.png").exists()
    # combined with classifier-free guidance, on the DDPM sampler
    proc = bench(run["dir"], "--num-samples", "4", "--steps", "2", "--scales", "1", "--sampler", "ddpm",
                 "--cfg-scale", "2")  # fmt: skip
    assert "classifier-free scale 2" in proc.stdout and "s_cls   1.00   accuracy" in proc.stdout
