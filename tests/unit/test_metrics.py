"""Metrics against closed forms and brute-force references written here, independent of eval.metrics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from eval import metrics


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fid(x: np.ndarray, y: np.ndarray) -> float:
    """Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2): a symmetric PSD form, no scipy.linalg.sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    r1 = _psd_sqrt(s1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_matches_reference_on_random_features():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    expected = _reference_fid(real, fake)
    assert metrics.fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    real32, fake32 = (a.astype(np.float32).astype(np.float64) for a in (real, fake))
    got = metrics.fid_from_features(torch.from_numpy(real).float(), torch.from_numpy(fake).float())
    assert got == pytest.approx(_reference_fid(real32, fake32), rel=1e-6)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_of_identical_sets_is_zero():
    feats = np.random.default_rng(1).normal(size=(2000, 8))
    assert abs(metrics.fid_from_features(feats, feats.copy())) < 1e-6


def test_fid_grows_with_mean_shift_by_exactly_the_squared_shift():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(500, 6))
    direction = rng.normal(size=6)
    direction /= np.linalg.norm(direction)
    fids = [metrics.fid_from_features(real, real + t * direction) for t in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in itertools.pairwise(fids))
    # Shifting every point leaves the covariance unchanged, so FID is exactly ||shift||^2.
    np.testing.assert_allclose(fids, [0.0, 0.25, 1.0, 4.0, 16.0], atol=1e-6)


def test_fid_singular_covariance_is_finite():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(5, 16)), rng.normal(size=(6, 16)) + 1.0  # N < D: rank-deficient
    fid = metrics.fid_from_features(real, fake)
    assert np.isfinite(fid) and fid > 0
    zero = np.zeros((4, 4))
    assert metrics.frechet_distance(np.zeros(4), zero, np.ones(4), zero) == pytest.approx(4.0, abs=1e-4)


def test_frechet_distance_rejects_large_imaginary_root():
    # diag(1, -1) is not a covariance; its square root is genuinely complex.
    with pytest.raises(ValueError, match="imaginary"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_feature_statistics_match_numpy():
    feats = np.random.default_rng(4).normal(size=(50, 3))
    mu, sigma = metrics.feature_statistics(feats)
    np.testing.assert_allclose(mu, feats.mean(0))
    np.testing.assert_allclose(sigma, (feats - feats.mean(0)).T @ (feats - feats.mean(0)) / 49)


def test_sample_count_check():
    assert metrics.min_samples_for_fid(2048) == 2049
    metrics.check_sample_count(2049, 2048)
    with pytest.raises(ValueError, match="more samples than feature dimensions"):
        metrics.check_sample_count(2048, 2048)


def _brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return [
            sorted(np.linalg.norm(x[j] - x[i]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))
        ]

    def fraction_inside(queries, refs, ref_radii):
        inside = [any(np.linalg.norm(q - refs[j]) <= ref_radii[j] for j in range(len(refs))) for q in queries]
        return sum(inside) / len(queries)

    return fraction_inside(fake, real, radii(real)), fraction_inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(30, 5)) * 1.3 + 0.4
    got = metrics.precision_recall(real, fake, k=k, batch_size=7)
    assert got == pytest.approx(_brute_force_precision_recall(real, fake, k), abs=1e-12)


def test_precision_recall_regimes():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(500, 2))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, rng.normal(size=(500, 2)) + 20.0) == (0.0, 0.0)
    precision, recall = metrics.precision_recall(real, rng.normal(size=(500, 2)))
    assert precision > 0.85 and recall > 0.85
    precision, recall = metrics.precision_recall(real, 0.1 * rng.normal(size=(500, 2)))
    assert precision > 0.95 and recall < 0.3


def test_inception_score_closed_forms():
    k = 5
    assert metrics.inception_score(np.zeros((40, k)), splits=4) == pytest.approx((1.0, 0.0))
    balanced = np.eye(k)[np.arange(40) % k]
    assert metrics.inception_score(balanced, splits=4, from_logits=False) == pytest.approx((k, 0.0))
    assert metrics.inception_score(100.0 * balanced, splits=4) == pytest.approx((k, 0.0), abs=1e-9)
    # Splits are consecutive chunks: one chunk of a single class (IS 1), one balanced chunk (IS K).
    mixed = np.concatenate([np.eye(k)[np.zeros(10, dtype=int)], np.eye(k)[np.arange(10) % k]])
    mean, std = metrics.inception_score(mixed, splits=2, from_logits=False)
    assert (mean, std) == pytest.approx(((1 + k) / 2, (k - 1) / 2))


def test_inception_score_matches_direct_formula():
    logits = np.random.default_rng(6).normal(size=(30, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p.mean(0)
    expected = np.exp(np.mean([sum(pi * np.log(pi / py)) for pi in p]))
    assert metrics.inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-12)


def _brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kern = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m = len(x)
    kxx = sum(kern(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(kern(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(kern(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_matches_brute_force_unbiased_mmd():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.5
    # subset_size is clipped to 12, so every subset is a permutation of the full sets.
    mean, std = metrics.kid(real, fake, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(_brute_force_mmd2(fake, real), rel=1e-10)
    assert std < 1e-10


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(600, 8))
    same_mean, same_std = metrics.kid(real, rng.normal(size=(600, 8)), num_subsets=20, subset_size=200)
    shifted_mean, shifted_std = metrics.kid(
        real, rng.normal(size=(600, 8)) + 1.0, num_subsets=20, subset_size=200
    )
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 0.1 and shifted_mean > 10 * shifted_std


def test_class_accuracy():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 1.0]])
    assert metrics.class_accuracy(logits, np.array([0, 1, 1, 1])) == 0.75
    assert metrics.class_accuracy(torch.tensor(logits), torch.tensor([0, 1, 0, 1])) == 1.0
