"""Reference images of a dataset for the evaluation (tools/evaluate.py --write_ref): a seeded random subset, as
ADM center crops of an image source, or a latent cache's posterior means decoded by the VAE that encoded it."""
import numpy as np

import jax

from jdit import sample
from jdit.data import sources
from jdit.data.transforms import Preprocess
from jdit.eval import batches
from jdit.eval.evaluate import activations, reference_statistics


def dataset_images(data, num_images: int, image_size: int, seed: int = 0, vae=None, batch_size: int = 200,
                   log=print) -> np.ndarray:
  """(N, H, W, 3) uint8 images of a seeded random subset of config.data-like `data` (source, data_dir, name,
  split): ADM center crops at image_size of an image source, or, for a latent source, its posterior means
  decoded by `vae` (config.vae-like: path, name, decode_tile), rounded as the sampler does."""
  source = sources.open_source(data)
  order = np.random.default_rng(seed).permutation(len(source))
  if sources.latent_meta(data, source) is not None:
    return decoded_latents(data, source, order[:num_images], vae, batch_size, log)
  preprocess, images = Preprocess(image_size, 3), []
  for index in order:
    element = preprocess(source[int(index)])
    if element is not None:
      images.append(element["image"])
    if len(images) == num_images:
      break
    if len(images) % 1000 == 0 and images:
      log(f"{len(images)}/{num_images} reference images")
  return np.stack(images)


def decoded_latents(data, source, indices, vae, batch_size: int, log=print) -> np.ndarray:
  """The posterior means of `indices` of a latent cache through the VAE decoder, to uint8 as the sampler does."""
  if vae is None or not vae.path:
    raise ValueError(f"data.source={data.source!r}: reference images of latents need the VAE that encoded the "
                     "cache (vae.path)")
  if source.meta.get("buckets"):
    raise ValueError(f"data.data_dir={data.data_dir}: a bucketed latent cache holds several image sizes; a "
                     "reference batch needs one")
  decode, _ = sample.make_decoder(vae, latent_meta=source.meta)  # checks the VAE's scaling against the cache's
  scale, shift = source.meta["scaling_factor"], source.meta["shift_factor"]
  images = []
  for begin in range(0, len(indices), batch_size):
    means = np.stack([source[int(i)]["mean"] for i in indices[begin:begin + batch_size]])
    padded = np.concatenate([means, np.zeros((batch_size - len(means), *means.shape[1:]), means.dtype)])
    images.append(sample.to_uint8(decode(scale * (padded - shift)))[:len(means)])  # one compilation
    log(f"{begin + len(means)}/{len(indices)} reference images decoded")
  return np.concatenate(images)


def write_reference(out: str, images, model, params, batch_size: int, log=print) -> None:
  """ADM's reference batch at `out`: `images` (an (N, H, W, 3) uint8 array, or the path of an .npz whose arr_0
  is streamed: each host reads only its block for the features) and their Inception statistics (written by
  process 0)."""
  if isinstance(images, str):
    stored = batches.open_images(images)
    features = activations(model, params, stored, batch_size, log)
    images = np.concatenate(list(stored.batches(batch_size))) if jax.process_index() == 0 else None
  else:
    features = activations(model, params, images, batch_size, log)
  if jax.process_index() == 0:
    batches.write_reference(out, images, reference_statistics(features))
    log(f"wrote {len(images)} reference images {images.shape[1]}x{images.shape[2]} and their statistics to {out}")
