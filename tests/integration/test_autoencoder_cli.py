"""Stage autoencoder through the real CLI: fast_dev_run, 2-process DDP past disc_start, a short run that
learns, bit-exact reload of final.ckpt, and the clear error for LPIPS without weights."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_modules.artifacts import load_autoencoder
from lightning_modules.nets.autoencoder import AutoencoderKL
from tests.conftest import run_cli, tiny_overrides

RUN = Path("default/fashion_mnist")
PERCEPTUAL_DIR = "feature_net_perceptual"


@pytest.fixture(scope="module")
def perceptual_net(tiny_data, tmp_path_factory) -> Path:
    """A feature_net stage dir trained (fast_dev_run) with stage.role=perceptual."""
    runs = tmp_path_factory.mktemp("perceptual_runs")
    run_cli("pipeline.train", "stage=feature_net", "stage.role=perceptual", "debug=fdr", *tiny_overrides(tiny_data, runs))
    return runs / RUN / PERCEPTUAL_DIR


def train_autoencoder(tiny_data, runs: Path, perceptual_net: Path, *overrides: str, **kw):
    shutil.copytree(perceptual_net, runs / RUN / PERCEPTUAL_DIR, dirs_exist_ok=True)
    return run_cli("pipeline.train", "stage=autoencoder", *tiny_overrides(tiny_data, runs), *overrides, **kw)


def csv_rows(stage: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(stage / "csv" / "metrics.csv")))


def test_fast_dev_run_writes_the_contract_and_reloads_bit_exactly(tiny_data, tmp_path, perceptual_net):
    train_autoencoder(tiny_data, tmp_path, perceptual_net, "debug=fdr")
    stage = tmp_path / RUN / "autoencoder"
    assert (stage / "DONE").exists() and (stage / "samples" / "recon_step1.png").exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    assert {"test/psnr", "test/ssim", "test/rfid"} <= set(metrics)
    stats = json.loads((stage / "latent_stats.json").read_text())

    path = stage / "checkpoints" / "final.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["stage"] == "autoencoder" and ckpt["latent_shape"] == [4, 8, 8] and ckpt["image_shape"] == [1, 32, 32]
    assert ckpt["latent_scale_factor"] == stats["scale_factor"] > 0
    assert not [k for k in ckpt["state_dict"] if k.startswith(("loss.perceptual.", "rfid_net."))]
    # The loader's autoencoder computes exactly what the trained module's weights compute.
    ae, scale, _ = load_autoencoder(path)
    ref = AutoencoderKL(**ckpt["autoencoder_hparams"]).eval()
    ref.load_state_dict({k.removeprefix("autoencoder."): v for k, v in ckpt["state_dict"].items()
                         if k.startswith("autoencoder.")})  # fmt: skip
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post, post_ref = ae.encode(x), ref.encode(x)
        assert torch.equal(post.mean, post_ref.mean) and torch.equal(post.logvar, post_ref.logvar)
        assert torch.equal(ae.decode(post.mean), ref.decode(post.mean))
    assert scale == stats["scale_factor"]


def test_ddp_cpu_past_disc_start_with_one_scale_factor(tiny_data, tmp_path, perceptual_net):
    train_autoencoder(tiny_data, tmp_path, perceptual_net, "trainer=ddp_cpu", "debug=limit",
                      "stage.module.loss.disc_start=2", timeout=900)  # fmt: skip
    stage = tmp_path / RUN / "autoencoder"
    done = json.loads((stage / "DONE").read_text())
    assert done["global_step"] == 6  # one step per batch: discriminator updates are not counted
    steps_with_d = sorted(int(r["step"]) for r in csv_rows(stage) if r.get("train/d_loss"))
    assert steps_with_d and min(steps_with_d) == 2, steps_with_d
    stats = json.loads((stage / "latent_stats.json").read_text())
    assert len(stats["per_rank_scale_factor"]) == 2
    assert stats["per_rank_scale_factor"][0] == stats["per_rank_scale_factor"][1] == stats["scale_factor"]
    assert stats["num_images"] == 256  # each rank encoded its own shards of the 256 training images
    ckpt = torch.load(stage / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["latent_scale_factor"] == stats["scale_factor"]


def test_short_run_lowers_reconstruction_loss(tiny_data, tmp_path, perceptual_net):
    train_autoencoder(tiny_data, tmp_path, perceptual_net, "debug=limit", "trainer.max_steps=40",
                      "data.train_batches_per_epoch=20", "stage.module.loss.disc_start=1000")  # fmt: skip
    rows = csv_rows(tmp_path / RUN / "autoencoder")
    rows = sorted((r for r in rows if r.get("train/rec")), key=lambda r: int(r["step"]))
    assert len(rows) == 40
    for term in ("train/l1", "train/rec"):  # L1 alone, and L1 + perceptual distance (an untrained net: ~1)
        values = [float(r[term]) for r in rows]
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < 0.75 * first, (term, first, last)


def test_lpips_vgg_without_weights_is_a_clear_error(tiny_data, tmp_path):
    out = run_cli("pipeline.train", "stage=autoencoder", "debug=fdr", "model/perceptual=lpips_vgg",
                  "model.perceptual.vgg_weights_path=/nonexistent/vgg16-397923af.pth",
                  "model.perceptual.lpips_weights_path=/nonexistent/vgg.pth",
                  *tiny_overrides(tiny_data, tmp_path), check=False)  # fmt: skip
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "model.perceptual.vgg_weights_path" in text and "nothing is downloaded" in text, text[-3000:]
