"""Feature extractors: checkpoint round trip, clear errors, the Inception adapter, cached reference stats."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.images import to_float_nchw
from eval import features
from eval.features import DomainFeatures, FeatureExtractor, InceptionFeatures
from lightning_modules.artifacts import StageMismatchError, UnsafeCheckpointError, feature_net_artifacts
from lightning_modules.nets.feature_net import FeatureNet


@pytest.fixture
def feature_net() -> FeatureNet:
    torch.manual_seed(0)
    return FeatureNet(in_channels=1, num_classes=10, widths=(8, 16), dropout=0.5).eval()


def _save_checkpoint(net: FeatureNet, path: Path, **extra) -> Path:
    """As the feature_net stage writes it (its writer), plus `extra` top-level keys."""
    torch.save({"stage": "feature_net", **feature_net_artifacts(net, "eval"), **extra}, path)
    return path


def _images(n: int = 6, size: int = 12, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_domain_features_round_trip(feature_net, tmp_path):
    # A Lightning checkpoint of ours: plain hyper-parameters beside the artifact, loaded weights-only.
    ckpt = _save_checkpoint(feature_net, tmp_path / "final.ckpt", hyper_parameters={"lr": 1e-3}, epoch=2)
    extractor = DomainFeatures(str(ckpt))
    assert (extractor.feature_dim, extractor.num_classes) == (16, 10)

    images = _images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        expected = feature_net(x)
        got_uint8, got_float = extractor(images), extractor(x)
    for got in (got_uint8, got_float):
        assert set(got) == {"pooled", "logits"}
        torch.testing.assert_close(got["pooled"], expected["pooled"], rtol=0, atol=0)
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=0)

    extractor.train()  # e.g. a parent module switched to training: dropout must stay off
    torch.testing.assert_close(extractor(images)["logits"], expected["logits"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in extractor.parameters())


def test_domain_features_errors_name_the_file(feature_net, tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        DomainFeatures(str(missing))
    bad = tmp_path / "autoencoder.ckpt"
    torch.save({"state_dict": feature_net.state_dict()}, bad)
    with pytest.raises(StageMismatchError, match="autoencoder.ckpt .*expected stage 'feature_net'"):
        DomainFeatures(str(bad))
    old = _save_checkpoint(feature_net, tmp_path / "old.ckpt")
    ckpt = torch.load(old, weights_only=True)
    del ckpt["feature_net_hparams"]
    torch.save(ckpt, old)
    with pytest.raises(StageMismatchError, match=r"old.ckpt .*lacks \['feature_net_hparams'\]"):
        DomainFeatures(str(old))
    # A checkpoint holding objects the safe unpickler refuses is not loaded with the full one.
    unsafe = _save_checkpoint(feature_net, tmp_path / "unsafe.ckpt", hyper_parameters=argparse.Namespace(lr=1e-3))
    with pytest.raises(UnsafeCheckpointError, match="unsafe.ckpt .*weights_only=True"):
        DomainFeatures(str(unsafe))


def test_fingerprint_tracks_weights(feature_net, tmp_path):
    ckpt = _save_checkpoint(feature_net, tmp_path / "a.ckpt")
    first, second = DomainFeatures(ckpt), DomainFeatures(ckpt)
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 64 and int(first.fingerprint(), 16) >= 0
    with torch.no_grad():
        second.net.head.bias[0] += 1e-6
    assert first.fingerprint() != second.fingerprint()


def test_inception_without_weights_names_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    expected = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert features.default_inception_weights_path() == expected
    with pytest.raises(FileNotFoundError) as err:
        InceptionFeatures()
    assert str(expected) in str(err.value) and "model.features.weights_path" in str(err.value)
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        InceptionFeatures(tmp_path / "elsewhere.pth")


def test_inception_without_package_names_file_and_key(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not used")
    monkeypatch.setattr(features, "_inception_backend", lambda: None)
    with pytest.raises(ImportError, match="torch-fidelity") as err:
        InceptionFeatures(weights)
    assert str(weights) in str(err.value) and "model.features.weights_path" in str(err.value)


class _FakeInceptionBackend(nn.Module):
    """Stands in for torch-fidelity's FeatureExtractorInceptionV3: records what it is fed."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str) -> None:
        super().__init__()
        self.init_args = (name, list(features_list), feature_extractor_weights_path)
        self.seen: list[torch.Tensor] = []
        self.scale = nn.Parameter(torch.ones(()))
        self.Mixed_6d = nn.Module()  # where InceptionFeatures hooks sFID's spatial features
        self.Mixed_6d.branch1x1 = nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x)
        flat = x.float().mean(dim=(1, 2, 3))[:, None] * self.scale
        self.Mixed_6d.branch1x1(flat[:, :, None, None].expand(-1, 192, 17, 17))
        return flat.expand(-1, 2048), flat.expand(-1, 1008)


def test_inception_adapter_feeds_uint8_rgb(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"fake")
    monkeypatch.setattr(features, "_inception_backend", lambda: _FakeInceptionBackend)
    extractor = InceptionFeatures(str(weights))
    assert extractor.net.init_args == ("inception-v3-compat", ["2048", "logits_unbiased"], str(weights))

    images = _images(n=3, size=10)
    out = extractor(images)
    assert out["pooled"].shape == (3, 2048) and out["logits"].shape == (3, 1008) and out["spatial"].shape == (3, 2023)
    fed = extractor.net.seen[-1]
    assert fed.dtype == torch.uint8 and fed.shape == (3, 3, 10, 10)
    expected = torch.from_numpy(images[..., 0])[:, None].expand(-1, 3, -1, -1)
    torch.testing.assert_close(fed, expected, rtol=0, atol=0)
    # Float input in [-1, 1] is quantised exactly as samples are saved to uint8.
    extractor(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    torch.testing.assert_close(extractor.net.seen[-1], expected, rtol=0, atol=0)


class _CountingExtractor(FeatureExtractor):
    name = "counting"
    feature_dim = 4
    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(2, 7)
        self.calls = 0
        self._freeze()

    def forward(self, images):
        self.calls += 1
        x = to_float_nchw(images)
        stats = torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))], dim=1)
        h = self.proj(stats)
        return {"pooled": h[:, :4], "logits": h[:, 4:]}


def test_extract_features_batches(tmp_path):
    extractor = _CountingExtractor()
    images = _images(n=7)
    batched = features.extract_features(extractor, images, batch_size=3)
    assert extractor.calls == 3
    whole = {k: v.detach().numpy() for k, v in extractor(images).items()}
    assert batched["pooled"].shape == (7, 4) and batched["logits"].shape == (7, 3)
    for key in ("pooled", "logits"):
        np.testing.assert_allclose(batched[key], whole[key], rtol=1e-6, atol=1e-6)
    from_iterable = features.extract_features(extractor, iter([images[:5], images[5:]]))
    # Batches of 5 + 2 rather than 3 + 3 + 1: the matmul's rounding may depend on the batch (one float32 ulp on an
    # Intel Xeon with AMX), so equal to the same tolerance as above, not bit for bit.
    np.testing.assert_allclose(from_iterable["pooled"], batched["pooled"], rtol=1e-6, atol=1e-6)


def _key(split: str = "test", **change) -> dict:
    key = {"split": split, "content": {"shards_sha256": ["0123456789abcdef" * 4]}, "num_images": 9,
           "preprocessing": {"image_size": 12, "channels": 1, "resize": "pad"}}  # fmt: skip
    return {**key, **change}


def test_reference_statistics_cached_and_reused(tmp_path):
    extractor = _CountingExtractor()
    images = _images(n=9)
    stats = features.reference_statistics(extractor, images, tmp_path / "cache", _key(), batch_size=4)
    assert extractor.calls == 3
    expected_file = features.reference_cache_path(tmp_path / "cache", _key(), extractor)
    assert expected_file.name.startswith("ref_test_")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [expected_file.name]

    pooled = features.extract_features(extractor, images)["pooled"].astype(np.float64)
    np.testing.assert_allclose(stats["mu"], pooled.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(pooled, rowvar=False), rtol=1e-5, atol=1e-8)
    assert stats["n"] == 9 and stats["pooled"].shape == (9, 4)
    calls = extractor.calls

    def must_not_be_read():
        raise AssertionError("images consumed although the cache is warm")
        yield  # pragma: no cover

    again = features.reference_statistics(extractor, must_not_be_read(), tmp_path / "cache", _key())
    assert extractor.calls == calls
    assert again["n"] == 9 and isinstance(again["n"], int) and again["key"] == stats["key"]
    for key in ("mu", "sigma", "pooled"):
        np.testing.assert_array_equal(again[key], stats[key])

    # Anything that changes the real images is a new cache entry (and a new scorer fingerprint).
    changes = [_key("val"), _key(content={"shards_sha256": ["f" * 64]}), _key(num_images=8),
               _key(preprocessing={"image_size": 12, "channels": 1, "resize": "resize"}),
               _key(content={"urls_sha256": "e" * 64})]  # fmt: skip
    for i, key in enumerate(changes, 2):
        changed = features.reference_statistics(extractor, images, tmp_path / "cache", key)
        assert extractor.calls > calls and changed["key"] != stats["key"], key
        calls = extractor.calls
        assert len(list((tmp_path / "cache").iterdir())) == i


def test_reference_file_of_another_key_is_not_reused(tmp_path):
    """A file at the key's path whose stored key differs (a renamed copy, a hash prefix clash) is recomputed."""
    extractor = _CountingExtractor()
    path = features.reference_cache_path(tmp_path, _key(), extractor)
    features.reference_statistics(extractor, _images(n=9), tmp_path, _key("val"))
    features.reference_cache_path(tmp_path, _key("val"), extractor).rename(path)
    calls = extractor.calls
    features.reference_statistics(extractor, _images(n=9), tmp_path, _key())
    assert extractor.calls > calls
