"""Sample-quality metrics as pure functions over precomputed features (float64 throughout).

Feature extraction lives in `eval.features`; these functions only see arrays, so they are testable
against closed forms and brute-force references, and reusable with any feature network.
Inputs may be numpy arrays or torch tensors; outputs are Python floats.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_2d(name: str, x: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {x.shape}")


def min_samples_for_fid(feature_dim: int) -> int:
    """Fewest samples whose (N-1)-normalised covariance can have full rank D: N - 1 >= D."""
    return int(feature_dim) + 1


def check_sample_count(n: int, feature_dim: int) -> None:
    """Raise ValueError when `n` samples cannot give a full-rank covariance of `feature_dim` features.

    Meant to run before sampling, so a sweep does not spend hours on samples it cannot score.
    """
    need = min_samples_for_fid(feature_dim)
    if n < need:
        raise ValueError(
            f"FID needs more samples than feature dimensions: {n} samples give a covariance of rank at "
            f"most {max(n - 1, 0)}, but the features are {feature_dim}-dimensional, so the {feature_dim}x"
            f"{feature_dim} covariance would be singular and FID meaningless. Use at least {need} samples "
            f"(in practice many more: FID is biased upwards for small N), or a lower-dimensional extractor."
        )


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) -> (mu (D,), sigma (D, D)), sigma the unbiased (N-1) covariance as in pytorch-fid."""
    x = _as_float64(features)
    _check_2d("features", x)
    if len(x) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, bool]:
    """sqrtm(sigma1 @ sigma2) and whether scipy flagged the product as singular."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    return covmean, singular


def _trace_sqrt_psd_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (sigma1 sigma2)^(1/2) for covariances sigma1, sigma2, singular or not: sigma1 sigma2 has the eigenvalues
    of the PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2) (AB and BA share their non-zero eigenvalues), so the trace
    of its principal root is the sum of their square roots; round-off negatives count as 0."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    scale = max(float(np.abs(w).max(initial=0.0)), float(np.abs(lam).max(initial=0.0)), 1e-300)
    if w.min(initial=0.0) < -1e-6 * scale or lam.min(initial=0.0) < -1e-6 * scale:
        raise ValueError("sigma1 and sigma2 must be covariances (symmetric positive semi-definite): "
                         f"eigenvalues down to {min(w.min(), lam.min()):.3g}")  # fmt: skip
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    mu: (D,), sigma: (D, D). Tr (sigma1 sigma2)^(1/2) comes from scipy's sqrtm, as in pytorch-fid and
    guided-diffusion. When sqrtm flags the product as singular (fewer samples than dimensions, dead features)
    or its root is not finite, the trace is taken exactly from the eigenvalues instead (as torch-fidelity
    does, `_trace_sqrt_psd_product`), not by adding eps * I to both covariances as pytorch-fid does, which
    lowers the distance by about 2 eps per null direction (4e-3 for 2048-d Inception features of few samples).
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")

    covmean, singular = _sqrtm_product(sigma1, sigma2)
    if singular or not np.isfinite(covmean).all():
        tr_covmean = _trace_sqrt_psd_product(sigma1, sigma2)
    else:
        if np.iscomplexobj(covmean):
            # A PSD product has a real root; small imaginary parts are round-off, large ones a real failure.
            max_imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component ({max_imag:.3g})")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))

    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_from_features(real: ArrayLike, fake: ArrayLike) -> float:
    """FID between real features (N, D) and generated features (M, D)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


IS_SPLIT_CONVENTIONS = ("splits", "split_size")


def inception_score_splits(n: int, splits: int | None = 10, split_size: int | None = None) -> list[slice]:
    """The consecutive chunks of N samples that the Inception Score averages over, in one of two conventions:

    splits=S (split_size None): S chunks with bounds floor(i N / S), as the original code of Salimans et al.
        (openai/improved-gan `inception_score/model.py`) and torch-fidelity (`isc_features_to_metric`) cut them;
    split_size=M: chunks of M samples, the last one shorter when M does not divide N, as guided-diffusion's
        evaluator (`evaluations/evaluator.py`, `compute_inception_score`, M = 5000) cuts them.
    """
    if split_size is not None:
        if isinstance(split_size, bool) or not isinstance(split_size, int) or split_size < 1:
            raise ValueError(f"split_size must be an integer >= 1, got {split_size!r}")
        return [slice(start, min(start + split_size, n)) for start in range(0, n, split_size)]
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= n:
        raise ValueError(f"splits must be an integer in [1, N={n}], got {splits!r}")
    return [slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def describe_is_splits(n: int, splits: int | None = 10, split_size: int | None = None) -> str:
    """What a report says about the split convention, e.g. "10 splits of 1000" or "splits of 5000 (2 of 10000)"."""
    chunks = inception_score_splits(n, splits, split_size)
    sizes = sorted({c.stop - c.start for c in chunks})
    size = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    if split_size is not None:
        return f"splits of {split_size} samples (guided-diffusion): {len(chunks)} of {n}"
    return f"{len(chunks)} splits of {size} samples (torch-fidelity, Salimans et al.)"


def inception_score(
    logits_or_probs: ArrayLike, splits: int | None = 10, from_logits: bool = True, split_size: int | None = None
) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, Sec. 4).

    logits_or_probs: (N, K). The N samples are cut in consecutive chunks (`inception_score_splits`: `splits`
    equal chunks, or chunks of `split_size` samples when it is set); p(y) is the mean prediction of each chunk.
    Samples are not shuffled (torch-fidelity shuffles by default: the same score on permuted rows).
    Returns (mean, std) of the per-chunk scores; guided-diffusion reports the mean.
    """
    x = _as_float64(logits_or_probs)
    _check_2d("logits_or_probs", x)
    chunks = inception_score_splits(len(x), splits, split_size)
    if from_logits:
        probs = scipy.special.softmax(x, axis=1)
    else:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError(
                "probabilities must be non-negative rows summing to 1 (or pass from_logits=True)"
            )
        probs = x
    scores = []
    for chunk in chunks:
        part = probs[chunk]
        marginal = part.mean(axis=0, keepdims=True)
        # rel_entr gives p log(p / q) with the 0 log 0 = 0 convention, so one-hot rows are exact.
        kl = scipy.special.rel_entr(part, marginal).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def sfid_from_features(real_spatial: ArrayLike, fake_spatial: ArrayLike) -> float:
    """sFID (Nash et al. 2021, "Generating images with sparse representations"): the Frechet distance
    of spatial Inception features, as guided-diffusion's evaluator computes it (`evaluations/evaluator.py`:
    the first 7 channels of `mixed_6/conv`, 7 x 17 x 17 = 2023-d, flattened in TF's HWC order; see
    `eval.features.InceptionFeatures`). real_spatial: (N, 2023), fake_spatial: (M, 2023)."""
    return fid_from_features(real_spatial, fake_spatial)


def _as_torch64(x: ArrayLike, device: torch.device) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=torch.float64)


def _knn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(N, D) -> (N,) distance of each point to its k-th nearest neighbour other than itself."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, N-1] = [1, {len(feats) - 1}], got {k}")
    # The k+1 smallest distances of a row include the point itself (distance 0): drop it by taking k+1.
    return torch.cat(
        [torch.cdist(chunk, feats).kthvalue(k + 1, dim=1).values for chunk in feats.split(batch_size)]
    )


def _manifold_fraction(
    queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> float:
    """Fraction of queries inside the union of balls B(refs_j, radii_j) (Kynkaanniemi et al. 2019, eq. 1)."""
    inside = 0
    for chunk in queries.split(batch_size):
        inside += int((torch.cdist(chunk, refs) <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-2).

    real: (N, D), fake: (M, D). Each set's manifold is the union of balls around its points with
    radius the distance to the k-th nearest neighbour within the same set (self excluded).
    precision = fraction of fake points inside the real manifold; recall = fraction of real points
    inside the fake manifold. Distances are computed in float64, `batch_size` query rows at a time
    (memory ~ batch_size * max(N, M) * 8 bytes), on `device` (default CPU).
    """
    device = torch.device(device or "cpu")
    real_t, fake_t = _as_torch64(real, device), _as_torch64(fake, device)
    if real_t.ndim != 2 or fake_t.ndim != 2 or real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(
            f"real and fake must be (N, D) and (M, D), got {tuple(real_t.shape)}, {tuple(fake_t.shape)}"
        )
    real_radii = _knn_radii(real_t, k, batch_size)
    fake_radii = _knn_radii(fake_t, k, batch_size)
    precision = _manifold_fraction(fake_t, real_t, real_radii, batch_size)
    recall = _manifold_fraction(real_t, fake_t, fake_radii, batch_size)
    return precision, recall


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (gamma * (x @ y.T) + coef0) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD^2 for equal-size samples (Gretton et al. 2012, Lemma 6): the diagonals are dropped."""
    m = len(kxx)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(
    real: ArrayLike,
    fake: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, Sec. 4): unbiased MMD^2 with the polynomial
    kernel k(x, y) = (gamma x.y + coef0)^degree, gamma = 1/D by default, averaged over random subsets.

    real: (N, D), fake: (M, D). subset_size is clipped to min(N, M). Returns (mean, std) over subsets.
    """
    x_real, x_fake = _as_float64(real), _as_float64(fake)
    _check_2d("real", x_real)
    _check_2d("fake", x_fake)
    if x_real.shape[1] != x_fake.shape[1]:
        raise ValueError(f"feature dims differ: {x_real.shape[1]} vs {x_fake.shape[1]}")
    m = min(subset_size, len(x_real), len(x_fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got subset size {m}")
    gamma = 1.0 / x_real.shape[1] if gamma is None else gamma
    kernel = functools.partial(_polynomial_kernel, degree=degree, gamma=gamma, coef0=coef0)
    rng = np.random.default_rng(seed)
    mmds = []
    for _ in range(num_subsets):
        x = x_fake[rng.choice(len(x_fake), m, replace=False)]
        y = x_real[rng.choice(len(x_real), m, replace=False)]
        mmds.append(_mmd2_unbiased(kernel(x, x), kernel(y, y), kernel(x, y)))
    return float(np.mean(mmds)), float(np.std(mmds))


def class_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of samples whose argmax prediction equals the label. logits: (N, K), labels: (N,)."""
    scores = _as_float64(logits)
    _check_2d("logits", scores)
    target = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(target) != len(scores):
        raise ValueError(f"{len(scores)} logits but {len(target)} labels")
    return float(np.mean(scores.argmax(axis=1) == target))
