"""The numbers of ADM's evaluator from Inception features: FID and sFID (Frechet distance of float64 Gaussian
statistics), Inception Score (10 splits of 5,000) and improved precision/recall (k = 3).

    ref, ours = statistics(ref_pool), statistics(sample_pool)      # (mu, sigma) float64
    fid = frechet_distance(ours, ref)                               # sFID: the same on the spatial features
    inception_score(sample_logits)
    precision, recall = precision_recall(ref_pool, sample_pool)
Distances for precision/recall are squared Euclidean, computed in blocks in JAX in float16 as ADM's distance
block does (float32 for a block where float16 overflows); radii are each point's 3rd nearest neighbour in its
own set; a sample is precise if it lies within some reference point's radius, a reference point is recalled if
it lies within some sample's.
"""
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Statistics(NamedTuple):
  mu: np.ndarray  # (D,) float64
  sigma: np.ndarray  # (D, D) float64


def statistics(features) -> Statistics:
  """Mean and covariance (np.cov, rows are samples) in float64."""
  features = np.asarray(features, np.float64)
  return Statistics(features.mean(axis=0), np.cov(features, rowvar=False))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  """scipy's matrix square root, its singularity warnings silenced (non-finite results are handled)."""
  from scipy import linalg
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    warnings.simplefilter("ignore", RuntimeWarning)
    return linalg.sqrtm(matrix)


def _matching(a: Statistics, b: Statistics):
  """(mu_a, mu_b, sigma_a, sigma_b) as 1-D and 2-D arrays; a ValueError when their dimensions differ."""
  mu_a, mu_b = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
  sigma_a, sigma_b = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
  if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape:
    raise ValueError(f"statistics of different dimensions: mu {mu_a.shape} vs {mu_b.shape}, sigma "
                     f"{sigma_a.shape} vs {sigma_b.shape}")
  return mu_a, mu_b, sigma_a, sigma_b


def frechet_distance(a: Statistics, b: Statistics, eps: float = 1e-6) -> float:
  """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); a singular product is retried with eps added to both
  diagonals; a matrix square root whose diagonal is not real to 1e-3 is a ValueError."""
  mu_a, mu_b, sigma_a, sigma_b = _matching(a, b)
  covmean = _sqrtm(sigma_a.dot(sigma_b))
  if not np.isfinite(covmean).all():
    warnings.warn(f"Frechet distance: singular product; adding {eps} to the diagonal of both covariances")
    offset = np.eye(sigma_a.shape[0]) * eps
    covmean = _sqrtm((sigma_a + offset).dot(sigma_b + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))} in the square root")
    covmean = covmean.real
  diff = mu_a - mu_b
  return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def frechet_distance_symmetric(a: Statistics, b: Statistics) -> float:
  """The same distance with tr (S_a S_b)^1/2 = tr (S_a^1/2 S_b S_a^1/2)^1/2 from two symmetric eigensolvers (no
  general matrix square root): equal to frechet_distance to rounding, ~5x faster at 2048 dimensions (the
  training FID; ADM's own numbers use frechet_distance). Negative eigenvalues of rounding count as zero."""
  mu_a, mu_b, sigma_a, sigma_b = _matching(a, b)
  diff = mu_a - mu_b
  values, vectors = np.linalg.eigh(sigma_a)
  root_a = (vectors * np.sqrt(np.maximum(values, 0.0))) @ vectors.T
  middle = root_a @ sigma_b @ root_a
  root_trace = np.sqrt(np.maximum(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0)).sum()
  return float(diff.dot(diff) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * root_trace)


def inception_score(logits, split_size: int = 5000) -> float:
  """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), p(y|x) the softmax of the (bias-free) logits."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  scores = []
  for begin in range(0, len(probs), split_size):
    part = probs[begin:begin + split_size]
    kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
    scores.append(np.exp(kl.sum(axis=1).mean()))
  return float(np.mean(scores))


def _distances(u, v, dtype):
  """max(|u|^2 - 2 u.v + |v|^2, 0) with inputs, products and sums in `dtype` (float32 accumulation)."""
  u, v = u.astype(dtype), v.astype(dtype)
  norm_u = jnp.sum(jnp.square(u.astype(jnp.float32)), axis=1).astype(dtype)[:, None]  # (R, 1)
  norm_v = jnp.sum(jnp.square(v.astype(jnp.float32)), axis=1).astype(dtype)[None, :]  # (1, C)
  dot = jnp.matmul(u, v.T, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST).astype(dtype)
  return jnp.maximum(norm_u - 2 * dot + norm_v, 0).astype(jnp.float32)  # (R, C)


@functools.partial(jax.jit, static_argnames="half")
def pairwise_distances(u, v, half: bool = True):
  """Squared distances (R, C) as ADM's distance block: float16, or float32 where that is not finite (half=False:
  float32 throughout)."""
  if not half:
    return _distances(u, v, jnp.float32)
  distances = _distances(u, v, jnp.float16)
  return jax.lax.cond(jnp.isfinite(distances).all(), lambda: distances, lambda: _distances(u, v, jnp.float32))


def _blocks(n: int, size: int):
  return [(begin, min(begin + size, n)) for begin in range(0, n, size)]


def manifold_radii(features, k: int = 3, block: int = 10_000, half: bool = True) -> np.ndarray:
  """(N,) float32: each row's squared distance to its k-th nearest neighbour within `features` (itself, at 0,
  is the 0-th)."""
  features = np.asarray(features, np.float32)
  radii = np.zeros(len(features), np.float32)
  for begin, end in _blocks(len(features), block):
    row = np.concatenate([np.asarray(pairwise_distances(features[begin:end], features[b:e], half))
                          for b, e in _blocks(len(features), block)], axis=1)  # (R, N)
    radii[begin:end] = np.partition(row, k, axis=1)[:, k]
  return radii


@functools.partial(jax.jit, static_argnames="half")
def _within(u, radii_u, v, radii_v, half: bool):
  """(v inside some u radius (C,), u inside some v radius (R,)) for one block."""
  d = pairwise_distances(u, v, half)  # (R, C)
  return (d <= radii_u[:, None]).any(axis=0), (d <= radii_v[None, :]).any(axis=1)


def precision_recall(reference, samples, k: int = 3, block: int = 10_000, half: bool = True) -> tuple[float, float]:
  """(precision: the fraction of samples inside the reference manifold, recall: the fraction of reference
  points inside the samples' manifold), manifolds as unions of k-NN balls; half: ADM's float16 distances."""
  reference, samples = np.asarray(reference, np.float32), np.asarray(samples, np.float32)
  radii_ref, radii_samples = manifold_radii(reference, k, block, half), manifold_radii(samples, k, block, half)
  samples_in = np.zeros(len(samples), bool)
  reference_in = np.zeros(len(reference), bool)
  for begin, end in _blocks(len(reference), block):
    for b, e in _blocks(len(samples), block):
      inside_ref, inside_samples = map(np.asarray, _within(reference[begin:end], radii_ref[begin:end],
                                                           samples[b:e], radii_samples[b:e], half))
      samples_in[b:e] |= inside_ref
      reference_in[begin:end] |= inside_samples
  return float(samples_in.mean()), float(reference_in.mean())
