"""jdit.eval.metrics against independent numpy/scipy implementations written here from the formulas: Frechet
distance (through the eigenvalues of the covariances' product instead of a matrix square root), its singular retry
and imaginary-part error, Inception Score (scipy's KL), precision/recall (brute-force float64 k-NN balls)."""
import numpy as np
import pytest
from scipy import special, stats
from scipy.spatial.distance import cdist

from jdit.eval import metrics


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mixing + shift).astype(np.float32)


def _frechet_by_eigenvalues(a: np.ndarray, b: np.ndarray, offset: float = 0.0) -> float:
  """|mu_a - mu_b|^2 + tr A + tr B - 2 sum sqrt(eig(A'B')): tr (A'B')^1/2 from the eigenvalues of the product (real
  and >= 0 for covariances) without a matrix square root, A' = A + offset I, B' likewise (the retry shifts only
  the square root's matrices, not the traces)."""
  mu_a, mu_b = a.astype(np.float64).mean(0), b.astype(np.float64).mean(0)
  sigma_a = np.cov(a.astype(np.float64), rowvar=False)
  sigma_b = np.cov(b.astype(np.float64), rowvar=False)
  shift = offset * np.eye(a.shape[1])
  product = np.linalg.eigvals((sigma_a + shift) @ (sigma_b + shift))
  return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b)
               - 2 * np.sqrt(np.clip(product.real, 0, None)).sum())


def test_frechet_distance_is_the_formula_and_zero_for_equal_statistics():
  a, b = _features(0, 600, 24), _features(1, 500, 24, shift=0.3)
  ours = metrics.frechet_distance(metrics.statistics(a), metrics.statistics(b))
  assert ours == pytest.approx(_frechet_by_eigenvalues(a, b), rel=1e-9)
  assert ours > 1.0
  assert metrics.frechet_distance_symmetric(metrics.statistics(a), metrics.statistics(b)) == pytest.approx(ours, rel=1e-9)
  assert abs(metrics.frechet_distance(metrics.statistics(a), metrics.statistics(a))) < 1e-9
  mu, sigma = metrics.statistics(a)
  assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (24, 24)


def test_singular_covariances_and_the_retry_with_eps_on_the_diagonal(monkeypatch):
  a, b = _features(2, 10, 32), _features(3, 12, 32, shift=0.1)  # fewer samples than dimensions: rank-deficient
  ours = metrics.frechet_distance(metrics.statistics(a), metrics.statistics(b))
  assert ours == pytest.approx(_frechet_by_eigenvalues(a, b), rel=1e-6)
  symmetric = metrics.frechet_distance_symmetric(metrics.statistics(a), metrics.statistics(b))
  assert symmetric == pytest.approx(ours, rel=1e-6)
  calls = []
  real = metrics._sqrtm

  def fails_once(matrix):  # a square root that numerically fails the first time, as near-singular products can
    calls.append(matrix)
    return np.full_like(matrix, np.nan) if len(calls) == 1 else real(matrix)
  monkeypatch.setattr(metrics, "_sqrtm", fails_once)
  with pytest.warns(UserWarning, match="adding 1e-06 to the diagonal"):
    retried = metrics.frechet_distance(metrics.statistics(a), metrics.statistics(b))
  assert len(calls) == 2 and retried == pytest.approx(_frechet_by_eigenvalues(a, b, offset=1e-6), rel=1e-6)


def test_an_imaginary_square_root_is_an_error():
  with pytest.raises(ValueError, match="imaginary component"):
    metrics.frechet_distance(metrics.Statistics(np.zeros(3), np.eye(3)), metrics.Statistics(np.zeros(3), -np.eye(3)))
  for distance in (metrics.frechet_distance, metrics.frechet_distance_symmetric):
    with pytest.raises(ValueError, match="different dimensions"):
      distance(metrics.Statistics(np.zeros(3), np.eye(3)), metrics.Statistics(np.zeros(4), np.eye(4)))


def test_inception_score_is_the_mean_over_splits_of_exp_mean_kl():
  logits = np.random.default_rng(4).normal(0, 3, (12_000, 50))
  probs = special.softmax(logits, axis=1)
  expected = np.mean([np.exp(np.mean(stats.entropy(part, part.mean(0, keepdims=True), axis=1)))
                      for part in (probs[:5000], probs[5000:10_000], probs[10_000:])])
  assert metrics.inception_score(logits) == pytest.approx(expected, rel=1e-10)
  assert metrics.inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
  confident = np.eye(10)[np.arange(1000) % 10] * 50.0  # sure of one of 10 classes, all classes equally often
  assert metrics.inception_score(confident, split_size=500) == pytest.approx(10.0, rel=1e-6)


def _precision_recall_float64(reference, samples, k=3):
  ref, sam = reference.astype(np.float64), samples.astype(np.float64)
  radius = lambda x: np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, k]
  cross = cdist(ref, sam, "sqeuclidean")  # (R, S)
  precision = (cross <= radius(ref)[:, None]).any(axis=0).mean()
  recall = (cross <= radius(sam)[None, :]).any(axis=1).mean()
  return precision, recall


def test_precision_recall_are_the_knn_ball_fractions_in_blocks():
  reference, samples = _features(5, 700, 16), _features(6, 500, 16, shift=0.4)
  exact = _precision_recall_float64(reference, samples)
  assert 0.1 < exact[0] < 0.95 and 0.1 < exact[1] < 0.95  # neither trivially 0 nor 1
  assert metrics.precision_recall(reference, samples, block=256, half=False) == pytest.approx(exact, abs=1e-12)
  adm = metrics.precision_recall(reference, samples, block=256)  # float16 distances, as ADM's evaluator
  assert adm == pytest.approx(exact, abs=0.02)
  assert metrics.precision_recall(reference, reference, block=300) == (1.0, 1.0)
  assert metrics.precision_recall(reference, samples + 100.0, block=300) == (0.0, 0.0)


def test_distances_fall_back_to_float32_where_float16_overflows():
  big = _features(7, 64, 8) * 300.0  # squared norms far above float16's 65504
  exact = cdist(big.astype(np.float64), big[:32].astype(np.float64), "sqeuclidean")
  ours = np.asarray(metrics.pairwise_distances(big, big[:32]))
  assert np.isfinite(ours).all()
  np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=1e-2 * exact.max() * 1e-4)
  small = _features(8, 64, 8)
  near = cdist(small.astype(np.float64), small.astype(np.float64), "sqeuclidean")
  assert np.abs(np.asarray(metrics.pairwise_distances(small, small)) - near).max() < 0.02 * near.max()
