"""Our Inception metrics against torch-fidelity on the same images and the same weights file.

No FID weights ship here, so the file is a seeded random-weights InceptionV3 in the exact format torch-fidelity
loads (`tests/random_inception.py`); parity does not depend on the weights' values. What is compared:
the features (our `InceptionFeatures` vs torch-fidelity's own extraction path: the same uint8 input, its
TF1-compatible resize to 299, the same network), the spatial features of sFID (the first 7 channels of
Mixed_6d.branch1x1, guided-diffusion's mixed_6/conv, in TF's HWC order), and, in a slow test, FID and IS of
`Scorer` against `torch_fidelity.calculate_metrics` end to end. The metric formulas themselves are compared
with torch-fidelity's in tests/unit/test_metrics.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.io import sha256_file
from eval import features
from eval.features import INCEPTION_WEIGHTS_FILE, SPATIAL_LAYER, InceptionFeatures, extract_features
from eval.metrics import feature_statistics
from eval.scoring import Scorer
from tests.random_inception import write_random_inception_weights

torch_fidelity = pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> torch.Tensor:
    """The random-weights file under <TORCH_HOME>/hub/checkpoints/, where the real one is looked up."""
    return write_random_inception_weights(tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints", seed=0)


@pytest.fixture(scope="module")
def inception(weights) -> InceptionFeatures:
    return InceptionFeatures(weights)


def _images(n: int, size: int = 24, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


class _UInt8Dataset(torch.utils.data.Dataset):
    """What torch-fidelity takes: a Dataset of uint8 (3, H, W) tensors."""

    def __init__(self, images_nhwc: np.ndarray) -> None:
        self.images = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def _fidelity_features(weights, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """torch-fidelity's own path from a Dataset to features, as calculate_metrics takes it."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    net = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=False,
                                   feature_extractor_weights_path=str(weights), verbose=False)  # fmt: skip
    out = get_featuresdict_from_dataset(_UInt8Dataset(images_nhwc), net, batch_size=64, cuda=False,
                                        save_cpu_ram=True, verbose=False)  # fmt: skip
    return {"pooled": out["2048"].numpy(), "logits": out["logits_unbiased"].numpy()}


def test_random_weights_file_has_the_real_format(weights):
    state = torch.load(weights, weights_only=True)
    assert type(state) is dict and weights.name == INCEPTION_WEIGHTS_FILE
    assert not any(key.endswith("num_batches_tracked") for key in state)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert {key.rsplit(".", 1)[1] for key in state if ".bn." in key} == {"weight", "bias", "running_mean", "running_var"}
    assert all(t.dtype == torch.float32 for t in state.values())
    # torch-fidelity loads it with a strict load_state_dict (a missing or extra key would raise).
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


def test_inception_found_in_the_torch_hub_cache(weights, monkeypatch):
    """InceptionFeatures() with no path reads <TORCH_HOME>/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth."""
    monkeypatch.setenv("TORCH_HOME", str(weights.parents[2]))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert features.default_inception_weights_path() == weights
    extractor = InceptionFeatures()
    out = extractor(_images(2, size=32))
    assert out["pooled"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 2023) == (2, extractor.spatial_dim)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert extractor.weights_sha256() == sha256_file(weights)


def test_features_equal_torch_fidelity_extraction(weights, inception):
    """Same uint8 images, same file: our features are torch-fidelity's (resize to 299 and dtype path included),
    for RGB and for grayscale, which we repeat to RGB (torch-fidelity is given the repeated images)."""
    rgb = _images(3, size=24)
    grey = _images(1, size=20, channels=1, seed=1)
    for ours_in, theirs_in in ((rgb, rgb), (grey, np.repeat(grey, 3, axis=-1))):
        ours = extract_features(inception, ours_in, batch_size=64)
        theirs = _fidelity_features(weights, theirs_in)
        for key in ("pooled", "logits"):
            # Same network, same batch, same input: equal up to float32 round-off (measured: identical).
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-6, err_msg=key)
        if len(ours_in) > 1:
            assert np.std(ours["pooled"], axis=0).max() > 1e-3  # the random weights do tell images apart


def test_spatial_features_are_mixed_6_conv_first_7_channels_in_hwc_order(inception):
    """sFID's features, computed here by running the network's layers by hand up to Mixed_6d.branch1x1
    (guided-diffusion's mixed_6/conv:0, the ReLU output), then [..., :7] of the NHWC map, flattened."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = _images(2, size=24, seed=2)
    net = inception.net
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
        x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):  # fmt: skip
            x = getattr(net, name)(x)
        fmap = net.get_submodule(SPATIAL_LAYER)(x)  # (B, 192, 17, 17)
        spatial = inception(images)["spatial"]
    assert fmap.shape == (2, 192, 17, 17)
    expected = fmap[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC order
    torch.testing.assert_close(spatial, expected, rtol=1e-5, atol=1e-5)
    # Element (h, w, c) of sample 1 is channel c at (h, w): the layout a reference batch's mu_s assumes.
    assert spatial[1].reshape(17, 17, 7)[5, 11, 3] == pytest.approx(float(fmap[1, 3, 5, 11]), rel=1e-5, abs=1e-6)


@pytest.mark.slow  # 32 InceptionV3 forwards at 299 and four ~2048x2048 sqrtm/eigen problems: 434 s on 2 shared cores
def test_scorer_matches_torch_fidelity_calculate_metrics(weights, inception):
    """End to end: `Scorer` (as pipeline.evaluate builds it) on 8 samples against 8 real images, and
    torch_fidelity.calculate_metrics on the same uint8 images with the same weights file.

    Tolerances: IS rel 1e-9 (both float64 from identical float32 logits, the same chunks; only the order of
    the float64 sums differs). FID rel 1e-5: the features are identical, but with 8 samples both 2048x2048
    covariances have rank 7, and the trace of the root of their product is a sum of 2048 square roots of
    eigenvalues of which 2041 are round-off around 0 (torch-fidelity takes sqrt of the unsymmetric product's
    eigenvalues, we of a symmetric PSD form): measured rel 5e-7 on 8 vs 8 random images (rel 1e-4 before the
    eps * I fallback was replaced); torch-fidelity also keeps mu in float32.
    """
    rng = np.random.default_rng(3)
    real = _images(8, size=24, seed=4)
    fake = np.clip(real.astype(int) + rng.integers(-60, 61, real.shape), 0, 255).astype(np.uint8)
    theirs = torch_fidelity.calculate_metrics(
        input1=_UInt8Dataset(fake), input2=_UInt8Dataset(real), fid=True, isc=True, isc_splits=2,
        samples_shuffle=False, feature_extractor_weights_path=str(weights), cuda=False, cache=False,
        save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    real_feats = extract_features(inception, real)
    mu, sigma = feature_statistics(real_feats["pooled"])
    mu_s, sigma_s = feature_statistics(real_feats["spatial"])
    reference = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pooled": real_feats["pooled"],
                 "n": len(real), "key": "test", "source": "8 random images"}  # fmt: skip
    scorer = Scorer(inception, reference, "manifest", num_classes=10, is_splits=2)
    ours = scorer(fake, np.arange(8) % 10)
    assert ours["is_mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-9)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-6, abs=1e-12)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["is_convention"].startswith("2 splits of 4 samples")
    # sFID: the Frechet distance of the spatial features' statistics, written out here.
    fake_s = extract_features(inception, fake)["spatial"].astype(np.float64)
    d = fake_s.mean(0) - mu_s
    cov = np.cov(fake_s, rowvar=False)
    w, v = np.linalg.eigh(sigma_s)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov @ root), 0, None)).sum()
    assert ours["sfid"] == pytest.approx(d @ d + np.trace(sigma_s) + np.trace(cov) - 2 * tr_root, rel=1e-6)
