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


def test_fid_with_dead_features_has_no_eps_bias():
    """Features constant over every sample (dead ReLU units) make both covariances singular; their
    dimensions add nothing to the distance. Adding eps * I to both covariances (as before, and as pytorch-fid
    does) lowered FID by ~1e-5 relative here; the exact eigenvalue trace gives the live dimensions' FID."""
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(200, 40)), rng.normal(size=(150, 40)) * 1.2 + 0.3
    real[:, 30:] = fake[:, 30:] = 0.0
    live = metrics.fid_from_features(real[:, :30], fake[:, :30])
    assert metrics.fid_from_features(real, fake) == pytest.approx(live, rel=1e-10)
    with pytest.raises(ValueError, match="positive semi-definite"):  # the exact path still refuses non-covariances
        metrics.frechet_distance(np.zeros(3), np.diag([1.0, 0.0, -1.0]), np.zeros(3), np.diag([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("shape", [(400, 24), (6, 300)], ids=["full-rank", "rank-deficient"])
def test_fid_matches_torch_fidelity_formula(shape):
    """torch-fidelity's FID (metric_fid: statistics, then the trace from the product's eigenvalues) on the
    same float64 features; the network side of the parity is tests/unit/test_fidelity.py."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(9)
    real, fake = rng.normal(size=shape), rng.normal(size=(shape[0] + 1, shape[1])) * 1.3 + 0.5
    stats = [fid_features_to_statistics(torch.from_numpy(x)) for x in (real, fake)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    # Full rank: the same number up to round-off. Rank 5 of 300: the traces sum ~295 square roots of
    # eigenvalues that are round-off around 0, computed differently (measured rel 6e-10).
    assert metrics.fid_from_features(real, fake) == pytest.approx(theirs, rel=1e-12 if shape[0] > shape[1] else 1e-8)


def test_inception_score_split_conventions():
    bounds = lambda chunks: [(c.start, c.stop) for c in chunks]  # noqa: E731
    # S equal splits cut at floor(i N / S), as improved-gan and torch-fidelity cut them (not np.array_split).
    assert bounds(metrics.inception_score_splits(12, 5)) == [(0, 2), (2, 4), (4, 7), (7, 9), (9, 12)]
    assert bounds(metrics.inception_score_splits(10000, 10)) == [(i, i + 1000) for i in range(0, 10000, 1000)]
    # Chunks of M samples, the last one shorter, as guided-diffusion's evaluator (M = 5000).
    assert bounds(metrics.inception_score_splits(12000, split_size=5000)) == [(0, 5000), (5000, 10000), (10000, 12000)]
    assert metrics.describe_is_splits(10000) == "10 splits of 1000 samples (torch-fidelity, Salimans et al.)"
    assert metrics.describe_is_splits(12, 5) == "5 splits of 2-3 samples (torch-fidelity, Salimans et al.)"
    assert metrics.describe_is_splits(12000, split_size=5000) == "splits of 5000 samples (guided-diffusion): 3 of 12000"
    for bad in ({"splits": 0}, {"splits": 13}, {"splits": True}, {"splits": None}, {"split_size": 0}):
        with pytest.raises(ValueError, match="split"):
            metrics.inception_score_splits(12, **bad)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = (3 * np.random.default_rng(10).normal(size=(23, 11))).astype(np.float32)
    for splits in (1, 2, 5, 23):  # 5 does not divide 23: np.array_split would cut other chunks
        theirs = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=False)
        mean, std = metrics.inception_score(logits, splits=splits)
        assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
        assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9, abs=1e-13)
    # torch-fidelity's default shuffles the rows (numpy RandomState(rng_seed=2020)) before splitting.
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=5)
    permuted = logits[np.random.RandomState(2020).permutation(len(logits))]
    assert metrics.inception_score(permuted, splits=5)[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-12)


def test_inception_score_split_size_is_guided_diffusions_loop():
    """guided-diffusion `evaluations/evaluator.py` `compute_inception_score(activations, split_size=5000)`,
    written out with split_size 7 on 23 samples (chunks 7, 7, 7, 2)."""
    logits = 2 * np.random.default_rng(11).normal(size=(23, 9))
    preds = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), 7):
        part = preds[i : i + 7]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert len(scores) == 4
    mean, std = metrics.inception_score(logits, split_size=7)
    assert (mean, std) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-12)


def test_sfid_is_the_frechet_distance_of_spatial_features():
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(120, 14)), rng.normal(size=(100, 14)) + 0.2
    assert metrics.sfid_from_features(real, fake) == pytest.approx(_reference_fid(real, fake), rel=1e-10)
