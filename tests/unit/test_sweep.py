"""The guidance-sweep job: settings, labels, seeds, rank split, resume and skip, bad input before sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from eval.generator import SampleGenerator
from eval.job import SweepJob
from eval.samples import load_samples
from eval.scoring import real_image_batches
from eval.settings import (
    batch_ranges,
    class_balanced_labels,
    expand_settings,
    sample_seeds,
    select_setting,
)
from eval.sweep_report import collect_rows
from lightning_modules import generation
from lightning_modules.artifacts import StageMismatchError
from lightning_modules.diffusion import DDIMSampler, DDPMSampler, sample
from lightning_modules.generation import GuidanceSetting
from pipeline.config_checks import ConfigError
from pipeline.evaluate import sweep_settings
from tests import tiny_checkpoints as tiny

CONF = Path(__file__).resolve().parents[2] / "conf"


# --- settings --------------------------------------------------------------------------------------


def test_cfg_settings_default_scales():
    settings = expand_settings("cfg", [1, 1.5, 2, 3, 5, 7])
    assert [s.name for s in settings] == ["cfg_s1", "cfg_s1.5", "cfg_s2", "cfg_s3", "cfg_s5", "cfg_s7"]
    assert all(s.conditional and s.cls_scale == 0 for s in settings)
    assert [s.as_row()["cfg_scale"] for s in settings] == [1.0, 1.5, 2.0, 3.0, 5.0, 7.0]


def test_classifier_settings_sample_unconditionally():
    settings = expand_settings(
        "classifier", scales=[4], classifier_scales=[0, 1, 3, 10], rescale_phi=0.7, negative=2
    )
    assert [s.name for s in settings] == ["cls_s0", "cls_s1", "cls_s3", "cls_s10"]
    for s in settings:
        # no classifier-free guidance at all: one pass with the null condition, no rescale, no negative
        assert not s.conditional and s.cfg_scale == 1.0 and s.rescale_phi == 0 and s.negative is None
        assert s.as_row()["cfg_scale"] is None


def test_both_settings_grid_and_paired():
    grid = expand_settings("both", [1, 3], [0, 1, 3])
    assert [(s.cfg_scale, s.cls_scale) for s in grid] == [(1, 0), (3, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    assert grid[3].name == "both_s3_c1"
    paired = expand_settings("both", [1, 3, 5], [0, 1, 3], pairing="paired")
    assert [(s.cfg_scale, s.cls_scale) for s in paired] == [(1, 0), (3, 1), (5, 3)]
    with pytest.raises(ValueError, match="equal length"):
        expand_settings("both", [1, 3], [0, 1, 3], pairing="paired")


def test_rescale_and_negative_make_distinct_names():
    assert expand_settings("cfg", [3], rescale_phi=0.7, negative=2)[0].name == "cfg_s3_phi0.7_neg2"
    prompt = expand_settings("cfg", [3], negative="blurry, low quality")[0].name
    assert prompt.startswith("cfg_s3_negblurry-low-quality-") and "/" not in prompt and " " not in prompt


@pytest.mark.parametrize(
    "scales,match",
    [
        ([], "guidance.scales is empty"),
        (None, "must be a list"),
        ("1,3", "must be a list"),
        (["a"], "'a' .* is not a number"),
        ([1, "x"], "is not a number"),
        ([True], "is not a number"),
        ([float("nan")], "finite"),
    ],  # fmt: skip
)
def test_bad_scale_lists_name_the_key(scales, match):
    with pytest.raises(ValueError, match=match):
        expand_settings("cfg", scales)


def test_bad_kind_and_classifier_scales():
    with pytest.raises(ValueError, match="guidance.kind"):
        expand_settings("cfgg", [1])
    with pytest.raises(ValueError, match="guidance.classifier_scales is empty"):
        expand_settings("classifier", [1], [])


def test_select_setting_range():
    settings = expand_settings("cfg", [1, 3])
    assert select_setting(settings, 1).name == "cfg_s3"
    with pytest.raises(
        ValueError, match=r"sweep_index=2 is out of range: this sweep has 2 settings \(0: cfg_s1"
    ):
        select_setting(settings, 2)


# --- labels, seeds, rank split ---------------------------------------------------------------------


def test_class_balanced_labels():
    labels = class_balanced_labels(25, 10)
    assert labels.dtype == np.int64 and labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert np.bincount(labels).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]
    assert np.bincount(class_balanced_labels(1000, 10)).tolist() == [100] * 10


def test_seeds_and_rank_split_cover_every_index_once():
    assert sample_seeds([0, 5, 7], 100) == [100, 105, 107]
    assert [list(r) for r in batch_ranges(7, 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    for world in (1, 2, 3):
        owned = [i for rank in range(world) for r in batch_ranges(23, 4)[rank::world] for i in r]
        assert sorted(owned) == list(range(23))


def test_reference_images_are_the_whole_split_on_any_rank(tiny_data, monkeypatch):
    from datamodules.webdata import WebDataModule

    dm = WebDataModule(data_dir=str(tiny_data / "fashion_mnist"), num_workers=0, eval_batch_size=50)
    single = torch.cat(list(real_image_batches(dm, "test")))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sum(len(b["image"]) for b in dm.eval_dataloader("test")) < len(single)  # webdataset splits by rank
    whole = torch.cat(list(real_image_batches(dm, "test", world=2)))
    assert len(single) == dm.num_samples("test") and torch.equal(whole, single)


# --- generation with real (tiny) models ------------------------------------------------------------


class FakeScorer:
    """Counts calls; metrics are simple functions of the samples so rows differ per setting."""

    def __init__(self, tag: str = "v1") -> None:
        self.tag, self.calls = tag, 0

    def fingerprint(self) -> dict:
        return {"scorer": self.tag}

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
        self.calls += 1
        return {"fid": float(images.mean()), "class_accuracy": None}


@pytest.fixture(scope="module")
def tiny_diffusion(tmp_path_factory):
    return tiny.conditioned_bundle(tmp_path_factory.mktemp("run"))[0]


def _job(out_dir, generator, batch_size, n=8, settings=None, rank=0, world=1, scorer=None, **kw) -> SweepJob:
    return SweepJob(
        out_dir=out_dir, settings=settings or [GuidanceSetting("cfg", cfg_scale=3.0)], generator=generator,
        scorer=scorer if rank == 0 else None, num_samples=n, num_classes=tiny.NUM_CLASSES,
        batch_size=batch_size, sample_seed=11, rank=rank, world=world, progress=False, poll_s=0.01,
        gather_timeout_s=60, log=lambda _: None, **kw,
    )  # fmt: skip


class _Draws:
    """Per seed, what `generate` drew: every noise row (x_T, then each step's) and the final latent z_0."""

    def __init__(self, monkeypatch) -> None:
        from lightning_modules.diffusion import sampling

        self.noise: dict[int, list[torch.Tensor]] = {}
        self.latent: dict[int, torch.Tensor] = {}
        real_noise, real_sample = sampling.seeded_noise, generation.sample

        def seeded_noise(seeds, *args, **kwargs):
            rows = real_noise(seeds, *args, **kwargs)
            for seed, row in zip(sampling._seed_list(seeds), rows):
                self.noise.setdefault(seed, []).append(row.clone())
            return rows

        def sample_and_keep(*args, seeds, **kwargs):
            z = real_sample(*args, seeds=seeds, **kwargs)
            self.latent.update({seed: row.clone() for seed, row in zip(seeds, z)})
            return z

        monkeypatch.setattr(sampling, "seeded_noise", seeded_noise)
        monkeypatch.setattr(generation, "sample", sample_and_keep)

    def take(self) -> tuple[dict, dict]:
        taken = self.noise, self.latent
        self.noise, self.latent = {}, {}
        return taken


def test_samples_do_not_depend_on_batch_size_or_rank_split(tiny_diffusion, tmp_path, monkeypatch):
    """Sample i is drawn from seed 11 + i alone: the same noise, bit for bit, in a batch of 1, of 8, or split
    over two ranks. The U-Net and decoder are not bit-exact across batch sizes (float kernels block and
    vectorise by batch, differently on AVX2 and AVX512 CPUs), so the final latents agree to float rounding
    and a decoded pixel may land one uint8 level away: on at most 0.1% of pixels (measured: none on AVX512,
    0.01% on AVX2 kernels, batch 1 against 8)."""
    generator = SampleGenerator(tiny_diffusion, DDPMSampler(num_steps=4))  # DDPM: noise at every step too
    draws = _Draws(monkeypatch)
    runs = {}
    _job(tmp_path / "b8", generator, batch_size=8, scorer=FakeScorer()).run()
    runs["b8"] = draws.take()
    _job(tmp_path / "b1", generator, batch_size=1, scorer=FakeScorer()).run()
    runs["b1"] = draws.take()
    # two ranks: rank 1 draws batches 1 and 3, rank 0 draws 0 and 2 and merges
    _job(tmp_path / "r2", generator, batch_size=2, rank=1, world=2).run()
    assert len(list((tmp_path / "r2" / "cfg_s3" / "parts").glob("*.npz"))) == 2
    _job(tmp_path / "r2", generator, batch_size=2, rank=0, world=2, scorer=FakeScorer()).run()
    assert not (tmp_path / "r2" / "cfg_s3" / "parts").exists()
    runs["r2"] = draws.take()

    noise, latent = runs["b8"]
    assert sorted(noise) == sorted(latent) == list(range(11, 19))
    assert {len(n) for n in noise.values()} == {4}  # x_T, then the noise of each step but the last (t = 0)
    images, labels = load_samples(tmp_path / "b8" / "cfg_s3" / "samples.npz")
    assert images.dtype == np.uint8 and images.shape == (8, 32, 32, 1)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert len({images[i].tobytes() for i in range(8)}) == 8  # each sample is its own draw
    for other in ("b1", "r2"):
        other_noise, other_latent = runs[other]
        assert sorted(other_noise) == sorted(noise)
        for seed in noise:
            assert len(other_noise[seed]) == len(noise[seed]), (other, seed)
            assert all(torch.equal(a, b) for a, b in zip(other_noise[seed], noise[seed])), (other, seed)
            torch.testing.assert_close(other_latent[seed], latent[seed], rtol=0, atol=1e-4)
        other_images = load_samples(tmp_path / other / "cfg_s3" / "samples.npz")[0].astype(int)
        diff = np.abs(other_images - images.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3, (other, diff.max(), (diff > 0).mean())


def test_one_sample_equals_the_sampling_loop_called_directly(tiny_diffusion):
    """Sample 5 at s = 3 is the loop run on a batch of one with seed 11 + 5, decoded by D(z / scale)."""
    sampler = DDPMSampler(num_steps=3)
    generator = SampleGenerator(tiny_diffusion, sampler)
    setting = GuidanceSetting("cfg", cfg_scale=3.0)
    batch = generator(setting, np.array([4, 5]), [15, 16])
    d = tiny_diffusion
    cond = d.conditioner(torch.tensor([5]))
    null = d.conditioner(torch.tensor([d.conditioner.null_index]))

    def denoiser(x, t):  # eps_u + s (eps_c - eps_u), written out
        eps_c, eps_u = d.unet(x, t, *cond), d.unet(x, t, *null)
        return eps_u + 3.0 * (eps_c - eps_u)

    z = sample(denoiser, (1, *d.latent_shape), d.schedule, sampler, seeds=[16])
    with torch.no_grad():
        x = d.autoencoder.decode(z / d.scale_factor).clamp(-1, 1)
    expected = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(batch[1:].astype(int), expected.astype(int), atol=1)
    unguided = generator(GuidanceSetting("cfg", cfg_scale=1.0), np.array([4, 5]), [15, 16])
    assert not np.array_equal(unguided, batch)


def test_classifier_setting_needs_a_classifier(tiny_diffusion):
    generator = SampleGenerator(tiny_diffusion, DDIMSampler(num_steps=2))
    with pytest.raises(ValueError, match="guidance.classifier_checkpoint"):
        generator(GuidanceSetting("classifier", cls_scale=1.0), np.array([0]), [0])


# --- skip / resume ---------------------------------------------------------------------------------


class CountingGenerator:
    """Images = seed-derived constants; counts batches; optionally dies after `fail_after` batches."""

    def __init__(self, tag: str = "g1", fail_after: int | None = None) -> None:
        self.tag, self.fail_after, self.batches = tag, fail_after, 0

    def fingerprint(self, setting) -> dict:
        return {"generator": self.tag}

    def describe(self, setting=None) -> dict:
        return {"sampler": "Fake", "num_steps": 1}

    def __call__(self, setting, labels, seeds):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        return np.stack([np.full((4, 4, 1), s % 256, dtype=np.uint8) for s in seeds])


def test_finished_settings_are_skipped_and_interrupted_ones_resume(tmp_path):
    settings = expand_settings("cfg", [1, 3])
    gen, scorer = CountingGenerator(), FakeScorer()
    rows = _job(tmp_path, gen, batch_size=3, n=10, settings=settings, scorer=scorer, grid_per_class=2).run()
    assert gen.batches == 2 * 4 and scorer.calls == 2 and [r["setting"] for r in rows] == ["cfg_s1", "cfg_s3"]
    for name in ("cfg_s1", "cfg_s3"):
        assert {p.name for p in (tmp_path / name).iterdir()} == {"samples.npz", "grid.png", "metrics.json"}
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*")}

    # same config: nothing is sampled or scored again, no file is rewritten
    job = _job(tmp_path, gen, batch_size=5, n=10, settings=settings, scorer=scorer)
    assert [job.run_setting(s)[0] for s in settings] == ["skipped (done with this config)"] * 2
    assert gen.batches == 8 and scorer.calls == 2
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*")}

    # samples present, metrics missing (killed while scoring) or made by another scorer: score only
    (tmp_path / "cfg_s1" / "metrics.json").unlink()
    assert job.run_setting(settings[0])[0] == "scored" and gen.batches == 8
    new_scorer = FakeScorer("v2")
    assert _job(tmp_path, gen, 5, 10, settings, scorer=new_scorer).run_setting(settings[1])[0] == "scored"
    assert gen.batches == 8 and new_scorer.calls == 1

    # another generator (e.g. a retrained model): sampled again
    assert _job(tmp_path, CountingGenerator("g2"), 5, 10, settings, scorer=scorer).run_setting(settings[1])[
        0
    ] == ("sampled+scored")


def test_killed_sampling_resumes_from_finished_batches(tmp_path):
    setting = GuidanceSetting("cfg", cfg_scale=2.0)
    dying = CountingGenerator(fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _job(tmp_path, dying, batch_size=3, n=10, settings=[setting], scorer=FakeScorer()).run()
    parts = sorted(p.name for p in (tmp_path / "cfg_s2" / "parts").iterdir())
    assert parts == ["0000000-0000003.npz", "0000003-0000006.npz"]  # only finished batches, no temp files
    resumed = CountingGenerator()
    _job(tmp_path, resumed, batch_size=3, n=10, settings=[setting], scorer=FakeScorer()).run()
    assert resumed.batches == 2  # batches 6-9 and 9-10 only
    images, labels = load_samples(tmp_path / "cfg_s2" / "samples.npz")
    assert images[:, 0, 0, 0].tolist() == [11 + i for i in range(10)] and labels.tolist() == [*range(10)]


def test_force_redoes_and_report_rows_filter_by_sweep(tmp_path):
    settings = expand_settings("cfg", [1])
    gen = CountingGenerator()
    _job(tmp_path, gen, 5, 10, settings, scorer=FakeScorer()).run()
    _job(tmp_path, gen, 5, 10, settings, scorer=FakeScorer(), force=True).run()
    assert gen.batches == 4
    other = _job(tmp_path, CountingGenerator("g2"), 5, 10, expand_settings("cfg", [3]), scorer=FakeScorer())
    other.run()
    assert [r["setting"] for r in collect_rows(tmp_path)] == ["cfg_s1", "cfg_s3"]
    assert [r["setting"] for r in collect_rows(tmp_path, other.sweep_hash())] == ["cfg_s3"]
    metrics = json.loads((tmp_path / "cfg_s3" / "metrics.json").read_text())
    assert list(metrics)[:2] == ["setting", "guidance"] and metrics["num_steps"] == 1
    assert math.isclose(metrics["fid"], float(load_samples(tmp_path / "cfg_s3" / "samples.npz")[0].mean()))


# --- bad input, before any sampling ----------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "runs" / "default" / "fashion_mnist"
    paths = tiny.write_upstream_run(run)
    tiny.write_classifier(run / "classifier" / "checkpoints" / "final.ckpt", paths["fingerprint"])
    return run


def _compose(tiny_data, run_dir: Path, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = [f"paths.data_dir={tiny_data}", f"paths.runs_dir={run_dir.parents[1]}", "logger=none"]
        return compose("evaluate", [*base, "num_samples=40", "progress=false", *overrides])


@pytest.fixture
def no_sampling(monkeypatch):
    """Any call of the sampling loop fails the test: the errors below must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started before the bad input was reported")

    monkeypatch.setattr(generation, "sample", refuse)


def _bad_inputs(run_dir: Path) -> dict[str, tuple[list[str], type, str]]:
    ckpts = run_dir / "bad"
    other_ae, _ = tiny.write_autoencoder(ckpts / "other_ae.ckpt", seed=1)
    schedule = dict(tiny.TINY_SCHEDULE, beta_end=0.03)
    fp = tiny.write_autoencoder(ckpts / "ae_copy.ckpt")[1]
    tiny.write_classifier(ckpts / "clf_schedule.ckpt", fp, schedule=schedule)
    tiny.write_feature_net(ckpts / "perceptual.ckpt", role="perceptual")
    tiny.write_feature_net(run_dir / "feature_net_perceptual" / "checkpoints" / "final.ckpt", role="eval")
    ae = str(run_dir / "autoencoder" / "checkpoints" / "final.ckpt")
    features = "model.features.checkpoint_path"
    return {
        "wrong stage": ([f"checkpoints.diffusion={ae}"], StageMismatchError,
                        "stage 'autoencoder', expected stage 'diffusion'"),
        "other autoencoder": ([f"checkpoints.autoencoder={other_ae}"], StageMismatchError, "is not the one"),
        "classifier mismatch": (["guidance=classifier",
                                 f"guidance.classifier_checkpoint={ckpts / 'clf_schedule.ckpt'}"],
                                StageMismatchError, "noise schedule"),
        "empty scales": (["guidance.scales=[]"], ValueError, "guidance.scales is empty"),
        "non-numeric scales": (["guidance.scales=[1,high]"], ValueError, "'high' .* is not a number"),
        "too few samples": (["num_samples=10"], ValueError, "FID needs more samples"),
        "no classifier": (["guidance=both", "guidance.classifier_checkpoint=null"], ValueError,
                          "guidance.classifier_checkpoint"),
        "perceptual role": ([f"{features}={ckpts / 'perceptual.ckpt'}"], ValueError, "role 'perceptual'"),
        "perceptual weights": ([], ValueError, "same weights as the perceptual net"),
        "features of another stage": ([f"{features}={ae}"], StageMismatchError, "stage 'autoencoder'"),
        "image size": (["data.image_size=64"], StageMismatchError, "decoded samples are"),
        "sweep index": (["sweep_index=6"], ValueError, "sweep_index=6 is out of range"),
        "IS split size": (["metrics.is_split_size=0"], ConfigError, r"metrics.is_split_size=0: expected an integer > 0"),
        "reference batch of another net": ([f"reference.stats={_other_net_batch(run_dir)}"], ValueError,
                                           r"other_net.npz: key 'mu' has shape \(7,\)"),
    }  # fmt: skip


def _other_net_batch(run_dir: Path) -> Path:
    """A reference batch whose statistics are 7-d: not the domain feature net's features."""
    path = run_dir / "other_net.npz"
    np.savez(path, mu=np.zeros(7), sigma=np.eye(7))
    return path


def test_bad_input_is_refused_before_sampling(tiny_data, run_dir, no_sampling):
    from pipeline.evaluate import evaluate

    for case, (overrides, error, match) in _bad_inputs(run_dir).items():
        # feature_net_perceptual/ holds the eval net's weights (same seed): only that case looks at it
        perceptual = [] if case == "perceptual weights" else ["perceptual_feature_net=null"]
        cfg = _compose(tiny_data, run_dir, *perceptual, *overrides)
        with pytest.raises(error, match=match):
            evaluate(cfg)
        assert not list((run_dir / "eval").glob("*/*/samples.npz")), case


def test_bf16_autocast_sampling_is_close_to_fp32_and_hashed_apart(tiny_diffusion):
    setting, labels, seeds = GuidanceSetting("cfg", cfg_scale=3.0), np.arange(4), [0, 1, 2, 3]
    fp32, bf16 = (
        SampleGenerator(tiny_diffusion, DDIMSampler(num_steps=3), dtype=d) for d in ("fp32", "bf16")
    )
    diff = np.abs(fp32(setting, labels, seeds).astype(int) - bf16(setting, labels, seeds).astype(int))
    assert diff.mean() < 2.0
    assert fp32.fingerprint(setting) != bf16.fingerprint(setting)
    with pytest.raises(ValueError, match="sampling_dtype"):
        SampleGenerator(tiny_diffusion, DDIMSampler(num_steps=3), dtype="int8")


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["guidance=classifier"],
        ["guidance=both"],
        ["budget=quick"],
        ["model/features=inception"],
        ["model/features=inception", "metrics.is_split_size=5000", "reference.stats=/refs/VIRTUAL_imagenet256_labeled.npz"],
        ["sampler=ddpm"],
        ["logger=wandb"],
        ["logger=csv"],
    ],  # fmt: skip
)
def test_evaluate_config_options_compose(overrides, tmp_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["sweep_dir"].endswith(f"eval/{resolved['guidance']['name']}")
    assert sweep_settings(cfg.guidance)  # each guidance file holds the keys its kind reads
