"""Scores for the bundled digits demos: how many samples a classifier trained on the real 8x8 digits reads as the
class they were asked for; for digit scenes, both digits and both colors against the prompt; and a Frechet
distance to the real digits in a fixed PCA space (sampler quality against steps).

    class_accuracy(images, labels)            # digits: fraction read as the requested digit
    scene_scores(images, prompts)             # digit scenes: {"all", "left_digit", ..., "right_color"}
    features = digit_features(); frechet(features(a), features(b))
"""
import functools

import numpy as np

from jdit.data import digit_scenes
from jdit.eval import metrics

PCA_COMPONENTS = 16
COLOR_NAMES = list(digit_scenes.COLORS)
COLOR_TABLE = np.asarray([digit_scenes.COLORS[c] for c in COLOR_NAMES], np.float64)  # (7, 3)


def real_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images (1797, 64) float64 in [0, 1], labels) of scikit-learn's digits."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  return digits.data / 16.0, digits.target


@functools.lru_cache(maxsize=1)
def digits_classifier():
  """Logistic regression on all 1,797 real 8x8 digits (pixel values 0..16); ~97% held-out accuracy."""
  from sklearn.linear_model import LogisticRegression
  images, labels = real_digits()
  return LogisticRegression(max_iter=5000).fit(images * 16.0, labels)


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
  """images (N, 8, 8[, 1]) uint8 0..255 -> fraction predicted as `labels`."""
  features = images.reshape(len(images), 64).astype(np.float64) * (16.0 / 255.0)
  return float((digits_classifier().predict(features) == labels).mean())


def read_cell(cell: np.ndarray) -> tuple[int, str]:
  """(digit, color) of one (8, 8, 3) uint8 scene cell: the intensity (the brightest channel, 0..16) goes to the
  digits classifier; the ink's intensity-weighted mean color, scaled to a maximum of 1, to the nearest color."""
  rgb = cell.reshape(64, 3).astype(np.float64) / 255.0
  intensity = rgb.max(axis=1)
  ink = (rgb * intensity[:, None]).sum(axis=0) / max(intensity.sum(), 1e-9)
  ink = ink / max(ink.max(), 1e-9)
  color = COLOR_NAMES[int(np.argmin(np.linalg.norm(COLOR_TABLE - ink, axis=1)))]
  return int(digits_classifier().predict(intensity.reshape(1, 64) * 16.0)[0]), color


def scene_scores(images: np.ndarray, prompts) -> dict:
  """Fractions of (N, 8, 16, 3) scenes with everything right, and per left/right digit and color; ValueError for
  a prompt that is not a digit-scenes caption."""
  hits = {"all": [], "left_digit": [], "right_digit": [], "left_color": [], "right_color": []}
  for image, prompt in zip(images, prompts):
    left, right, left_color, right_color = digit_scenes.parse_caption(str(prompt))
    (got_left, got_left_color), (got_right, got_right_color) = read_cell(image[:, :8]), read_cell(image[:, 8:])
    checks = {"left_digit": got_left == left, "right_digit": got_right == right,
              "left_color": got_left_color == left_color, "right_color": got_right_color == right_color}
    for key, ok in checks.items():
      hits[key].append(ok)
    hits["all"].append(all(checks.values()))
  return {key: float(np.mean(values)) for key, values in hits.items()}


def digit_features():
  """x (N, 64) in [0, 1] -> (N, PCA_COMPONENTS): the principal components of the real digits."""
  real, _ = real_digits()
  mean = real.mean(0)
  _, _, vt = np.linalg.svd(real - mean, full_matrices=False)
  return lambda x: (x - mean) @ vt[:PCA_COMPONENTS].T


def frechet(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """The Frechet distance between two feature sets' Gaussians."""
  return metrics.frechet_distance(metrics.statistics(features_a), metrics.statistics(features_b))


def frechet_to_real(images: np.ndarray) -> float:
  """The Frechet distance of (N, 8, 8[, 1]) uint8 digits to the 1,797 real ones in the real digits' PCA space: the
  whole sample -> evaluate path offline, with no download (a digits-only measure, not FID; the real digits
  resampled score ~0.01)."""
  real, _ = real_digits()
  features = digit_features()
  return frechet(features(images.reshape(len(images), 64).astype(np.float64) / 255.0), features(real))
