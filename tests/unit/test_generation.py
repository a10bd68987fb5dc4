"""The one generation function against the chain written out by hand, and the one latent codec: scale
factor, posterior moments, round trip, shape checks, the autoencoder kept out of a module's state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.artifacts import StageMismatchError, load_classifier
from lightning_modules.codec import LatentCodec
from lightning_modules.diffusion import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, sample
from lightning_modules.generation import GuidanceSetting, generate
from tests import tiny_checkpoints as tiny


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny diffusion bundle (output conv given weights, so the condition matters) and a classifier."""
    run = tmp_path_factory.mktemp("run")
    bundle, paths = tiny.conditioned_bundle(run)
    clf_path = tiny.write_classifier(run / "classifier" / "final.ckpt", paths["fingerprint"])
    return bundle, load_classifier(clf_path, diffusion=bundle)


def _by_hand_uint8(bundle, z: torch.Tensor) -> np.ndarray:
    """x = D(z / scale_factor) clamped to [-1, 1], round((x + 1) 127.5) as uint8 (B, H, W, C), written out."""
    with torch.no_grad():
        x = bundle.autoencoder.decode(z / bundle.scale_factor).clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sampler", [DDPMSampler(num_steps=3), DPMSolverPP2MSampler(num_steps=4)], ids=["ddpm", "dpmpp_2m"])
def test_generate_equals_the_chain_written_out_by_hand(tiny_run, sampler):
    """CFG at s = 3 with guidance rescale, a negative class and classifier guidance: the same images as the
    denoiser eps_u + s (eps_c - eps_u) (rescaled, Lin et al. 2023 eq. 15-16) and the classifier gradient
    s_cls grad log p(y | z_t, t) written out, through the bare sampling loop, decoded by D(z / scale).
    DDPM applies the gradient through `condition_mean`, DPM-Solver++ through the guided eps."""
    bundle, classifier = tiny_run
    labels, seeds = torch.tensor([2, 7]), [5, 6]
    setting = GuidanceSetting("both", cfg_scale=3.0, cls_scale=2.0, rescale_phi=0.5, negative=4)
    got = generate(bundle.unet, LatentCodec.of(bundle), bundle.conditioner, setting, sampler, bundle.schedule,
                   bundle.prediction_type, labels, seeds, latent_shape=bundle.latent_shape, labels=labels,
                   negative_condition=torch.tensor([4]), classifier=classifier)  # fmt: skip

    cond = bundle.conditioner(labels)
    negative = bundle.conditioner(torch.tensor([4, 4]))

    def denoiser(x, t):
        eps_c, eps_u = bundle.unet(x, t, *cond), bundle.unet(x, t, *negative)
        guided = eps_u + 3.0 * (eps_c - eps_u)
        std = lambda e: e.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
        return 0.5 * guided * std(eps_c) / std(guided) + 0.5 * guided

    def cond_fn(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            log_p = F.log_softmax(classifier(x, t), dim=-1)[torch.arange(2), labels].sum()
            return 2.0 * torch.autograd.grad(log_p, x)[0]

    z = sample(denoiser, (2, *bundle.latent_shape), bundle.schedule, sampler,
               prediction_type=bundle.prediction_type, seeds=seeds, cond_fn=cond_fn)  # fmt: skip
    expected = _by_hand_uint8(bundle, z)
    assert got.dtype == np.uint8 and got.shape == (2, 32, 32, 1)
    # the CFG halves run as one batch of 2B in generate, two batches here: float rounding may flip a level
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)
    assert (got != expected).mean() < 0.01
    without_classifier = generate(
        bundle.unet, LatentCodec.of(bundle), bundle.conditioner, GuidanceSetting("cfg", cfg_scale=3.0, rescale_phi=0.5,
        negative=4), sampler, bundle.schedule, bundle.prediction_type, labels, seeds,
        latent_shape=bundle.latent_shape, negative_condition=torch.tensor([4]),
    )  # fmt: skip
    assert not np.array_equal(without_classifier, got)  # the classifier term is not a no-op here


def test_classifier_kind_samples_the_null_condition(tiny_run):
    """Kind "classifier" at s_cls = 0 is the plain unconditional chain: eps(z_t, t, null), whatever the labels."""
    bundle, classifier = tiny_run
    sampler, seeds = DDIMSampler(num_steps=3), [1, 2]
    got = generate(bundle.unet, LatentCodec.of(bundle), bundle.conditioner, GuidanceSetting("classifier"),
                   sampler, bundle.schedule, bundle.prediction_type, torch.tensor([3, 8]), seeds,
                   latent_shape=bundle.latent_shape)  # fmt: skip
    null = bundle.conditioner(torch.tensor([bundle.conditioner.null_index] * 2))
    z = sample(lambda x, t: bundle.unet(x, t, *null), (2, *bundle.latent_shape), bundle.schedule, sampler,
               prediction_type=bundle.prediction_type, seeds=seeds)  # fmt: skip
    np.testing.assert_array_equal(got, _by_hand_uint8(bundle, z))


def test_classifier_guidance_needs_a_classifier_and_labels(tiny_run):
    bundle, classifier = tiny_run
    args = (bundle.unet, LatentCodec.of(bundle), bundle.conditioner, GuidanceSetting("classifier", cls_scale=1.0),
            DDIMSampler(num_steps=2), bundle.schedule, bundle.prediction_type, torch.tensor([0]), [0])  # fmt: skip
    with pytest.raises(ValueError, match="needs a classifier"):
        generate(*args, latent_shape=bundle.latent_shape, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="needs the labels"):
        generate(*args, latent_shape=bundle.latent_shape, classifier=classifier)


# --- the codec -------------------------------------------------------------------------------------


def test_codec_scale_factor_moments_and_round_trip(tiny_run):
    bundle, _ = tiny_run
    codec = LatentCodec.of(bundle)
    assert (
        codec.scale_factor == 0.5 == bundle.scale_factor
        and codec.fingerprint == bundle.autoencoder_fingerprint
    )
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = bundle.autoencoder.encode(images)
    # z = scale_factor * mean of q(z | x), or a draw from it with the given generator
    torch.testing.assert_close(codec.encode(images, sample=False), posterior.mean * 0.5)
    drawn = codec.encode(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(drawn, posterior.sample(torch.Generator().manual_seed(3)) * 0.5)
    # the latent cache's moments give the same latents as the images
    moments = codec.moments(images)
    assert moments.shape == (3, 8, 8, 8)
    torch.testing.assert_close(codec.encode_moments(moments, sample=False), posterior.mean * 0.5)
    torch.testing.assert_close(codec.encode_batch({"moments": moments, "image": None}, sample=False),
                               codec.encode_batch({"image": images}, sample=False))  # fmt: skip
    # decoding divides by the scale factor again: decode(encode(x)) = D(mean), clamped to [-1, 1]
    with torch.no_grad():
        decoded_by_hand = bundle.autoencoder.decode(posterior.mean).clamp(-1, 1)
    torch.testing.assert_close(codec.decode(codec.encode(images, sample=False)), decoded_by_hand)
    as_uint8 = codec.decode_uint8(codec.encode(images, sample=False))
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (3, 32, 32, 1)
    np.testing.assert_array_equal(
        as_uint8, ((decoded_by_hand + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    )


def test_codec_shapes_and_checks(tiny_run):
    bundle, _ = tiny_run
    codec = LatentCodec.of(bundle)
    assert codec.latent_shape(32) == tuple(tiny.LATENT_SHAPE) and codec.decoded_shape([4, 8, 8]) == (
        1,
        32,
        32,
    )
    codec.check_latents([4, 8, 8], "here", channels=1, image_size=32)
    codec.check_latents([4, 16, 16], "here")  # no data shape given: the channels alone
    with pytest.raises(StageMismatchError, match="here: latents have 3 channels, its autoencoder 4"):
        codec.check_latents([3, 8, 8], "here")
    with pytest.raises(StageMismatchError, match=r"decoded samples are \(1, 32, 32\).*\(3, 32, 32\)"):
        codec.check_latents([4, 8, 8], "here", channels=3, image_size=32)
    with pytest.raises(ValueError):
        codec.latent_shape(30)  # not divisible by the autoencoder's downsampling


def test_a_module_holding_a_codec_does_not_own_the_autoencoder(tiny_run):
    bundle, _ = tiny_run
    holder = torch.nn.Module()
    holder.net = torch.nn.Linear(2, 2)
    holder.codec = LatentCodec.of(bundle)
    assert set(holder.state_dict()) == {"net.weight", "net.bias"}
    assert len(list(holder.parameters())) == 2
    assert all(not p.requires_grad for p in holder.codec.autoencoder.parameters())
