"""Stage classifier: t/noise sampling, per-bucket metrics, label checks, EMA, LR anneal, upstream checks;
the accuracy-vs-t plot callback."""

from __future__ import annotations

import functools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from eval.callbacks import AccuracyVsTimestepPlot, plot_accuracy_vs_t
from lightning_modules.artifacts import StageMismatchError, state_fingerprint
from lightning_modules.classifier_module import (
    BucketedAccuracy,
    ClassifierModule,
    bucket_log_dict,
    check_labels,
    diffuse,
    linear_anneal,
)
from lightning_modules.diffusion import NoiseSchedule, bucket_centres, timestep_buckets
from lightning_modules.nets.classifier import NoisyLatentClassifier
from tests.tiny_checkpoints import TINY_SCHEDULE, write_autoencoder, write_diffusion

NET = functools.partial(NoisyLatentClassifier, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_head_channels=16)  # fmt: skip


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream")
    ae_path, fingerprint = write_autoencoder(root / "ae.ckpt")
    return {"autoencoder": ae_path, "diffusion": write_diffusion(root / "diff.ckpt", ae_path, fingerprint),
            "fingerprint": fingerprint, "root": root}  # fmt: skip


def make_module(upstream, net=NET, diffusion=None, **kw) -> ClassifierModule:
    kw.setdefault("optimizer", functools.partial(torch.optim.AdamW, lr=1e-2))
    return ClassifierModule(net=net, autoencoder_checkpoint=str(upstream["autoencoder"]),
                            diffusion_checkpoint=str(diffusion or upstream["diffusion"]), num_classes=10,
                            **kw)  # fmt: skip


def image_batch(n: int = 8, seed: int = 0, labels: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels) if labels is not None else torch.randint(0, 10, (n,), generator=g)
    return {"image": torch.rand(len(y), 1, 32, 32, generator=g) * 2 - 1, "label": y, "caption": [""] * len(y)}


# --- t and noise sampling ---------------------------------------------------------------------------


def test_diffuse_draws_t_uniformly_over_all_timesteps():
    schedule = NoiseSchedule.from_dict(TINY_SCHEDULE)
    T = schedule.num_timesteps
    z0 = torch.zeros(200_000, 1, 1, 1)
    _, t, _ = diffuse(schedule, z0, torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=T).numpy()
    assert len(counts) == T and counts.min() > 0  # 0 and T-1 included, nothing outside [0, T)
    # Chi-square goodness of fit against U{0..T-1}: a generator biased by 1/T per bin is rejected.
    assert stats.chisquare(counts).pvalue > 1e-3
    # The test has power: a sampler that never draws t = 0 (e.g. randint(1, T)) fails it.
    skewed = torch.bincount(
        torch.randint(1, T, (200_000,), generator=torch.Generator().manual_seed(0)), minlength=T
    )
    assert stats.chisquare(skewed.numpy()).pvalue < 1e-6


def test_diffuse_matches_the_closed_form_of_q():
    schedule = NoiseSchedule.from_dict(TINY_SCHEDULE)
    z0 = torch.randn(4096, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    z_t, t, noise = diffuse(schedule, z0, torch.Generator().manual_seed(2))
    # abar_t from the betas by hand, float64 numpy (Ho et al. eq. 4).
    betas = np.linspace(
        TINY_SCHEDULE["beta_start"], TINY_SCHEDULE["beta_end"], TINY_SCHEDULE["num_timesteps"]
    )
    abar = torch.from_numpy(np.cumprod(1 - betas))[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * z0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(z_t, expected.float(), rtol=1e-5, atol=1e-5)
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def test_training_step_uses_uniform_t(upstream, monkeypatch):
    import lightning_modules.classifier_module as cm

    seen = []

    def recording(schedule, z0, generator=None):
        out = diffuse(schedule, z0, generator)
        seen.append(out[1])
        return out

    monkeypatch.setattr(cm, "diffuse", recording)
    module = make_module(upstream)
    module.log = lambda *a, **k: None
    module.training_step(image_batch(8), 0)
    assert len(seen) == 1 and seen[0].shape == (8,) and int(seen[0].max()) < 100


def test_latents_from_images_or_cached_moments(upstream):
    module = make_module(upstream, sample_posterior=False)
    batch = image_batch(4)
    posterior = module.codec.autoencoder.encode(batch["image"])
    expected = posterior.mean * module.codec.scale_factor
    torch.testing.assert_close(module.encode(batch), expected)
    moments = torch.cat([posterior.mean, posterior.logvar], dim=1)
    torch.testing.assert_close(module.encode({"moments": moments, "label": batch["label"]}), expected)
    sampled = make_module(upstream).encode(batch, torch.Generator().manual_seed(0))
    std = (0.5 * posterior.logvar).exp() * module.codec.scale_factor
    assert not torch.allclose(sampled, expected) and ((sampled - expected) / std).abs().max() < 6


# --- per-bucket bookkeeping -------------------------------------------------------------------------


def test_timestep_buckets_and_centres():
    """The one bucketing of both stages (lightning_modules.diffusion.buckets): the classifier's plot
    x-axis is the diffusion stage's validation timesteps."""
    t = torch.arange(15)
    # bucket i = floor(10 t / 15): [0, 1.5), [1.5, 3), [3, 4.5), ...
    buckets = timestep_buckets(t, 15, 10)
    assert buckets.tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9]
    # the bucket means are 0.5, 2, 3.5, 5, ...: the centres are those rounded up, timesteps of the bucket
    assert bucket_centres(15, 10) == [1, 2, 4, 5, 7, 8, 10, 11, 13, 14]
    assert bucket_centres(1000, 10)[0] == 50 and bucket_centres(1000, 10)[-1] == 950
    assert timestep_buckets(torch.tensor([0, 99, 100, 999]), 1000, 10).tolist() == [0, 0, 1, 9]
    for T, K in [(15, 10), (7, 5), (5, 4), (1000, 7), (1000, 1000), (999, 10), (10, 1)]:
        t = torch.arange(T)
        buckets, centres = timestep_buckets(t, T, K), bucket_centres(T, K)
        assert all(isinstance(c, int) for c in centres)
        assert buckets[centres].tolist() == list(range(K)), (T, K)  # each centre lies in its own bucket
        means = [t[buckets == k].double().mean().item() for k in range(K)]
        assert all(0 <= c - m <= 0.5 for c, m in zip(centres, means)), (T, K)
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_centres(10, 11)


def test_bucketed_accuracy_on_hand_computed_inputs():
    # K = 2, logits (a, 0): prediction is class 0 iff a > 0; CE(label 0) = log(1 + e^-a), CE(1) = log(1 + e^a).
    a = torch.tensor([2.0, -1.0, 3.0, 0.5, -2.0])
    labels = torch.tensor([0, 0, 1, 1, 1])
    t = torch.tensor([5, 12, 15, 95, 99])  # T = 100, 10 buckets: 0, 1, 1, 9, 9
    metric = BucketedAccuracy(num_timesteps=100, num_buckets=10)
    metric.update(torch.stack([a, torch.zeros(5)], dim=1), labels, t)
    out = metric.compute()
    ce = [math.log1p(math.exp(-2)), math.log1p(math.exp(1)), math.log1p(math.exp(3)),
          math.log1p(math.exp(0.5)), math.log1p(math.exp(-2))]  # fmt: skip
    assert out["count_bucket"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    acc = out["acc_bucket"].tolist()
    assert acc[0] == 1.0 and acc[1] == 0.0 and acc[9] == 0.5 and all(math.isnan(x) for x in acc[2:9])
    assert out["acc"].item() == pytest.approx(2 / 5)
    assert out["loss_bucket"][1].item() == pytest.approx((ce[1] + ce[2]) / 2)
    assert out["loss_bucket"][9].item() == pytest.approx((ce[3] + ce[4]) / 2)
    assert out["loss"].item() == pytest.approx(sum(ce) / 5)
    logged = bucket_log_dict(out, "val")
    assert set(logged) == {"val/acc", "val/loss", "val/acc_bucket0", "val/loss_bucket0", "val/acc_bucket1",
                           "val/loss_bucket1", "val/acc_bucket9", "val/loss_bucket9"}  # fmt: skip


def test_bucketed_accuracy_sums_across_batches():
    g = torch.Generator().manual_seed(0)
    logits, labels, t = torch.randn(300, 5, generator=g), torch.randint(0, 5, (300,), generator=g), \
        torch.randint(0, 50, (300,), generator=g)  # fmt: skip
    whole, parts = BucketedAccuracy(50, 10), BucketedAccuracy(50, 10)
    whole.update(logits, labels, t)
    for sl in (slice(0, 7), slice(7, 200), slice(200, 300)):
        parts.update(logits[sl], labels[sl], t[sl])
    for key in ("acc_bucket", "loss_bucket", "count_bucket"):
        torch.testing.assert_close(parts.compute()[key], whole.compute()[key])
    hits = (logits.argmax(1) == labels).double()
    b = t // 5
    expected = torch.stack([hits[b == i].mean() for i in range(10)])
    torch.testing.assert_close(whole.compute()["acc_bucket"], expected)


def _uneven_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metric = BucketedAccuracy(10, 10)
    if rank == 0:  # rank 1 sees no batch at all, rank 0 two
        metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor([0, 3]))
        metric.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([3]))
    out = metric.compute()
    queue.put((rank, out["count_bucket"].tolist(), out["acc_bucket"][[0, 3]].tolist()))
    dist.destroy_process_group()


def test_bucketed_accuracy_reduces_over_ranks_with_uneven_batches():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_uneven_worker, args=(port, queue), nprocs=2, start_method="spawn", join=True)
    results = sorted(queue.get() for _ in range(2))
    for _, counts, acc in results:
        assert counts == [1, 0, 0, 2, 0, 0, 0, 0, 0, 0] and acc == [1.0, 0.5]


def test_accuracy_plot_is_a_png(tmp_path):
    path = plot_accuracy_vs_t(bucket_centres(100, 10), [0.9, 0.8, float("nan")] + [0.1] * 7, 0.1,
                              tmp_path / "plots" / "acc.png", "val")  # fmt: skip
    assert Image.open(path).format == "PNG"
    assert not [p for p in path.parent.iterdir() if p.name != "acc.png"]  # no temp file left behind


def test_accuracy_plot_callback_after_validation_and_test(upstream, tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    import eval.callbacks.classifier as classifier_callbacks

    module = make_module(upstream, num_buckets=4)
    plotted = []

    def spy(centres, accuracy, chance, path, title):
        plotted.append((centres, accuracy, chance, path, title))
        return plot_accuracy_vs_t(centres, accuracy, chance, path, title)

    monkeypatch.setattr(classifier_callbacks, "plot_accuracy_vs_t", spy)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path), callbacks=[AccuracyVsTimestepPlot()])  # fmt: skip
    loader = DataLoader([image_batch(8, seed=s) for s in range(2)], batch_size=None)
    logged = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    trainer.test(module, dataloaders=loader, verbose=False)
    for name in ("accuracy_vs_t.png", "test_accuracy_vs_t.png"):
        assert Image.open(tmp_path / "plots" / name).format == "PNG"
    (centres, accuracy, chance, path, title), _ = plotted
    # what the module logged for this validation, against the module's bucket centres
    assert centres == bucket_centres(module.schedule.num_timesteps, 4) and chance == 0.1
    seen = [i for i in range(4) if math.isfinite(accuracy[i])]  # a bucket without samples is NaN, not logged
    assert [accuracy[i] for i in seen] == pytest.approx([logged[f"val/acc_bucket{i}"] for i in seen])
    assert path == tmp_path / "plots" / "accuracy_vs_t.png" and title.startswith("val accuracy")
    assert plotted[1][3].name == "test_accuracy_vs_t.png" and plotted[1][1] == module.bucket_accuracy["test"]


# --- bad input --------------------------------------------------------------------------------------


def test_out_of_range_label_is_an_error_naming_it(upstream):
    with pytest.raises(ValueError, match="label 10 "):
        check_labels(torch.tensor([0, 9, 10]), 10)
    with pytest.raises(ValueError, match="label -1 "):
        check_labels(torch.tensor([-1]), 10)
    check_labels(torch.tensor([0, 9]), 10)
    module = make_module(upstream)
    with pytest.raises(ValueError, match="label 12 in the data"):
        module.training_step(image_batch(labels=[1, 12]), 0)


def test_other_autoencoder_than_diffusion_is_refused(upstream, tmp_path):
    other = write_diffusion(tmp_path / "diff.ckpt", upstream["autoencoder"], "f" * 64)
    with pytest.raises(
        StageMismatchError, match=f"weights {upstream['fingerprint'][:12]}.*weights ffffffffffff"
    ):
        make_module(upstream, diffusion=other)


def test_class_count_and_latent_shape_conflicts_are_refused(upstream, tmp_path):
    other = write_diffusion(
        tmp_path / "diff.ckpt", upstream["autoencoder"], upstream["fingerprint"], num_classes=7
    )
    with pytest.raises(StageMismatchError, match="10 classes .* trained on 7"):
        make_module(upstream, diffusion=other)
    with pytest.raises(StageMismatchError, match=r"in_channels=3 \(config\) vs 4 \(upstream\)"):
        make_module(upstream, net=functools.partial(NET, in_channels=3))
    with pytest.raises(StageMismatchError, match=r"latent_size=16 \(config\) vs 8"):
        make_module(upstream, net=functools.partial(NET, latent_size=16))
    three_channels = write_diffusion(tmp_path / "diff3.ckpt", upstream["autoencoder"], upstream["fingerprint"],
                                     latent_shape=[3, 8, 8])  # fmt: skip
    with pytest.raises(StageMismatchError, match="diff3.ckpt: latents have 3 channels, its autoencoder 4"):
        make_module(upstream, diffusion=three_channels)


def test_schedule_and_latent_shape_come_from_the_diffusion_checkpoint(upstream, tmp_path):
    cosine = {**TINY_SCHEDULE, "kind": "cosine", "num_timesteps": 40}
    other = write_diffusion(
        tmp_path / "d.ckpt", upstream["autoencoder"], upstream["fingerprint"], schedule=cosine
    )
    module = make_module(upstream, diffusion=other)
    assert module.schedule == NoiseSchedule.from_dict(cosine)
    assert module.net.hparams()["in_channels"] == 4 and module.net.hparams()["latent_size"] == 8
    art = module.artifacts()
    assert art["schedule"] == cosine and art["latent_shape"] == [4, 8, 8]
    assert art["autoencoder_fingerprint"] == upstream["fingerprint"] and art["num_classes"] == 10


def test_autoencoder_is_not_part_of_the_module_state(upstream):
    module = make_module(upstream)
    keys = list(module.state_dict())
    assert keys and not [k for k in keys if "autoencoder" in k or k.startswith(("codec", "encoder.", "decoder."))]
    assert all(p.requires_grad is False for p in module.codec.autoencoder.parameters())
    assert not [p for p in module.parameters() if p.requires_grad and p not in set(module.net.parameters())]


# --- EMA and optimisation ---------------------------------------------------------------------------


def test_ema_is_updated_after_each_step_and_exported(upstream):
    module = make_module(upstream, ema_decay=0.999, ema_power=2 / 3)
    module.log = module.log_dict = lambda *a, **k: None
    opt = module.configure_optimizers()["optimizer"]
    before = {k: v.clone() for k, v in module.ema.shadow.state_dict().items()}
    for step in range(2):
        loss = module.training_step(image_batch(8, seed=step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module.ema.update(module.net)  # what on_train_batch_end does (it also needs a Trainer to log)
        # warm-up decay of update n: min(decay, 1 - (1 + n)^(-2/3)), by hand
        d = min(0.999, 1 - (1 + step + 1) ** (-2 / 3))
        live = module.net.state_dict()
        for k, old in before.items():
            if old.is_floating_point():
                torch.testing.assert_close(module.ema.shadow.state_dict()[k], d * old + (1 - d) * live[k])
        before = {k: v.clone() for k, v in module.ema.shadow.state_dict().items()}
    exported = module.artifacts()["classifier_state_dict"]
    assert state_fingerprint(exported) == state_fingerprint(module.ema.shadow.state_dict())
    assert state_fingerprint(exported) != state_fingerprint(module.net.state_dict())
    assert module.eval_net is module.ema.shadow


def test_without_ema_the_trained_net_is_exported(upstream):
    module = make_module(upstream, use_ema=False)
    assert module.ema is None and module.eval_net is module.net
    assert state_fingerprint(module.artifacts()["classifier_state_dict"]) == state_fingerprint(
        module.net.state_dict()
    )


def test_linear_anneal_reaches_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = linear_anneal(opt, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_the_classifier_learns_clean_latents(upstream):
    """A few steps on a fixed batch drive the training loss down (the module's gradient path works)."""
    module = make_module(upstream, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    opt = module.configure_optimizers()["optimizer"]
    batch = image_batch(16, seed=3)
    z0 = module.encode(batch)
    t = torch.zeros(16, dtype=torch.long)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(module(z0, t), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
