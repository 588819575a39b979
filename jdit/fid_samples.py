"""Evaluation-scale sampling: N images (50,000 for FID-50K) over every device and host, in resumable shards,
written as the .npz that the ADM evaluator (guided-diffusion's evaluations/evaluator.py) reads.

    python -m jdit.main --mode=fid_samples --config=configs/dit_xl.py --workdir=out/fid \
        --config.init_from=DiT-XL-2-256x256.pt --config.sample.fid=True
writes out/fid/fid_samples_50000x256x256x3.npz with arr_0 (N, H, W, 3) uint8 and labels (N,). Classes are
balanced (each class N / num_classes times, in a seeded random order). Each shard of config.sample.fid_shard_size
images is written atomically to out/fid/fid_shards/ as soon as it is done; a restarted run skips finished shards,
refuses to mix shards made with other settings, and deletes the shards once the final file is complete. With
config.eval.reference (and eval.inception) the set is then evaluated as ADM's evaluator does (SAMPLES.eval.json).
"""
import os
import shutil
import time
import zipfile

import jax
import numpy as np
from jax.experimental import multihost_utils

from jdit import config_check
from jdit import sample as sample_lib
from jdit.data import records
from jdit.fingerprint import fingerprint
from jdit.models import family

SETTINGS_FILE = "settings.json"  # in the shard directory: what its shards were made with (run_settings)
WEIGHTS = "weights"  # the run_settings key of the weights' content hash


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """Every class num_samples // num_classes times (the first num_samples % num_classes classes once more),
  shuffled with `seed`; zeros for unconditional models."""
  if not num_classes:
    return np.zeros(num_samples, np.int32)
  labels = np.arange(num_samples) % num_classes
  return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def run_settings(config, model, params) -> dict:
  """Everything that changes the images, by config field, and the weights' content hash: a restart must match
  them all, or its shards would mix two runs."""
  settings = {f"config.model.{k}": v for k, v in family.model_config(model).items()}
  settings |= {f"config.diffusion.{k}": v for k, v in sample_lib.sampling_config(config).to_dict().items()}
  settings |= {f"config.vae.{k}": v for k, v in config.vae.to_dict().items()}
  settings |= {f"config.sample.{k}": config.sample[k] for k in ("fid_samples", "fid_shard_size", "seed")}
  return settings | {WEIGHTS: fingerprint(params)}


def shard_labels(config, labels: np.ndarray, index: int) -> np.ndarray:
  """The labels of shard `index`: its rows of config.sample.fid_shard_size."""
  size = config.sample.fid_shard_size
  return labels[index * size:(index + 1) * size]


def shard_images(sampler, config, model, params, mesh, labels: np.ndarray, index: int, decoder=None) -> np.ndarray:
  """uint8 images of shard `index` of an evaluation set with these labels: its rows of config.sample.fid_shard_size,
  sampled with the shard's own key (so a shard's images do not depend on the others, nor on a restart)."""
  key = jax.random.fold_in(jax.random.key(config.sample.seed), index)
  return sample_lib.generate(sampler, config.sample.per_device_batch, model, params,
                             shard_labels(config, labels, index), mesh, key, decoder)


def evaluation_set(sampler, config, model, params, mesh, num_samples: int, decoder=None) -> np.ndarray:
  """The first num_samples images --mode=fid_samples would write with config.sample.fid_samples=num_samples."""
  labels = balanced_labels(num_samples, sample_lib.class_count(model), config.sample.seed)
  shards = range(-(-num_samples // config.sample.fid_shard_size))
  return np.concatenate([shard_images(sampler, config, model, params, mesh, labels, i, decoder) for i in shards])


def write_adm_npz(path: str, shard_paths: list[str], shape: tuple, labels: np.ndarray) -> None:
  """Streams the shards into one .npz (arr_0 uint8 NHWC, labels) without holding all images in memory;
  written to a temporary name and renamed when complete."""
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
    with archive.open("arr_0.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
      for shard in shard_paths:
        f.write(np.ascontiguousarray(np.load(shard)["images"]).tobytes())
    with archive.open("labels.npy", "w") as f:
      np.lib.format.write_array(f, labels)
  os.replace(tmp, path)


def _exist(paths: list[str]) -> np.ndarray:
  """Which files exist, as process 0 sees them (all hosts must run the same sampler calls)."""
  done = np.array([os.path.exists(p) for p in paths], np.int32)
  if jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done.astype(bool)


def write_fid_samples(config, workdir: str, given: dict | None = None) -> str:
  """--mode=fid_samples: config.sample.fid_samples images in the ADM .npz layout; returns its path. `given`:
  model fields the command line set (sample.prepare)."""
  config_check.validate(config, "fid_samples", workdir)
  n, shard_size = config.sample.fid_samples, config.sample.fid_shard_size
  setup = sample_lib.prepare(config, workdir, given=given)
  shape = (n, *setup.image_shape)
  path = os.path.join(workdir, f"fid_samples_{'x'.join(map(str, shape))}.npz")
  log = (lambda msg: print(msg, flush=True)) if jax.process_index() == 0 else (lambda msg: None)
  if _exist([path])[0]:
    log(f"fid_samples: {path} is already complete")
    return _evaluated(config, path, log)
  labels = balanced_labels(n, sample_lib.class_count(setup.model), config.sample.seed)
  shard_dir = os.path.join(workdir, "fid_shards")
  starts = range(0, n, shard_size)
  shard_paths = [os.path.join(shard_dir, f"shard_{i:05d}.npz") for i in range(len(starts))]
  settings = run_settings(config, setup.model, setup.params)  # every host: the hash runs where the weights are
  if jax.process_index() == 0:
    records.claim_settings(shard_dir, SETTINGS_FILE, settings, {WEIGHTS: "the sampled weights' content hash"})
  done = _exist(shard_paths)
  todo = [i for i in range(len(starts)) if not done[i]]
  remaining = sum(len(shard_labels(config, labels, i)) for i in todo)
  log(f"fid_samples: {n} images {shape[1]}x{shape[2]} in {len(starts)} shards, {len(starts) - len(todo)} "
      f"already done; guidance {sample_lib.sampling_config(config).guidance_scale}")
  tic, made = time.time(), 0
  for i in todo:
    chunk = shard_labels(config, labels, i)
    images = shard_images(setup.sampler, config, setup.model, setup.params, setup.mesh, labels, i, setup.decoder)
    if jax.process_index() == 0:
      np.savez(shard_paths[i] + ".tmp.npz", images=images, labels=chunk)
      os.replace(shard_paths[i] + ".tmp.npz", shard_paths[i])
    made += len(chunk)
    rate = made / (time.time() - tic)
    log(f"fid_samples: shard {i + 1}/{len(starts)}, {rate:.2f} images/s, about "
        f"{(remaining - made) / rate / 60:.1f} min left")
  if jax.process_index() == 0:
    write_adm_npz(path, shard_paths, shape, labels)
    shutil.rmtree(shard_dir)
    rate = f" at {made / (time.time() - tic):.2f} images/s (including compilation)" if made else ""
    log(f"wrote {path}: arr_0 {shape} uint8; sampled {made} images{rate}")
  return _evaluated(config, path, log)


def _evaluated(config, path: str, log) -> str:
  """With config.eval.reference: ADM's five numbers of the finished set, once (every host computes its share of
  the features; process 0 writes SAMPLES.eval.json)."""
  if not config.eval.reference:
    return path
  from jdit.eval import monitor
  if _exist([monitor.evaluation_path(path)])[0]:
    log(f"fid_samples: already evaluated in {monitor.evaluation_path(path)}")
  else:
    log(f"fid_samples: evaluating {path} against {config.eval.reference}")
    monitor.evaluate_samples(config.eval, path, log)
  return path
