"""`stage.module.init_from_diffusers`: the autoencoder and diffusion stages start from small randomly
initialised diffusers models saved to disk and train from them under debug=fdr (one step). The stage's
weights after that step are the diffusers model's moved by at most about one optimiser step (a random start
would be far away); with freeze_pretrained=true the autoencoder stays the diffusers one exactly. The first
forward of the started nets equals the diffusers model's: tests/unit/test_diffusers_interop.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel

from lightning_modules.interop.convert import autoencoder_config, autoencoder_from_diffusers
from lightning_modules.interop.convert_unet import unet_config, unet_from_diffusers
from lightning_modules.nets.autoencoder import AutoencoderKL
from lightning_modules.nets.unet import UNet
from tests.conftest import run_cli, tiny_overrides

RUN = Path("default") / "fashion_mnist"
AE = dict(in_channels=1, ch=8, ch_mult=[1, 1, 1], num_res_blocks=1, z_channels=4, attn_mid=True)
AE_OVERRIDES = ["model.autoencoder.ch=8", "model.autoencoder.ch_mult=[1,1,1]"]  # kl_f4's other sizes fit
# conf/model/unet/small.yaml's U-Net with the class tokens' 64-d context (model.conditioner.embed_dim)
UNET = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2,
            attention_resolutions=[2, 4], num_head_channels=32, context_dim=64)  # fmt: skip


def _max_change(state: dict, reference: dict) -> float:
    assert state.keys() == reference.keys()
    return max(float((state[k].float() - reference[k].float()).abs().max()) for k in state)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A diffusers AutoencoderKL and a pipeline-style folder holding a UNet2DConditionModel, random weights."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vae = DiffusersAutoencoderKL(**autoencoder_config(AutoencoderKL(**AE), sample_size=32, scaling_factor=1.0))
    vae.save_pretrained(root / "vae_only")
    unet = UNet2DConditionModel(**unet_config(UNet(**UNET), sample_size=8))
    unet.save_pretrained(root / "pipe" / "unet")
    return {"vae_dir": root / "vae_only", "pipe_dir": root / "pipe",
            "vae": autoencoder_from_diffusers(vae.state_dict(), AutoencoderKL(**AE).hparams()),
            "unet": unet_from_diffusers(unet.state_dict(), UNet(**UNET).hparams())}  # fmt: skip


@pytest.mark.parametrize("freeze", [False, True])
def test_autoencoder_stage_trains_from_a_diffusers_vae(tiny_data, tmp_path, pretrained, freeze):
    runs = tmp_path / "runs"
    run_cli("pipeline.train", "stage=autoencoder", f"stage.module.init_from_diffusers={pretrained['vae_dir']}",
            f"stage.module.freeze_pretrained={str(freeze).lower()}", *tiny_overrides(tiny_data, runs), "debug=fdr",
            *AE_OVERRIDES)  # fmt: skip
    ae = torch.load(runs / RUN / "autoencoder/checkpoints/final.ckpt", weights_only=True)
    change = _max_change(ae["autoencoder_state_dict"], pretrained["vae"])
    # frozen: exactly the diffusers weights; else one Adam step (lr 4e-3) away, where the configured net's
    # own random init is ~0.1-1 away
    assert change == 0.0 if freeze else 0.0 < change < 0.02
    assert ae["latent_scale_factor"] > 0


def test_diffusion_stage_trains_from_a_diffusers_unet(tiny_data, tmp_path, pretrained):
    """From a pipeline-style folder (its unet/); the autoencoder is debug=fdr's random placeholder."""
    runs = tmp_path / "runs"
    run_cli("pipeline.train", "stage=diffusion", f"stage.module.init_from_diffusers={pretrained['pipe_dir']}",
            "stage.module.ema_decay=0.5", *tiny_overrides(tiny_data, runs), "debug=fdr")  # fmt: skip
    diff = torch.load(runs / RUN / "diffusion/checkpoints/final.ckpt", weights_only=True)
    raw = {k[len("unet."):]: v for k, v in diff["state_dict"].items() if k.startswith("unet.")}
    assert 0.0 < _max_change(raw, pretrained["unet"]) < 0.005  # one AdamW step of lr <= 1e-3
    assert _max_change(diff["unet_state_dict"], pretrained["unet"]) < 0.005  # the EMA starts there too


def test_a_pretrained_model_that_does_not_fit_is_refused_before_anything_is_written(tiny_data, tmp_path, pretrained):
    runs = tmp_path / "runs"
    proc = run_cli("pipeline.train", "stage=autoencoder", f"stage.module.init_from_diffusers={pretrained['vae_dir']}",
                   *tiny_overrides(tiny_data, runs), "debug=fdr", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "model.autoencoder.ch=8 model.autoencoder.ch_mult=[1,1,1]" in proc.stderr + proc.stdout
    assert not (runs / RUN / "autoencoder" / "checkpoints").exists()


@pytest.mark.slow  # trains two stages through the CLI, exports and samples: ~2 min on 2 busy cores
def test_a_pipeline_trained_by_the_stages_exports_and_samples_like_ours(tiny_data, tmp_path, pretrained, monkeypatch):
    """The whole round: autoencoder and diffusion stages (debug=fdr) started from the diffusers models,
    `python -m pipeline.export`, loaded offline by diffusers: DDIM-10 with CFG equals our sampling within 1e-4."""
    import huggingface_hub.constants

    from lightning_modules.artifacts import load_diffusion
    from lightning_modules.codec import LatentCodec
    from lightning_modules.diffusion import CFGDenoiser, DDIMSampler, sample
    from lightning_modules.interop.diffusers_pipeline import GuidedLDMPipeline

    runs = tmp_path / "runs"
    common = [*tiny_overrides(tiny_data, runs), "debug=fdr"]
    run_cli("pipeline.train", "stage=autoencoder", f"stage.module.init_from_diffusers={pretrained['vae_dir']}",
            *common, *AE_OVERRIDES)  # fmt: skip
    run_cli("pipeline.train", "stage=diffusion", f"stage.module.init_from_diffusers={pretrained['pipe_dir']}", *common)
    run_cli("pipeline.export", f"run_dir={runs / RUN}", f"out={tmp_path / 'out'}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = GuidedLDMPipeline.from_pretrained(tmp_path / "out", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    labels, seeds = [1, 8], [3, 4]
    got = pipe(class_labels=labels, guidance_scale=3.0, num_inference_steps=10, seeds=seeds, output_type="pt").images
    bundle = load_diffusion(runs / RUN / "diffusion/checkpoints/final.ckpt")
    context, mask = bundle.conditioner(torch.tensor(labels))
    denoiser = CFGDenoiser(bundle.unet, context, mask, *bundle.conditioner(bundle.conditioner.null_condition(1)), 3.0)
    z = sample(denoiser, (2, *bundle.latent_shape), bundle.schedule, DDIMSampler(num_steps=10), seeds=seeds)
    expected = (LatentCodec.of(bundle).decode(z) + 1) / 2
    assert expected.std() > 0.01
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
