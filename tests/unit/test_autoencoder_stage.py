"""The autoencoder stage's LightningModule on a tiny in-memory dataset (no shards): optimisers, GAN gating,
config errors, NaN stops, latent statistics, checkpoints; and its callbacks (reconstruction grid, rFID)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from core.images import to_uint8_nhwc
from eval.callbacks import ReconstructionFID, ReconstructionGrid
from eval.metrics import fid_from_features
from lightning_modules.artifacts import (
    StageMismatchError,
    feature_net_artifacts,
    load_autoencoder,
    save_artifact,
)
from lightning_modules.autoencoder import (
    AutoencoderModule,
    check_precision,
    domain_perceptual,
    latent_moments,
    scale_from_moments,
)
from lightning_modules.base import NonFiniteLossError
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.discriminator import PatchDiscriminator
from lightning_modules.nets.feature_net import FeatureNet
from lightning_modules.nets.vae_loss import AutoencoderLoss

SIZE, KL_WEIGHT = 16, 1e-6


class TinyImages(pl.LightningDataModule):
    """24 fixed random images (1, 16, 16) in [-1, 1] as dict batches, with the WebDataModule's attributes."""

    def __init__(self, image_size: int = SIZE, channels: int = 1, n: int = 24, batch_size: int = 4) -> None:
        super().__init__()
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, channels, image_size, image_size, generator=g) * 2 - 1

    def _loader(self, shuffle: bool) -> DataLoader:
        collate = lambda rows: {"image": torch.stack([r[0] for r in rows]), "label": torch.zeros(len(rows)).long()}  # noqa: E731
        return DataLoader(TensorDataset(self.images), batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(shuffle=True)

    def eval_dataloader(self, split: str) -> DataLoader:
        return self._loader(shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")


def feature_net_ckpt(path: Path, role: str) -> Path:
    torch.manual_seed(1)
    net = FeatureNet(in_channels=1, num_classes=3, widths=(4, 8))
    return save_artifact(path, "feature_net", feature_net_artifacts(net, role))


def make_module(disc_start: int = 100, perceptual_ckpt: Path | None = None, **kw) -> AutoencoderModule:
    torch.manual_seed(0)
    return AutoencoderModule(
        autoencoder=AutoencoderKL(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=2),
        discriminator=PatchDiscriminator(in_channels=1, ndf=8, n_layers=2),
        loss=functools.partial(AutoencoderLoss, kl_weight=KL_WEIGHT, disc_start=disc_start),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)),
        disc_optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)),
        **{"perceptual": functools.partial(domain_perceptual, str(perceptual_ckpt)) if perceptual_ckpt else None,
           "latent_stats_samples": 20, **kw},
    )


def make_trainer(tmp_path: Path, max_steps: int, callbacks=(), **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                      default_root_dir=str(tmp_path), callbacks=list(callbacks),
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                      **{"limit_test_batches": 1, **kw})  # fmt: skip


class Recorder(Callback):
    """Per training batch: the logged train/* values and a copy of the discriminator's weights."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []
        self.disc: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logs.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.disc.append({k: v.clone() for k, v in pl_module.discriminator.state_dict().items()})


# --- optimisers ------------------------------------------------------------------------------------


def test_logvar_is_in_the_generator_optimizer_and_is_trained(tmp_path):
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=1)
    init = module.loss.logvar.detach().clone()
    trainer.fit(module, datamodule=TinyImages())
    opt_g, opt_d = trainer.optimizers
    in_g = [p for group in opt_g.param_groups for p in group["params"]]
    in_d = [p for group in opt_d.param_groups for p in group["params"]]
    assert any(p is module.loss.logvar for p in in_g)
    assert not any(p is module.loss.logvar for p in in_d)
    assert len(in_g) == len(list(module.autoencoder.parameters())) + 1
    assert all(group["betas"] == (0.5, 0.9) for opt in (opt_g, opt_d) for group in opt.param_groups)
    # Adam's first step moves every parameter with a non-zero gradient by about lr.
    assert abs(module.loss.logvar.item() - init.item()) == pytest.approx(1e-3, rel=0.05)


def test_gan_term_is_zero_before_disc_start_and_steps_count_batches(tmp_path):
    rec = Recorder()
    module = make_module(disc_start=2)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[rec])
    d0 = {k: v.clone() for k, v in module.discriminator.state_dict().items()}
    trainer.fit(module, datamodule=TinyImages())
    assert trainer.global_step == 4 and len(rec.logs) == 4  # discriminator steps do not count as steps
    for step, logs in enumerate(rec.logs):
        nll_kl = logs["train/nll"] + KL_WEIGHT * logs["train/kl"]
        if step < 2:
            assert logs["train/disc_factor"] == 0 and logs["train/g_loss"] == 0 and logs["train/d_weight"] == 0
            assert logs["train/loss"] == pytest.approx(nll_kl, rel=1e-6)
            assert all(torch.equal(rec.disc[step][k], d0[k]) for k in d0)  # no discriminator update yet
            assert "train/d_loss" not in logs
        else:
            assert logs["train/disc_factor"] == 1 and logs["train/d_weight"] > 0
            expected = nll_kl + logs["train/d_weight"] * logs["train/g_loss"]
            assert logs["train/loss"] == pytest.approx(expected, rel=1e-5)
            assert not all(torch.equal(rec.disc[step][k], rec.disc[step - 1][k]) for k in d0)


# --- config errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "64-true"])
def test_unsupported_precision_is_refused(precision):
    with pytest.raises(ValueError, match="trainer.precision"):
        check_precision(precision)
    check_precision("bf16-mixed")
    check_precision("32-true")


def test_fp16_refused_through_the_trainer(tmp_path):
    module = make_module()
    module.training_step = lambda *a: pytest.fail("training ran")  # type: ignore[method-assign]
    # On CPU, Trainer(precision="16-mixed") silently becomes bf16; the plugin keeps fp16 as a GPU run would.
    trainer = make_trainer(tmp_path, max_steps=1, plugins=[MixedPrecision("16-mixed", "cpu")])
    assert trainer.precision == "16-mixed"
    with pytest.raises(ValueError, match=r"trainer\.precision='16-mixed'"):
        trainer.fit(module, datamodule=TinyImages())


@pytest.mark.parametrize(
    "dm_kwargs,keys",
    [({"image_size": 17}, "data.image_size=17.*model.autoencoder.ch_mult"),
     ({"channels": 3}, "data.channels=3.*model.autoencoder.in_channels=1"),
     ({"image_size": 6}, "data.image_size=6 is too small for model.discriminator.n_layers")],  # fmt: skip
)
def test_data_mismatch_is_a_config_error_before_compute(tmp_path, dm_kwargs, keys):
    module = make_module()
    module.autoencoder.forward = lambda *a, **k: pytest.fail("computed before the check")  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=keys):
        make_trainer(tmp_path, max_steps=1).fit(module, datamodule=TinyImages(**dm_kwargs))


def test_eval_role_feature_net_is_refused(tmp_path):
    with pytest.raises(StageMismatchError, match="role 'eval'.*needs role 'perceptual'"):
        domain_perceptual(str(feature_net_ckpt(tmp_path / "fn.ckpt", "eval")))


def test_perceptual_factory_not_called_when_weight_is_zero():
    def missing_weights():
        raise FileNotFoundError("set `model.perceptual.vgg_weights_path`")

    assert make_module(perceptual_weight=0.0, perceptual=missing_weights).loss.perceptual is None
    with pytest.raises(FileNotFoundError, match="model.perceptual.vgg_weights_path"):
        make_module(perceptual_weight=1.0, perceptual=missing_weights)


# --- NaN stop, checkpoints without the frozen nets, resume -----------------------------------------


def test_nan_stops_naming_step_and_term_and_keeps_last_ckpt(tmp_path):
    fn = feature_net_ckpt(tmp_path / "fn.ckpt", "perceptual")
    module = make_module(perceptual_ckpt=fn)
    original = module.loss.generator_loss

    def poisoned(inputs, recons, posterior, global_step, *args):
        loss, logs = original(inputs, recons, posterior, global_step, *args)
        if global_step == 3:
            logs["kl"] = torch.tensor(float("nan"))
        return loss, logs

    module.loss.generator_loss = poisoned  # type: ignore[method-assign]
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[ckpt_cb])
    with pytest.raises(NonFiniteLossError, match=r"step 3.*'kl': nan"):
        trainer.fit(module, datamodule=TinyImages())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    # The frozen perceptual net is re-loaded from its own file, never stored here (nor any rFID net).
    assert not [k for k in last["state_dict"] if k.startswith(("loss.perceptual.", "rfid_net."))]
    assert "loss.logvar" in last["state_dict"] and last["stage"] == "autoencoder"
    # ... and a resume from that checkpoint loads strictly and finishes.
    resumed = make_module(perceptual_ckpt=fn)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(resumed, datamodule=TinyImages(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 4


# --- latent statistics and the exported autoencoder --------------------------------------------------


def test_scale_from_moments_matches_torch_std():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5, 2, 3, 3, generator=g) * 3 + 1 for _ in range(3)]

    class Fixed:
        def __init__(self, z):
            self.z = z

        def sample(self, generator=None):
            return self.z

    moments = latent_moments(Fixed, chunks, max_samples=12, generator=g)
    used = torch.cat(chunks)[:12].double()
    stats = scale_from_moments(moments)
    assert stats["num_images"] == 12
    assert stats["std"] == pytest.approx(float(used.std()), rel=1e-12)
    assert stats["scale_factor"] == pytest.approx(1 / float(used.std()), rel=1e-12)
    assert stats["mean"] == pytest.approx(float(used.mean()), rel=1e-12)


def test_latent_scale_factor_and_bit_exact_reload(tmp_path):
    module = make_module(ema_decay=0.9, stats_seed=5, latent_stats_samples=10)
    dm = TinyImages()
    # one epoch: validation runs at its end
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[ReconstructionGrid()])
    trainer.fit(module, datamodule=dm)
    # By hand: posterior samples of the first 10 training images, same noise seed, exported (EMA) weights.
    ema = module.ema.shadow
    assert not torch.equal(ema.decoder.conv_out.weight, module.autoencoder.decoder.conv_out.weight)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        z = torch.cat([ema.encode(x).sample(generator=gen) for x in dm.images[:10].split(4)])
    assert module.latent_stats["scale_factor"] == pytest.approx(1 / float(z.double().std()), rel=1e-9)
    assert module.latent_stats["num_images"] == 10
    assert (tmp_path / "latent_stats.json").exists() and (tmp_path / "samples" / "recon_step6.png").exists()

    path = tmp_path / "final.ckpt"
    trainer.save_checkpoint(path)
    ae, scale, _ = load_autoencoder(path)
    assert scale == module.latent_stats["scale_factor"]
    x = dm.images[:4]
    with torch.no_grad():
        post_ref, post = ema.encode(x), ae.encode(x)
        assert torch.equal(post.mean, post_ref.mean) and torch.equal(post.logvar, post_ref.logvar)
        assert torch.equal(ae.decode(post.mean), ema.decode(post_ref.mean))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["latent_shape"] == [2, 8, 8] and ckpt["image_shape"] == [1, 16, 16]


def test_eval_metrics_are_float32_whatever_the_training_precision(tmp_path):
    # Under bf16 autocast SSIM's windowed variances (E[x^2] - E[x]^2) lose most of their digits: a bf16-mixed
    # run reported SSIM 0.86 for weights that score 0.92 in float32. Same weights, both precisions, same numbers.
    fn = feature_net_ckpt(tmp_path / "fn.ckpt", "perceptual")
    module = make_module(perceptual_ckpt=fn)
    dm = TinyImages(batch_size=8)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        trainer = make_trainer(tmp_path / precision, max_steps=1, precision=precision,
                               callbacks=[ReconstructionFID(str(fn))])  # fmt: skip
        results[precision] = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert set(results["32-true"]) == {"test/psnr", "test/ssim", "test/l1", "test/rfid"}
    for key, value in results["32-true"].items():
        assert results["bf16-mixed"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# --- callbacks -------------------------------------------------------------------------------------


def test_reconstruction_grid_is_inputs_over_reconstructions(tmp_path):
    module = make_module()
    dm = TinyImages(batch_size=4)
    grid = ReconstructionGrid(num_images=3, dirpath=str(tmp_path / "grids"))
    make_trainer(tmp_path, max_steps=1, callbacks=[grid], limit_train_batches=1).fit(module, datamodule=dm)
    path = tmp_path / "grids" / "recon_step1.png"
    image = np.asarray(Image.open(path))
    # 2 rows x 3 tiles of 16 px with 2 px padding: inputs on top, their reconstructions below.
    assert image.shape[:2] == (2 + 2 * 18, 2 + 3 * 18) and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    x = dm.images[:4]  # the first validation batch
    with torch.no_grad():
        recons = module(x).clamp(-1, 1)
    tiles = to_uint8_nhwc(torch.cat([x[:3], recons[:3]]))
    for i, tile in enumerate(tiles):
        top, left = 2 + (i // 3) * 18, 2 + (i % 3) * 18
        np.testing.assert_array_equal(image[top : top + 16, left : left + 16].reshape(16, 16, -1)[..., :1], tile)


def test_reconstruction_fid_is_fid_of_the_feature_net_over_the_split(tmp_path):
    fn = feature_net_ckpt(tmp_path / "fn.ckpt", "perceptual")
    module = make_module()
    dm = TinyImages(batch_size=12)  # two batches: the whole split, every row gathered
    trainer = make_trainer(tmp_path, max_steps=1, limit_test_batches=2, callbacks=[ReconstructionFID(str(fn))])
    got = trainer.test(module, datamodule=dm, verbose=False)[0]["test/rfid"]
    net = FeatureNet(in_channels=1, num_classes=3, widths=(4, 8))
    net.load_state_dict(torch.load(fn, weights_only=False)["feature_net_state_dict"])
    net.eval()
    with torch.no_grad():
        feats = [net(torch.cat([x, module(x).clamp(-1, 1)]))["pooled"].chunk(2) for x in dm.images.split(12)]
    real, fake = torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats])
    assert got == pytest.approx(fid_from_features(real, fake), rel=1e-4)
    assert trainer.callback_metrics["test/rfid"] == pytest.approx(got)  # where metrics.json reads it from


def test_reconstruction_fid_refuses_the_eval_net_and_other_channels(tmp_path):
    with pytest.raises(StageMismatchError, match="role 'eval'.*needs role 'perceptual'"):
        ReconstructionFID(str(feature_net_ckpt(tmp_path / "eval.ckpt", "eval")))
    assert ReconstructionFID(None).features is None  # checkpoint null: no rFID
    rfid = ReconstructionFID(str(feature_net_ckpt(tmp_path / "fn.ckpt", "perceptual")))
    module = make_module()
    module.autoencoder.forward = lambda *a, **k: pytest.fail("computed before the check")  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"data.channels=3 but .*callbacks.reconstruction_fid.checkpoint.* takes 1"):
        make_trainer(tmp_path, max_steps=1, callbacks=[rfid]).test(module, datamodule=TinyImages(channels=3))


def test_reconstruction_grid_goes_to_wandb_under_its_key(tmp_path, monkeypatch):
    import types

    import eval.callbacks.media as media

    class FakeWandb:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def log_image(self, **kw) -> None:
            self.calls.append(kw)

    monkeypatch.setattr(media, "WandbLogger", FakeWandb)
    wandb, csv = FakeWandb(), object()
    trainer = types.SimpleNamespace(loggers=[csv, wandb], global_step=5, default_root_dir=str(tmp_path))
    path = ReconstructionGrid(num_images=2).save(trainer, torch.zeros(4, 1, 8, 8), torch.ones(4, 1, 8, 8))
    assert path == tmp_path / "samples" / "recon_step5.png"
    assert wandb.calls == [{"key": "val/reconstructions", "images": [str(path)], "step": 5,
                            "caption": ["top: inputs, bottom: reconstructions"]}]  # fmt: skip
