"""grain input pipeline: deterministic shuffling, host sharding, preprocessing, checkpointable iterators.

The data order depends only on the seed and the global batch size, never on the number of hosts: host h of
H reads, for global batch k of size G, the shuffled elements k G + h G/H ... k G + (h+1) G/H - 1. Random flips
are drawn from (seed, global element index). So 1 host and H hosts feed the model identical global batches.
Unreadable images are skipped and reported; they never crash a run.
"""
import io
import logging

import grain
import numpy as np
from PIL import Image


_MAX_ELEMENTS = 2 ** 62  # "infinite": the shuffled source repeats forever


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM center crop: halve with a box filter while >= 2x the size, bicubic-resize the short side, crop."""
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
  return array[top:top + size, left:left + size]


class Preprocess:
  """Record -> {"image": uint8 (size, size, channels), "label": int32} or None when unreadable."""

  def __init__(self, image_size: int, channels: int):
    self.image_size, self.channels, self.skipped = image_size, channels, 0

  def __call__(self, record: dict) -> dict | None:
    image = record["image"]
    try:
      if isinstance(image, (bytes, np.bytes_)):
        image = Image.open(io.BytesIO(image))
        image.load()
      else:
        image = Image.fromarray(np.asarray(image).squeeze(-1) if np.ndim(image) == 3 and np.shape(image)[-1] == 1
                                else np.asarray(image))
      if image.size != (self.image_size, self.image_size):
        image = Image.fromarray(center_crop(image.convert("RGB"), self.image_size))
      image = np.asarray(image.convert("RGB" if self.channels == 3 else "L"), np.uint8)
    except Exception as e:  # Pillow raises many error types for broken data
      self.skipped += 1
      logging.warning("skipping unreadable image (%d skipped in this process): %s", self.skipped, e)
      return None
    return {"image": image.reshape(self.image_size, self.image_size, self.channels),
            "label": np.int32(record["label"])}


class ImageTransform:
  """Record -> preprocessed uint8 image and label, flipped horizontally with probability 1/2 if asked."""

  def __init__(self, image_size: int, channels: int, random_flip: bool):
    self.preprocess, self.random_flip = Preprocess(image_size, channels), random_flip

  def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
    element = self.preprocess(record)
    if element is not None and self.random_flip and rng.random() < 0.5:
      element["image"] = element["image"][:, ::-1]
    return element


class HostElement:
  """Host-local element j -> transform(shuffled record, rng), laid out by global batch; the rng is drawn from
  (seed, global element index), so every host count sees the same flips and noise."""

  def __init__(self, shuffled, global_batch: int, host: int, num_hosts: int, seed: int, transform):
    self.shuffled, self.seed, self.transform = shuffled, seed, transform
    self.per_host, self.global_batch, self.host = global_batch // num_hosts, global_batch, host

  def __call__(self, j: int) -> dict | None:
    k, offset = divmod(j, self.per_host)
    index = k * self.global_batch + self.host * self.per_host + offset
    return self.transform(self.shuffled[index], np.random.default_rng([self.seed, index]))


def make_dataset(source, *, global_batch: int, transform=None, image_size: int = 0, channels: int = 3,
                 seed: int = 0, random_flip: bool = False, host: int = 0, num_hosts: int = 1, num_workers: int = 0):
  """An IterDataset of host-local batches {"image": (B_host, H, W, C), "label": int32 (B_host,)}; `transform`
  defaults to ImageTransform(image_size, channels, random_flip) (uint8 images)."""
  if global_batch % num_hosts:
    raise ValueError(f"batch_size={global_batch} must be divisible by the number of hosts ({num_hosts})")
  transform = transform or ImageTransform(image_size, channels, random_flip)
  shuffled = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  element = HostElement(shuffled, global_batch, host, num_hosts, seed, transform)
  ds = grain.MapDataset.range(_MAX_ELEMENTS).map(element).filter(lambda e: e is not None)
  ds = ds.to_iter_dataset().batch(global_batch // num_hosts, drop_remainder=True)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def transform_from_config(data):
  if data.source == "latents":
    from jdit.data.latents import DrawLatent
    return DrawLatent(data.latent_scale, sample=data.latent_sampling == "sample")
  return ImageTransform(data.image_size, data.channels, data.random_flip)


def dataset_from_config(config, source, host: int = 0, num_hosts: int = 1):
  data = config.data
  return make_dataset(source, global_batch=config.batch_size, transform=transform_from_config(data), seed=data.seed,
                      host=host, num_hosts=num_hosts, num_workers=data.num_workers)


def to_model_batch(batch: dict) -> dict:
  """uint8 images -> float32 in [-1, 1]; float inputs (latents) pass through."""
  image = batch["image"]
  image = image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image.astype(np.float32)
  return {"image": image, "label": batch["label"].astype(np.int32)}
