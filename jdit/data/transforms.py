"""Per-record transforms (records -> model inputs) and the host batch conversion.

Images: ADM center crop, optional random horizontal flip, uint8. Cached latents: a fresh posterior draw each
read, a random flip, and the VAE's own scaling, (z - shift_factor) * scaling_factor, read from the cache.
Unreadable images are skipped and reported; they never crash a run.
"""
import io
import logging
from typing import Callable

import numpy as np
from PIL import Image


def cover_crop(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
  """ADM-style resize to cover (H, W), then a centre crop: halve with a box filter while both sides stay >= 2x
  the target, bicubic-resize by the larger of H / h and W / w, crop what is left over."""
  height, width = shape
  while image.size[0] >= 2 * width and image.size[1] >= 2 * height:
    image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
  scale = max(width / image.size[0], height / image.size[1])
  image = image.resize(tuple(max(round(x * scale), t) for x, t in zip(image.size, (width, height))),
                       resample=Image.BICUBIC)
  array = np.asarray(image)
  top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
  return array[top:top + height, left:left + width]


def center_crop(image: Image.Image, size: int) -> np.ndarray:
  """ADM center crop: halve with a box filter while >= 2x the size, bicubic-resize the short side, crop."""
  return cover_crop(image, (size, size))


class Preprocess:
  """Record -> {"image": uint8 (H, W, channels), "label": int32} or None when unreadable; `shape` is (H, W) or
  one side of a square."""

  def __init__(self, shape: int | tuple[int, int], channels: int):
    self.shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
    self.channels, self.skipped = channels, 0

  def __call__(self, record: dict) -> dict | None:
    image = record["image"]
    height, width = self.shape
    try:
      if isinstance(image, (bytes, np.bytes_)):
        image = Image.open(io.BytesIO(image))
        image.load()
      else:
        image = Image.fromarray(np.asarray(image).squeeze(-1) if np.ndim(image) == 3 and np.shape(image)[-1] == 1
                                else np.asarray(image))
      if image.size != (width, height):
        image = Image.fromarray(cover_crop(image.convert("RGB"), self.shape))
      image = np.asarray(image.convert("RGB" if self.channels == 3 else "L"), np.uint8)
    except Exception as e:  # Pillow raises many error types for broken data
      self.skipped += 1
      logging.warning("skipping unreadable image (%d skipped in this process): %s", self.skipped, e)
      return None
    return {"image": image.reshape(height, width, self.channels), "label": np.int32(record["label"])}


class ImageTransform:
  """Record -> preprocessed uint8 image and label, flipped horizontally with probability 1/2 if asked."""

  def __init__(self, shape: int | tuple[int, int], channels: int, random_flip: bool):
    self.preprocess, self.random_flip = Preprocess(shape, channels), random_flip

  def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
    element = self.preprocess(record)
    if element is not None and self.random_flip and rng.random() < 0.5:
      element["image"] = element["image"][:, ::-1]
    return element


class Rotated:
  """A transform whose images (H, W, C) are turned by `quarters` x 90 degrees counterclockwise (data.rotate)."""

  def __init__(self, transform, quarters: int):
    self.transform, self.quarters = transform, quarters

  def __call__(self, record: dict, rng: np.random.Generator) -> dict | None:
    element = self.transform(record, rng)
    if element is not None:
      element["image"] = np.ascontiguousarray(np.rot90(element["image"], self.quarters, axes=(0, 1)))
    return element


SOURCE_IMAGE = "source_image"  # a latent element's clean image (DrawLatent with images; REPA's encoder input)


class DrawLatent:
  """Latent record -> {"image": (z - shift_factor) * scaling_factor, "label"}, z a fresh posterior sample (or the
  mean) of the image or, with random_flip, of its flip with probability 1/2. With `images` (the source image of
  a record's index, uint8 (H, W, 3)), also "source_image": that image, flipped with the latent (REPA's input)."""

  def __init__(self, scaling_factor: float, shift_factor: float = 0.0, sample: bool = True,
               random_flip: bool = True, images: Callable[[int], np.ndarray] | None = None):
    self.scale, self.shift, self.sample, self.random_flip = scaling_factor, shift_factor, sample, random_flip
    self.images = images

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    flip = "flip_" if self.random_flip and rng.random() < 0.5 else ""
    mean, logvar = record[flip + "mean"], record[flip + "logvar"]
    latent = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32) if self.sample else mean
    element = {"image": (self.scale * (latent - self.shift)).astype(np.float32), "label": np.int32(record["label"])}
    if self.images is not None:
      image = self.images(int(record["index"]))
      element[SOURCE_IMAGE] = np.ascontiguousarray(image[:, ::-1] if flip else image)
    return element


def image_transform(data, source, shape: tuple[int, int] | None = None) -> ImageTransform:
  """The transform of image sources: resized and cropped to `shape` (a bucket's (H, W)), default data.image_size
  squares, of data.channels, flipped if data.random_flip."""
  del source
  return ImageTransform(shape or data.image_size, data.channels, data.random_flip)


def to_model_batch(batch: dict) -> dict:
  """uint8 images -> float32 in [-1, 1]; float inputs (latents) pass through; integer arrays (labels) int32."""
  image = batch["image"]
  image = image.astype(np.float32) / 127.5 - 1.0 if image.dtype == np.uint8 else image.astype(np.float32)
  ints = {k: v.astype(np.int32) for k, v in batch.items() if k != "image" and np.issubdtype(v.dtype, np.integer)}
  return {**batch, **ints, "image": image}
