"""Evaluation inside the jobs, against config.eval.reference: the FID during training (a TensorBoard scalar) and
ADM's five numbers at the end of --mode=fid_samples.

    fid = TrainingFid(config.eval)          # Inception and the reference statistics, loaded once
    value = fid(images)                     # uint8 (N, H, W, C) samples -> FID against the reference
    evaluate_samples(config.eval, "fid_samples_50000x256x256x3.npz")   # prints and writes ...eval.json
"""
import os

import numpy as np

from jdit.eval import batches, metrics
from jdit.eval.evaluate import activations, evaluate, report
from jdit.eval.features import load_inception


class TrainingFid:
  """The FID of sample images against the reference batch's pool_3 statistics (its stored mu and sigma, else
  computed once from its images)."""

  def __init__(self, eval_config, log=print):
    self.model, self.params = load_inception(eval_config.inception)
    self.batch_size, self.reference_path = eval_config.batch_size, eval_config.reference
    stored = batches.read_statistics(self.reference_path)
    if stored is None:
      images = batches.open_images(self.reference_path)
      pool = activations(self.model, self.params, images, self.batch_size, log=None)["pool_3"]
      self.reference = metrics.statistics(pool)
      log(f"FID reference: the pool_3 statistics of {len(images)} images of {self.reference_path}")
    else:
      self.reference = metrics.Statistics(stored["mu"], stored["sigma"])

  def __call__(self, images: np.ndarray) -> float:
    """images: the same on every host; each host computes its block's features (evaluate.activations)."""
    pool = activations(self.model, self.params, images, self.batch_size, log=None)["pool_3"]
    return metrics.frechet_distance_symmetric(metrics.statistics(pool), self.reference)


def evaluation_path(samples_path: str) -> str:
  """Where the results of a samples batch go (as tools/evaluate.py): SAMPLES.eval.json."""
  return os.path.splitext(samples_path)[0] + ".eval.json"


def evaluate_samples(eval_config, samples_path: str, log=print) -> dict | None:
  """ADM's Inception Score, FID, sFID, precision and recall of a samples batch against eval_config.reference,
  printed and written to SAMPLES.eval.json by process 0 (None on the other hosts, which compute their share of the
  features)."""
  model, params = load_inception(eval_config.inception)
  results = evaluate(eval_config.reference, samples_path, model, params, eval_config.batch_size,
                     log=lambda msg: None)
  if results is not None:
    report(results, evaluation_path(samples_path), log, reference=eval_config.reference, samples=samples_path)
  return results
