"""Sampling: restore (EMA) parameters, run the configured sampler with guidance, write PNG grids and .npz.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
writes workdir/samples.npz (images (N, H, W, C) uint8, labels (N,)) and workdir/samples.png.
"""
import math
import os

import jax
import numpy as np
from PIL import Image

from jdit import checkpoint, sharding
from jdit.diffusion import objective


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8, as the official sampler (clamp(127.5 x + 128, 0, 255))."""
  return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, min_size: int = 64) -> np.ndarray:
  """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) image, upscaled (nearest) to at least min_size pixels."""
  n, h, w, c = images.shape
  scale = max(1, math.ceil(min_size / h))
  images = images.repeat(scale, axis=1).repeat(scale, axis=2)
  cols = math.ceil(n / rows)
  padded = np.zeros((rows * cols, h * scale, w * scale, c), np.uint8)
  padded[:n] = images
  grid = padded.reshape(rows, cols, h * scale, w * scale, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * h * scale, cols * w * scale, c)


def save_png(image: np.ndarray, path: str) -> None:
  """Writes atomically (temporary file, then rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path + ".tmp.png")
  os.replace(path + ".tmp.png", path)


def sample_labels(config, model, n: int) -> np.ndarray:
  classes = list(config.sample.classes) or list(range(max(model.num_classes, 1)))
  return np.array([classes[i % len(classes)] for i in range(n)], np.int32)


def make_sampler(config, model):
  """The configured guided sampler, jitted once: (params, x_T, labels, rng) -> samples."""
  return jax.jit(objective.make_sample_fn(model, config.diffusion))


def make_decoder(config):
  """Latent models (config.vae.path set): scaled latents -> images in [-1, 1] through the VAE; else None."""
  if not config.vae.path:
    return None
  from jdit.convert.vae import load_vae
  from jdit.models import tiling
  vae, vae_params = load_vae(config.vae.path, config.vae.name)
  scale = config.data.latent_scale
  if config.vae.decode_tile:
    return lambda z: tiling.decode_tiled(vae, vae_params, np.asarray(z) / scale, config.vae.decode_tile,
                                         config.vae.decode_overlap)
  return jax.jit(lambda z: vae.apply({"params": vae_params}, z / scale, method=vae.decode))


def generate(sampler, config, model, params, labels: np.ndarray, mesh, seed: int, decoder=None) -> np.ndarray:
  """uint8 samples for `labels`, in fixed-size device batches split over the mesh's data-parallel axes;
  `decoder` (see make_decoder) turns latents into images."""
  per_call = config.sample.per_device_batch * sharding.data_parallel_size(mesh)
  shape = (*model.input_hw, model.in_channels)
  out = []
  for start in range(0, len(labels), per_call):
    chunk = labels[start:start + per_call]
    padded = np.resize(chunk, per_call)  # fixed batch shape: one compilation
    key = jax.random.fold_in(jax.random.key(seed), start)
    noise_key, sample_key = jax.random.split(key)
    x_T = jax.random.normal(noise_key, (per_call, *shape))
    batch = sharding.global_batch({"x": np.asarray(x_T), "y": padded}, mesh)
    x = sampler(params, batch["x"], batch["y"], sample_key)
    if decoder is not None:
      x = decoder(x)
    out.append(to_uint8(jax.device_get(x))[:len(chunk)])
  return np.concatenate(out)


def write_grid(sampler, config, model, params, mesh, workdir: str, step: int, decoder=None) -> np.ndarray:
  """A grid with one row per class (up to 10 classes x 10 samples) at workdir/samples/step_N.png."""
  rows = min(max(model.num_classes, 1), 10)
  labels = np.repeat(np.arange(rows, dtype=np.int32), 10)
  images = generate(sampler, config, model, params, labels, mesh, config.sample.seed, decoder)
  grid = make_grid(images, rows)
  save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
  return grid


def sample_and_save(config, workdir: str) -> str:
  """--mode=sample: the latest EMA parameters of workdir -> samples.npz and samples.png; returns the npz path."""
  directory = os.path.join(workdir, "checkpoints")
  if config.init_from and not checkpoint.is_jdit_checkpoint(directory):
    from jdit.convert import load_dit_checkpoint
    model, params = load_dit_checkpoint(config.init_from)
  else:
    if not checkpoint.is_jdit_checkpoint(directory):
      raise FileNotFoundError(f"--workdir={workdir}: no checkpoint in {directory}; train first or set "
                              "--config.init_from")
    model, params = checkpoint.load_pretrained(directory)
  mesh = sharding.make_mesh(dict(config.mesh))
  params = jax.device_put(params, sharding.replicated(mesh))
  labels = sample_labels(config, model, config.sample.num_samples)
  images = generate(make_sampler(config, model), config, model, params, labels, mesh, config.sample.seed,
                    make_decoder(config))
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples.npz")
    np.savez(path + ".tmp.npz", images=images, labels=labels)
    os.replace(path + ".tmp.npz", path)
    shown = np.concatenate([np.flatnonzero(labels == c)[:10] for c in np.unique(labels)[:10]])
    save_png(make_grid(images[shown], min(len(np.unique(labels)), 10)), os.path.join(workdir, "samples.png"))
    print(f"wrote {len(images)} samples to {path}", flush=True)
  return os.path.join(workdir, "samples.npz")
