"""ADM's evaluation of a sample batch against a reference batch: Inception Score, FID, sFID, precision, recall.

    model, params = load_inception("pt_inception-2015-12-05-6726825d.pth")
    results = evaluate("VIRTUAL_imagenet256_labeled.npz", "samples.npz", model, params)
Images are streamed from the archives batch by batch (memory bounded by the features, ~20 KB per image, not by
the images); a reference batch's stored mu/sigma/mu_s/sigma_s are used for FID and sFID, as ADM's evaluator does.
Under jax.distributed each host computes the features of its block of images and all hosts gather them; process 0
computes the numbers.
"""
import json
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jdit.eval import batches, metrics
from jdit.eval import features as features_lib


def host_rows(count: int) -> tuple[int, int]:
  """This host's rows [begin, end) of `count` images: consecutive blocks of ceil(count / hosts), the last short."""
  rows = math.ceil(count / jax.process_count())
  begin = min(jax.process_index() * rows, count)
  return begin, min(begin + rows, count)


def gather_hosts(features: dict, count: int) -> dict:
  """Every host's features of its host_rows, concatenated in host order on every host (the blocks padded to one
  length for the all-gather, the padding, all at the end, cut)."""
  if jax.process_count() == 1:
    return features
  rows = math.ceil(count / jax.process_count())
  padded = {k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) for k, v in features.items()}
  gathered = multihost_utils.process_allgather(padded, tiled=True)  # (hosts * rows, ...) per key
  return {k: np.asarray(v)[:count] for k, v in gathered.items()}


def activations(model, params, images, batch_size: int = 200, log=print) -> dict:
  """pool_3, logits and spatial features of every image of an evaluator batch (a batches.NpzArray, streamed) or an
  array, on every host: each host computes its host_rows on its devices, then they are all-gathered."""
  count, (begin, end) = len(images), host_rows(len(images))
  if isinstance(images, batches.NpzArray):
    name, chunks = images.path, images.batches(batch_size, begin, end)
  else:
    features_lib.check_images(images)
    name, chunks = "images", (images[i:min(i + batch_size, end)] for i in range(begin, end, batch_size))
  if count == 0:
    raise ValueError(f"{name}: {getattr(images, 'name', 'the array')} holds no images")
  parts, done, start = [], 0, time.time()
  share = f" (this host's share of {count}, {jax.process_count()} hosts)" if jax.process_count() > 1 else ""
  for chunk in chunks:
    parts.append(features_lib.inception_features(model, params, chunk, batch_size))
    done += len(chunk)
    if log is not None:
      log(f"{name}: {done}/{end - begin} images{share} ({done / max(time.time() - start, 1e-9):.1f} images/s)")
  local = {key: np.concatenate([p[key] for p in parts] or [np.zeros((0, dim), np.float32)])
           for key, dim in features_lib.FEATURE_DIMS.items()}
  return gather_hosts(local, count)


def reference_statistics(features: dict) -> dict[str, np.ndarray]:
  """The four statistics an ADM reference batch stores."""
  pool, spatial = metrics.statistics(features["pool_3"]), metrics.statistics(features["spatial"])
  return {"mu": pool.mu, "sigma": pool.sigma, "mu_s": spatial.mu, "sigma_s": spatial.sigma}


def evaluate(reference_path: str, samples_path: str, model, params, batch_size: int = 200,
             log=print) -> dict | None:
  """{"inception_score", "fid", "sfid", "precision", "recall", "num_reference", "num_samples"} as ADM's
  evaluator.py computes them (precision/recall on all reference images, as it does). Multi-host: every host
  computes its share of the features, process 0 the numbers (None on the others)."""
  reference_images, sample_images = batches.open_images(reference_path), batches.open_images(samples_path)
  reference = activations(model, params, reference_images, batch_size, log)
  samples = activations(model, params, sample_images, batch_size, log)
  if jax.process_index() > 0:
    return None
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


def dinov2_features(model, params, images, batch_size: int = 200) -> np.ndarray:
  """(N, D) DINOv2 CLS features of an evaluator batch at 224x224 (FD_DINOv2's protocol): each host its
  host_rows, all-gathered."""
  from jdit.eval.dinov2 import dinov2_preprocess
  count, (begin, end) = len(images), host_rows(len(images))
  apply = jax.jit(lambda pixels: model.apply({"params": params}, pixels)["pooled"])
  parts = [np.asarray(apply(dinov2_preprocess(chunk))) for chunk in images.batches(batch_size, begin, end)]
  local = np.concatenate(parts or [np.zeros((0, model.hidden_size), np.float32)])
  return gather_hosts({"cls": local}, count)["cls"]


def fd_dinov2(reference_path: str, samples_path: str, model, params, batch_size: int = 200) -> float | None:
  """The Frechet distance of two batches in DINOv2's CLS feature space (FD_DINOv2, as EDM2 reports it beside FID);
  None on hosts other than process 0."""
  reference, samples = (dinov2_features(model, params, batches.open_images(path), batch_size)
                        for path in (reference_path, samples_path))
  if jax.process_index() > 0:
    return None
  return metrics.frechet_distance(metrics.statistics(samples), metrics.statistics(reference))


NAMES = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
         ("Recall", "recall"), ("FD_DINOv2", "fd_dinov2"))


def write_json(path: str, contents: dict, log=print) -> None:
  """contents as JSON at path, written to a temporary name and renamed."""
  with open(path + ".tmp", "w") as f:
    json.dump(contents, f, indent=1)
  os.replace(path + ".tmp", path)
  log(f"wrote {path}")


def report(results: dict, path: str, log=print, **extra) -> None:
  """Prints the five numbers as ADM's evaluator does, then writes them (and `extra`) as JSON to path."""
  for name, key in NAMES:
    if key in results:
      log(f"{name}: {results[key]}")
  write_json(path, {**results, **extra}, log)
