"""guided-diffusion reference batches (.npz) as reference statistics, and what every report says about how
its numbers were computed (feature net, weights sha256, reference, IS split convention, samples, seeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from core.images import to_float_nchw
from core.io import sha256_file
from eval.features import FeatureExtractor, extract_features, load_reference_batch, reference_statistics
from eval.job import SweepJob
from eval.metrics import feature_statistics, frechet_distance
from eval.scoring import Scorer
from eval.settings import expand_settings
from eval.sweep_report import collect_rows, write_sweep_report
from tests.unit.test_sweep import CountingGenerator


class _SpatialExtractor(FeatureExtractor):
    """A tiny extractor with pooled (4-d), logits (3) and spatial (5-d) features, weights read from a file."""

    name = "tiny_spatial"
    feature_dim = 4
    num_classes = 3
    spatial_dim = 5

    def __init__(self, weights_file=None, spatial: bool = True) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Linear(3, 12)
        self.weights_file = weights_file
        self.spatial_dim = 5 if spatial else None
        self.calls = 0
        self._freeze()

    def forward(self, images):
        self.calls += 1
        x = to_float_nchw(images)
        stats = torch.stack([x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)
        h = torch.tanh(self.proj(stats)) + 0.1 * self.proj(stats) ** 2
        out = {"pooled": h[:, :4], "logits": h[:, 4:7]}
        return {**out, "spatial": h[:, 7:]} if self.spatial_dim else out


def _images(n: int, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _batch(path, images=None, **change) -> dict:
    """A reference batch as guided-diffusion writes it: mu, sigma, mu_s, sigma_s (and arr_0, its images)."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(5, 5))
    arrays = {"mu": rng.normal(size=4), "sigma": a @ a.T + np.eye(4), "mu_s": rng.normal(size=5),
              "sigma_s": b @ b.T + np.eye(5)}  # fmt: skip
    if images is not None:
        arrays["arr_0"] = images
    arrays = {k: v for k, v in {**arrays, **change}.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_reference_batch_replaces_the_split_statistics(tmp_path):
    extractor = _SpatialExtractor()
    images = _images(9)
    arrays = _batch(tmp_path / "VIRTUAL_ref.npz", images)
    stats = load_reference_batch(tmp_path / "VIRTUAL_ref.npz", extractor, tmp_path / "cache", batch_size=4)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(stats[key], arrays[key])
    # The batch's images give the features precision/recall and KID compare with, as in guided-diffusion.
    np.testing.assert_allclose(stats["pooled"], extract_features(extractor, images)["pooled"], rtol=1e-6)
    assert stats["n"] == 9 and stats["source"] == str(tmp_path / "VIRTUAL_ref.npz")
    assert stats["sha256"] == sha256_file(tmp_path / "VIRTUAL_ref.npz")
    calls = extractor.calls
    again = load_reference_batch(tmp_path / "VIRTUAL_ref.npz", extractor, tmp_path / "cache")
    assert extractor.calls == calls and again["key"] == stats["key"]  # images read once (cached by sha256)

    fake = _images(6, seed=1)
    row = Scorer(extractor, stats, "manifest", num_classes=3, is_splits=2, pr_k=2)(fake, np.arange(6) % 3)
    feats = extract_features(extractor, fake)
    assert row["fid"] == pytest.approx(frechet_distance(arrays["mu"], arrays["sigma"], *feature_statistics(feats["pooled"])))
    assert row["sfid"] == pytest.approx(
        frechet_distance(arrays["mu_s"], arrays["sigma_s"], *feature_statistics(feats["spatial"]))
    )
    assert row["precision"] is not None and row["reference"] == stats["source"]
    assert row["reference_sha256"] == stats["sha256"]


def test_reference_batch_without_images_or_spatial_statistics(tmp_path):
    _batch(tmp_path / "stats_only.npz", mu_s=None, sigma_s=None)
    stats = load_reference_batch(tmp_path / "stats_only.npz", _SpatialExtractor(), tmp_path / "cache")
    assert stats["pooled"] is None and stats["n"] is None and "mu_s" not in stats
    row = Scorer(_SpatialExtractor(), stats, "m", num_classes=3, is_splits=2, kid=True)(_images(6), np.zeros(6))
    assert np.isfinite(row["fid"])
    assert row["sfid"] is None and row["precision"] is None and row["recall"] is None and row["kid_mean"] is None
    # An extractor without spatial features (the domain net) ignores mu_s / sigma_s: sFID is n/a.
    _batch(tmp_path / "full.npz")
    assert "mu_s" not in load_reference_batch(tmp_path / "full.npz", _SpatialExtractor(spatial=False), tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing extracted without images


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"mu": np.zeros(3)}, ValueError, r"key 'mu' has shape \(3,\), but the tiny_spatial features are 4-d"),
        ({"sigma_s": np.eye(4)}, ValueError, r"key 'sigma_s' has shape \(4, 4\).*expected \(5, 5\)"),
        ({"sigma": None}, KeyError, r"lacks \['sigma'\]"),
        ({"sigma_s": None}, KeyError, r"lacks \['sigma_s'\]"),
        ({"sigma": np.full((4, 4), np.nan)}, ValueError, "key 'sigma' must hold finite floats"),
        ({"mu": np.array(["a"] * 4)}, ValueError, "key 'mu' must hold finite floats, got dtype <U1"),
        ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, ValueError, "key 'arr_0' must be uint8 images"),
    ],
)
def test_reference_batch_errors_name_the_file_and_key(tmp_path, change, error, match):
    path = tmp_path / "ref.npz"
    _batch(path, **change)
    with pytest.raises(error, match=match) as err:
        load_reference_batch(path, _SpatialExtractor(), tmp_path / "cache")
    assert f"reference.stats={path}" in str(err.value)
    assert not list((tmp_path / "cache").glob("*.npz")) if (tmp_path / "cache").exists() else True


def test_reference_batch_missing_or_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"reference.stats=.*nope.npz: no such file"):
        load_reference_batch(tmp_path / "nope.npz", _SpatialExtractor(), tmp_path)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"reference.stats=.*text.npz is not a readable .npz"):
        load_reference_batch(tmp_path / "text.npz", _SpatialExtractor(), tmp_path)


def test_reports_name_features_weights_reference_is_convention_and_seeds(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"the extractor's weights")
    extractor = _SpatialExtractor(weights)
    key = {"split": "test", "content": {"shards_sha256": ["0" * 64]}, "num_images": 12}
    reference = reference_statistics(extractor, _images(12, seed=3, size=4), tmp_path / "cache", key)
    assert reference["mu_s"].shape == (5,) and reference["sigma_s"].shape == (5, 5)
    for split_size, convention in ((None, "5 splits of 2 samples (torch-fidelity, Salimans et al.)"),
                                   (4, "splits of 4 samples (guided-diffusion): 3 of 10")):  # fmt: skip
        out = tmp_path / f"sweep_{split_size}"
        scorer = Scorer(extractor, reference, "manifest", num_classes=3, is_splits=5, is_split_size=split_size, pr_k=2)
        job = SweepJob(out_dir=out, settings=expand_settings("cfg", [1, 3]), generator=CountingGenerator(),
                       scorer=scorer, num_samples=10, num_classes=3, batch_size=5, sample_seed=7,
                       progress=False, log=lambda _: None)  # fmt: skip
        job.run()
        metrics = json.loads((out / "cfg_s3" / "metrics.json").read_text())
        expected = {"feature_net": "tiny_spatial", "feature_weights_sha256": sha256_file(weights),
                    "reference": "split test (12 images)", "reference_sha256": reference["key"],
                    "is_convention": convention, "num_samples": 10, "seeds": "7..16 (sample i: sample_seed + i)"}  # fmt: skip
        assert {k: metrics[k] for k in expected} == expected and metrics["sfid"] is not None
        outputs = write_sweep_report(out, collect_rows(out), "sweep", {"dataset": "tiny"})
        results = json.loads(outputs["results_json"].read_text())
        assert all({k: row[k] for k in expected} == expected for row in results)
        report = outputs["report"].read_text()
        header = report.split("## Best setting")[0]
        for key, value in expected.items():
            if key != "num_samples":
                assert f"| {key} | {value} |" in header  # once, in the header, not as table columns
        table = report.split("## Results")[1]
        assert "sfid" in table and "is_convention" not in table and "feature_weights_sha256" not in table
        # Another IS convention is another scorer: the scores are not reused.
        assert scorer.fingerprint()["is_split_size"] == split_size
