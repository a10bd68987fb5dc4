"""Stage diffusion through the real CLI: fast_dev_run with class and text conditioning, 2-process DDP on
CPU, and a resume that restores the EMA weights exactly. The upstream autoencoder is a tiny random-weight
checkpoint written by the stage's own writer (`tests/tiny_checkpoints.py`); the diffusion stage on an
autoencoder trained through the CLI is tests/integration/test_pipeline_e2e.py's chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.artifacts import load_diffusion
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import DDIMSampler
from lightning_modules.generation import GuidanceSetting, generate
from tests.conftest import SMALL_DIFFUSION, run_cli, tiny_overrides
from tests.tiny_checkpoints import write_autoencoder

RUN = Path("default") / "fashion_mnist"
SMALL_GRIDS = (*SMALL_DIFFUSION, "callbacks.sample_grids.max_rows=3")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Path:
    """A runs dir holding the autoencoder the diffusion stage needs (tiny, random weights)."""
    runs = tmp_path_factory.mktemp("runs")
    write_autoencoder(runs / RUN / "autoencoder" / "checkpoints" / "final.ckpt")
    return runs


def train_diffusion(tiny_data: Path, runs: Path, name: str, *extra: str, timeout: int = 600):
    return run_cli("pipeline.train", "stage=diffusion", f"stage.dir_name={name}", *SMALL_GRIDS,
                   *tiny_overrides(tiny_data, runs), *extra, timeout=timeout)  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def check_bundle_samples(ckpt_path: Path, condition) -> None:
    bundle = load_diffusion(ckpt_path)
    x = torch.randn(len(condition), *bundle.latent_shape)
    with torch.no_grad():
        out = bundle.unet(x, torch.full((len(condition),), 500), *bundle.conditioner(condition))
    assert out.shape == x.shape and torch.isfinite(out).all()
    codec = LatentCodec.of(bundle)
    images = generate(bundle.unet, codec, bundle.conditioner, GuidanceSetting("cfg", cfg_scale=3.0),
                      DDIMSampler(num_steps=2), bundle.schedule, bundle.prediction_type, condition,
                      list(range(len(condition))), latent_shape=bundle.latent_shape)  # fmt: skip
    assert images.dtype == np.uint8 and images.shape[:3] == (len(condition), 32, 32)


@pytest.mark.parametrize("conditioner", ["class", "text"])
def test_fast_dev_run(tiny_data, runs, conditioner):
    """Class conditioning trains from cached latents (encoded once by prepare_data), text on the fly."""
    name = f"diffusion_fdr_{conditioner}"
    cache = "stage.cache_latents=" + str(conditioner == "class").lower()
    out = train_diffusion(tiny_data, runs, name, "debug=fdr", f"model/conditioner={conditioner}", cache)
    log = out.stdout + out.stderr
    assert "in eval mode at the start of training" not in log  # EMA/frozen nets are eval on purpose
    assert "command is available on your system but is not used" not in log  # the srun hint, if Slurm is here
    stage = runs / RUN / name
    assert (stage / "latents" / "manifest.json").exists() == (conditioner == "class")
    done = json.loads((stage / "DONE").read_text())
    assert {"train/loss", "val/loss", "val/loss_bucket0", "val/loss_bucket9"} <= set(done["metrics"])
    assert sorted(p.name for p in (stage / "samples").glob("*.png")) == ["step1_s1.png", "step1_s3.png"]
    ckpt = load(stage / "checkpoints" / "final.ckpt")
    assert ckpt["stage"] == "diffusion" and ckpt["latent_shape"] == [4, 8, 8]
    assert not any(k.startswith(("autoencoder.", "_autoencoder")) for k in ckpt["state_dict"])
    if conditioner == "text":
        assert ckpt["conditioner"]["target"].endswith("TextConditioner")
        assert not any(k.startswith("conditioner.") for k in ckpt["state_dict"])  # frozen MiniLM not copied
        check_bundle_samples(stage / "checkpoints" / "final.ckpt", ["a photo of a bag", ""])
    else:
        check_bundle_samples(stage / "checkpoints" / "final.ckpt", torch.tensor([0, 9]))


@pytest.mark.slow
def test_ddp_cpu_two_processes(tiny_data, runs):
    # with the latent cache: each rank encodes half of the shards in setup, then both stream it
    train_diffusion(tiny_data, runs, "diffusion_ddp", "trainer=ddp_cpu", "debug=limit", "stage.cache_latents=true",
                    timeout=900)  # fmt: skip
    stage = runs / RUN / "diffusion_ddp"
    assert (stage / "latents" / "manifest.json").exists()
    done = json.loads((stage / "DONE").read_text())
    assert done["global_step"] == 6 and "val/loss" in done["metrics"]
    ckpt = load(stage / "checkpoints" / "final.ckpt")
    assert int(ckpt["state_dict"]["ema.num_updates"]) == 6
    # rank 0 alone wrote the end-of-training grids
    assert sorted(p.name for p in (stage / "samples").glob("*.png")) == ["step6_s1.png", "step6_s3.png"]


def test_resume_restores_ema_exactly(tiny_data, runs):
    pytest.importorskip("wandb")
    args = ("debug=limit", "callbacks.sample_grids.every_n_steps=0", "logger=wandb")
    train_diffusion(tiny_data, runs, "diffusion_resume", *args)
    stage = runs / RUN / "diffusion_resume"
    # the end-of-training grids went to W&B (offline) as well as to PNG files
    assert sorted(p.name for p in (stage / "samples").glob("*.png")) == ["step6_s1.png", "step6_s3.png"]
    wandb_runs = list((runs / RUN / "wandb").glob("offline-run-*"))
    blob = b"".join(p.read_bytes() for r in wandb_runs for p in r.glob("*.wandb"))
    for key in (b"samples/scale_1", b"samples/scale_3", b"val/loss_bucket9", b"train/lr"):
        assert key in blob, key
    last = load(stage / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and int(last["state_dict"]["ema.num_updates"]) == 6
    # Run again as if killed after the last checkpoint, before DONE: it resumes from last.ckpt (already at
    # max_steps, so no step is taken) and writes final.ckpt from the restored state; a fresh EMA would differ.
    (stage / "DONE").unlink()
    out = train_diffusion(tiny_data, runs, "diffusion_resume", *args)
    assert "resuming from" in out.stdout
    final = load(stage / "checkpoints" / "final.ckpt")
    ema_keys = [k for k in last["state_dict"] if k.startswith(("ema.", "conditioner_ema."))]
    assert len(ema_keys) > 10
    for key in ema_keys:
        assert torch.equal(final["state_dict"][key], last["state_dict"][key]), key
    for key, value in last["unet_state_dict"].items():
        assert torch.equal(final["unet_state_dict"][key], value), key
    # ... and the EMA is not simply the live weights
    assert not torch.equal(final["state_dict"]["ema.shadow.out.2.weight"], final["state_dict"]["unet.out.2.weight"])
