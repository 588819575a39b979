"""ADM's evaluation of a sample batch against a reference batch: Inception Score, FID, sFID, precision, recall.

    model, params = load_inception("pt_inception-2015-12-05-6726825d.pth")
    results = evaluate("VIRTUAL_imagenet256_labeled.npz", "samples.npz", model, params)
Images are streamed from the archives batch by batch (memory bounded by the features, ~20 KB per image, not by
the images); a reference batch's stored mu/sigma/mu_s/sigma_s are used for FID and sFID, as ADM's evaluator does.
"""
import json
import os
import time

import numpy as np

from jdit.eval import batches, metrics
from jdit.eval.features import inception_features


def activations(model, params, images: batches.NpzArray, batch_size: int = 200, log=print) -> dict:
  """pool_3, logits and spatial features of every image of an evaluator batch, with progress lines."""
  parts, done, start = [], 0, time.time()
  for chunk in images.batches(batch_size):
    parts.append(inception_features(model, params, chunk, batch_size))
    done += len(chunk)
    if log is not None:
      log(f"{images.path}: {done}/{len(images)} images ({done / max(time.time() - start, 1e-9):.1f} images/s)")
  if not parts:
    raise ValueError(f"{images.path}: {images.name} holds no images")
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def reference_statistics(features: dict) -> dict[str, np.ndarray]:
  """The four statistics an ADM reference batch stores."""
  pool, spatial = metrics.statistics(features["pool_3"]), metrics.statistics(features["spatial"])
  return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}


def evaluate(reference_path: str, samples_path: str, model, params, batch_size: int = 200, log=print) -> dict:
  """{"inception_score", "fid", "sfid", "precision", "recall", "num_reference", "num_samples"} as ADM's
  evaluator.py computes them (precision/recall on all reference images, as it does)."""
  reference_images, sample_images = batches.open_images(reference_path), batches.open_images(samples_path)
  reference = activations(model, params, reference_images, batch_size, log)
  samples = activations(model, params, sample_images, batch_size, log)
  stored = batches.read_statistics(reference_path) or reference_statistics(reference)
  ours = reference_statistics(samples)
  precision, recall = metrics.precision_recall(reference["pool_3"], samples["pool_3"])
  return {
      "inception_score": metrics.inception_score(samples["logits"]),
      "fid": metrics.frechet_distance(metrics.Statistics(ours["mu"], ours["sigma"]),
                                      metrics.Statistics(stored["mu"], stored["sigma"])),
      "sfid": metrics.frechet_distance(metrics.Statistics(ours["mu_s"], ours["sigma_s"]),
                                       metrics.Statistics(stored["mu_s"], stored["sigma_s"])),
      "precision": precision, "recall": recall,
      "num_reference": len(reference_images), "num_samples": len(sample_images),
  }


NAMES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
         ("Recall", "recall"))


def write_json(path: str, contents: dict, log=print) -> None:
  """contents as JSON at path, written to a temporary name and renamed."""
  with open(path + ".tmp", "w") as f:
    json.dump(contents, f, indent=1)
  os.replace(path + ".tmp", path)
  log(f"wrote {path}")


def report(results: dict, path: str, log=print, **extra) -> None:
  """Prints the five numbers as ADM's evaluator does, then writes them (and `extra`) as JSON to path."""
  for name, key in NAMES:
    log(f"{name}: {results[key]}")
  write_json(path, {**results, **extra}, log)
