"""`python -m pipeline.export`: a tiny run -> a diffusers directory that diffusers loads offline
(`GuidedLDMPipeline.from_pretrained(out, local_files_only=True)`), whose U-Net and VAE compute what ours do
(1e-5) and whose DDIM-10 / DPM-Solver++ samples with classifier-free guidance, from the same seeds, equal
ours (1e-4, float32). Refusals: a non-empty `out` without force=true, and a run whose networks have no
diffusers equivalent (named), both with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from lightning_modules.artifacts import (
    autoencoder_artifacts,
    diffusion_artifacts,
    load_diffusion,
    save_artifact,
    state_fingerprint,
)
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import CFGDenoiser, DDIMSampler, DPMSolverPP2MSampler, NoiseSchedule, sample
from lightning_modules.interop.export import build_pipeline, export_diffusers
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.conditioners import ClassConditioner
from lightning_modules.nets.unet import UNet
from tests import tiny_checkpoints as tiny
from tests.conftest import run_cli

AE = dict(in_channels=1, ch=8, ch_mult=[1, 1, 1], num_res_blocks=1, z_channels=4, attn_mid=True)
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[2], num_head_channels=32, context_dim=16)  # fmt: skip
SCALE = 0.7
LABELS, SEEDS = [0, 3, 9], [11, 12, 13]


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def write_exportable_run(run: Path) -> Path:
    """autoencoder/ and diffusion/ final.ckpt of nets diffusers can represent, every weight perturbed (so no
    zero-initialised conv hides a mapping); Lightning's raw `state_dict` holds other U-Net weights than the
    EMA ones. Returns the diffusion checkpoint."""
    ae = _perturb(AutoencoderKL(**AE), 0)
    ae_art = autoencoder_artifacts(ae, SCALE, [1, 32, 32], [4, 8, 8])
    ae_path = save_artifact(run / "autoencoder" / "checkpoints" / "final.ckpt", "autoencoder", ae_art)
    unet, cond = _perturb(UNet(**UNET), 1), _perturb(ClassConditioner(10, 16), 2)
    art = diffusion_artifacts(unet, cond, None, NoiseSchedule("scaled_linear", 1000), "eps", [4, 8, 8], ae_path,
                              state_fingerprint(ae_art["autoencoder_state_dict"]), SCALE, 10)  # fmt: skip
    raw = {f"unet.{k}": v + 0.01 for k, v in art["unet_state_dict"].items()}
    return save_artifact(run / "diffusion" / "checkpoints" / "final.ckpt", "diffusion", {**art, "state_dict": raw})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(diffusion checkpoint, out) after `python -m pipeline.export run_dir=... out=...`."""
    run = tmp_path_factory.mktemp("run")
    ckpt = write_exportable_run(run)
    out = run / "export"
    proc = run_cli("pipeline.export", f"run_dir={run}", f"out={out}")
    assert f"-> {out}" in proc.stdout
    return ckpt, out


def _load(out: Path, monkeypatch):
    from lightning_modules.interop.diffusers_pipeline import GuidedLDMPipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = GuidedLDMPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(bundle, sampler, labels, seeds, scale, negative=None) -> torch.Tensor:
    """Our chain (the sampling loop generate() runs), decoded to floats in [0, 1]."""
    cond = bundle.conditioner
    context, mask = cond(torch.tensor(labels))
    neg_context, neg_mask = cond(cond.null_condition(1) if negative is None else torch.tensor(negative))
    denoiser = CFGDenoiser(bundle.unet, context, mask, neg_context, neg_mask, scale)
    z = sample(denoiser, (len(labels), *bundle.latent_shape), bundle.schedule, sampler, seeds=seeds)
    return (LatentCodec.of(bundle).decode(z) + 1) / 2


def test_export_writes_a_diffusers_directory(exported):
    ckpt, out = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "GuidedLDMPipeline"
    assert index["conditioner"] == ["lightning_modules.interop.diffusers_pipeline", "ClassEmbedder"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    for sub in ("vae", "unet", "conditioner"):
        assert (out / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == SCALE
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["_class_name"], sched["beta_schedule"], sched["prediction_type"]) == (
        "DDIMScheduler", "scaled_linear", "epsilon")  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_plain_diffusers_loads_it_through_the_shipped_loader(exported, monkeypatch, tmp_path):
    """DiffusionPipeline.from_pretrained(out, custom_pipeline=out): the loader pipeline.py names our class."""
    import diffusers.utils.dynamic_modules_utils as dynamic
    from diffusers import DiffusionPipeline

    _, out = exported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    pipe = DiffusionPipeline.from_pretrained(out, custom_pipeline=str(out), trust_remote_code=True,
                                             local_files_only=True)  # fmt: skip
    assert type(pipe).__name__ == "GuidedLDMPipeline" and type(pipe.conditioner).__name__ == "ClassEmbedder"


def test_loaded_offline_its_nets_and_ddim10_cfg_samples_equal_ours(exported, monkeypatch):
    ckpt, out = exported
    pipe, bundle = _load(out, monkeypatch), load_diffusion(ckpt)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([5, 950])
    context, _ = bundle.conditioner(torch.tensor([1, 10]))
    images = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(pipe.conditioner(torch.tensor([1, 10]))[0], context, atol=0, rtol=0)
        torch.testing.assert_close(pipe.unet(x, t, context).sample, bundle.unet(x, t, context), atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.decode(x).sample, bundle.autoencoder.decode(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.encode(images).latent_dist.mean, bundle.autoencoder.encode(images).mean,
                                   atol=1e-5, rtol=0)  # fmt: skip
    ddim = DDIMSampler(num_steps=10)
    for scale, negative in ((3.0, None), (2.0, [5])):  # the null condition, then a negative class
        got = pipe(class_labels=LABELS, guidance_scale=scale, negative_class_labels=negative, num_inference_steps=10,
                   seeds=SEEDS, output_type="pt").images  # fmt: skip
        expected = _ours(bundle, ddim, LABELS, SEEDS, scale, negative)
        assert expected.std() > 0.05  # images, not a constant
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_dpm_solver_export_samples_equal_ours(exported):
    ckpt, _ = exported
    bundle = load_diffusion(ckpt)
    pipe = build_pipeline(bundle, scheduler="dpmpp_2m", spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=LABELS, guidance_scale=3.0, num_inference_steps=10, seeds=SEEDS, output_type="pt").images
    expected = _ours(bundle, DPMSolverPP2MSampler(num_steps=10, spacing="trailing"), LABELS, SEEDS, 3.0)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sde_dpm_solver_export_samples_equal_ours_with_seeds(exported):
    """The SDE variant draws noise on every step: with per-sample seeds the pipeline hands diffusers' step our
    loop's draws (variance_noise), so a seeded sample is the one `pipeline.evaluate` draws."""
    ckpt, _ = exported
    bundle = load_diffusion(ckpt)
    pipe = build_pipeline(bundle, scheduler="dpmpp_2m_sde", spacing="trailing")
    assert pipe.scheduler.config.algorithm_type == "sde-dpmsolver++"
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=LABELS, guidance_scale=3.0, num_inference_steps=10, seeds=SEEDS, output_type="pt").images
    sde = DPMSolverPP2MSampler(num_steps=10, spacing="trailing", algorithm="sde-dpmsolver++")
    torch.testing.assert_close(got, _ours(bundle, sde, LABELS, SEEDS, 3.0), atol=1e-4, rtol=0)
    ode = _ours(bundle, DPMSolverPP2MSampler(num_steps=10, spacing="trailing"), LABELS, SEEDS, 3.0)
    assert (got - ode).abs().max() > 1e-2  # the noise was used


def test_learned_variance_x0_cosine_model_samples_equal_ours():
    """Improved DDPM's 2C outputs (only the prediction is guided; DDIM ignores the variance), x0 prediction
    and the cosine schedule (diffusers' squaredcos_cap_v2, float32 betas: the largest gap of the cases here).

    The nets are built under a fixed seed: initialised from the global RNG, they depended on which tests ran
    before in the same worker, and the float32-beta gap depends on the net (max 3.8e-5 to 6.8e-5 over seeds 0-7,
    1.08e-4 once in a suite run on an Intel Xeon with AMX)."""
    from lightning_modules.artifacts import DiffusionBundle

    with torch.random.fork_rng():
        torch.manual_seed(1)
        unet = _perturb(UNet(**dict(UNET, out_channels=8)), 1).eval()
        cond, ae = _perturb(ClassConditioner(10, 16), 2).eval(), _perturb(AutoencoderKL(**AE), 0).eval()
    bundle = DiffusionBundle(unet=unet, conditioner=cond, schedule=NoiseSchedule("cosine", 1000), prediction_type="x0",
                             autoencoder=ae, scale_factor=SCALE,
                             latent_shape=(4, 8, 8), num_classes=10, autoencoder_fingerprint="", path="memory",
                             variance_type="learned_range")  # fmt: skip
    pipe = build_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(class_labels=LABELS, guidance_scale=2.5, num_inference_steps=10, seeds=SEEDS, output_type="pt").images
    context, mask = cond(torch.tensor(LABELS))
    denoiser = CFGDenoiser(unet, context, mask, *cond(cond.null_condition(1)), 2.5, learned_variance=True)
    z = sample(denoiser, (3, 4, 8, 8), bundle.schedule, DDIMSampler(num_steps=10), prediction_type="x0", seeds=SEEDS,
               variance_type="learned_range")  # fmt: skip
    torch.testing.assert_close(got, (LatentCodec.of(bundle).decode(z) + 1) / 2, atol=1e-4, rtol=0)


def test_existing_out_is_refused_without_force_and_replaced_with_it(exported, monkeypatch):
    ckpt, out = exported
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(FileExistsError, match="force=true"):
        export_diffusers(ckpt, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    export_diffusers(ckpt, out, scheduler="dpmpp_2m", spacing="trailing", weights="raw", force=True)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == (
        "DPMSolverMultistepScheduler")  # fmt: skip
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    raw = {k[len("unet."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    pipe, bundle = _load(out, monkeypatch), load_diffusion(ckpt)
    bundle.unet.load_state_dict(raw)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.randn(1, 1, 16)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, context).sample, bundle.unet(x, t, context), atol=1e-5, rtol=0)
    export_diffusers(ckpt, out, force=True)  # back to the module fixture's export


def test_a_run_without_diffusers_equivalent_is_refused_by_name_and_nothing_written(tmp_path):
    """tests/tiny_checkpoints' autoencoder (ch 8, ch_mult [1, 2, 2]) normalises 8 and 16 channels with 4 and 8
    groups: diffusers has one norm_num_groups."""
    tiny.write_upstream_run(tmp_path / "run")
    proc = run_cli("pipeline.export", f"run_dir={tmp_path / 'run'}", f"out={tmp_path / 'out'}", check=False)
    assert proc.returncode != 0
    assert "[export]" in proc.stderr and "norm_num_groups" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_demo_autoencoder_with_one_group_count_exports(tmp_path):
    """conf/model/autoencoder/kl_f4.yaml (8/16/32 groups by width: refused above) with
    model.autoencoder.norm_num_groups=8, built from the autoencoder stage's composed config as training builds
    it, exports through the CLI, and diffusers' VAE decodes as ours. A count that does not divide the widths is
    refused by name when the stage's module is built, before the stage writes anything (pipeline.train)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from lightning_modules.artifacts import load_autoencoder
    from pipeline.config_checks import ConfigError, build_or_explain
    from pipeline.run import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="groups"):
        base = ["stage=autoencoder", f"paths.root_dir={tmp_path}"]
        cfg = compose(config_name="train", overrides=[*base, "model.autoencoder.norm_num_groups=8"])
        bad = compose(config_name="train", overrides=[*base, "model.autoencoder.norm_num_groups=3"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match=r"norm_num_groups=3 \(model\.autoencoder\.norm_num_groups\) does not "
                                          r"divide the width 16"):  # fmt: skip
        build_or_explain(bad.stage.module.autoencoder, "stage.module", "the stage")
    ae = _perturb(instantiate(cfg.stage.module.autoencoder), 0).eval()
    run = tmp_path / "run"
    ae_art = autoencoder_artifacts(ae, SCALE, [1, 32, 32], [4, 8, 8])
    ae_path = save_artifact(run / "autoencoder" / "checkpoints" / "final.ckpt", "autoencoder", ae_art)
    loaded, _, fingerprint = load_autoencoder(ae_path)
    assert loaded.hparams()["ch_mult"] == [1, 2, 4] and loaded.hparams()["norm_num_groups"] == 8
    unet, cond = _perturb(UNet(**UNET), 1), _perturb(ClassConditioner(10, 16), 2)
    art = diffusion_artifacts(unet, cond, None, NoiseSchedule("scaled_linear", 1000), "eps", [4, 8, 8], ae_path,
                              fingerprint, SCALE, 10)  # fmt: skip
    save_artifact(run / "diffusion" / "checkpoints" / "final.ckpt", "diffusion", art)
    proc = run_cli("pipeline.export", f"run_dir={run}", f"out={tmp_path / 'out'}")
    assert f"-> {tmp_path / 'out'}" in proc.stdout
    vae = DiffusersAutoencoderKL.from_pretrained(tmp_path / "out" / "vae", local_files_only=True).eval()
    assert vae.config.norm_num_groups == 8 and list(vae.config.block_out_channels) == [16, 32, 64]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z).sample, loaded.decode(z), atol=1e-5, rtol=0)


@pytest.mark.slow  # loads the packaged MiniLM text encoder twice and writes it: ~2 min on 2 busy cores
def test_text_model_exports_encoder_and_tokenizer_and_samples_equal_ours(tmp_path, monkeypatch):
    """A text-conditional (v-prediction) model: text_encoder/ + tokenizer/ instead of conditioner/; prompts,
    a negative prompt and padded captions (attention masks) give our samples."""
    from lightning_modules.artifacts import DiffusionBundle
    from lightning_modules.nets.conditioners import TextConditioner

    cond = TextConditioner(max_length=16).eval()
    unet = _perturb(UNet(**dict(UNET, context_dim=cond.context_dim)), 1).eval()
    bundle = DiffusionBundle(unet=unet, conditioner=cond, schedule=NoiseSchedule("scaled_linear", 1000),
                             prediction_type="v", autoencoder=_perturb(AutoencoderKL(**AE), 0).eval(),
                             scale_factor=SCALE, latent_shape=(4, 8, 8), num_classes=10, autoencoder_fingerprint="",
                             path="memory")  # fmt: skip
    build_pipeline(bundle).save_pretrained(tmp_path / "out", safe_serialization=True)
    assert (tmp_path / "out" / "text_encoder" / "config.json").is_file()
    assert json.loads((tmp_path / "out" / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 16
    pipe = _load(tmp_path / "out", monkeypatch)
    prompts, seeds = ["a photo of a sneaker", "a bag"], [4, 5]
    got = pipe(prompt=prompts, negative_prompt="a shirt", guidance_scale=3.0, num_inference_steps=10, seeds=seeds,
               output_type="pt").images  # fmt: skip
    context, mask = cond(prompts)
    denoiser = CFGDenoiser(unet, context, mask, *cond(["a shirt"]), 3.0)
    z = sample(denoiser, (2, 4, 8, 8), bundle.schedule, DDIMSampler(num_steps=10), prediction_type="v", seeds=seeds)
    torch.testing.assert_close(got, (LatentCodec.of(bundle).decode(z) + 1) / 2, atol=1e-4, rtol=0)
