"""VAE posterior moments cached by tools/extract_latents.py: latent models train on these, drawing a fresh
posterior sample (or the mean) each read, scaled by the VAE's own factors from the cache's jdit_latents.json.

    data.source = "latents"    data.data_dir = the cache    data.image_size = the size it was extracted at
"""
import os

import numpy as np

from jdit.data import checks, records, transforms
from jdit.data.readers import ArrayRecordSource, DatasetNotFoundError

PROVIDES = ("image", "label")
LATENT = True  # source.meta holds the VAE's scaling_factor and shift_factor
META_KEYS = ("latent_shape", "image_size", "scaling_factor", "shift_factor")


def open_latents(data_dir: str, split: str) -> ArrayRecordSource:
  """The finished latent cache of `data_dir`; its `meta` holds the latent shape and the VAE's scaling."""
  meta = records.read_json(data_dir, records.LATENT_META)
  paths = records.latent_shard_paths(data_dir, split, meta["num_shards"]) if meta else []
  if meta is None or meta["split"] != split or not all(os.path.exists(p) for p in paths):
    raise DatasetNotFoundError(
        f"data.data_dir={data_dir!r}: no finished latent dataset ({split}.latents-* shards and "
        f"{records.LATENT_META}); extract one with `python tools/extract_latents.py --out={data_dir} ...`")
  missing = [k for k in META_KEYS if k not in meta]
  if missing:
    raise ValueError(f"data.data_dir={data_dir!r}: {records.LATENT_META} lacks {', '.join(missing)} (written by an "
                     "older jdit); add them by hand (the SD VAE: scaling_factor 0.18215, shift_factor 0.0) or "
                     "extract the cache again")
  source = ArrayRecordSource(paths, records.parse_latent, meta)
  if meta.get("buckets"):  # extracted with aspect-ratio buckets: each latent's (h, w), for data.buckets
    source.sizes = np.load(records.sizes_path(data_dir, split), allow_pickle=False)
  return source


def open_source(data) -> ArrayRecordSource:
  return open_latents(data.data_dir, data.split)


def draw(data, meta: dict) -> transforms.DrawLatent:
  """The latent draw of a cache described by `meta`, as data asks (posterior sample or mean, flips); with
  data.images_dir, each latent's source image too (source_images)."""
  images = source_images(data.images_dir, data.split, meta["image_size"]) if data.get("images_dir") else None
  return transforms.DrawLatent(meta["scaling_factor"], meta["shift_factor"],
                               sample=data.latent_sampling == "sample", random_flip=data.random_flip, images=images)


def source_images(images_dir: str, split: str, image_size: int):
  """index -> the uint8 (image_size, image_size, 3) image of record `index` of the converted image folder a cache
  was extracted from, cropped as tools/extract_latents.py cropped it (REPA's encoder reads these)."""
  from jdit.data.folder import open_folder
  folder, preprocess = open_folder(images_dir, split), transforms.Preprocess(image_size, 3)

  def image(index: int) -> np.ndarray:
    if index < 0:
      raise ValueError(f"data.images_dir={images_dir!r}: the latent cache predates the source index each record "
                       "now keeps; extract it again")
    element = preprocess(folder[index])
    if element is None:
      raise ValueError(f"data.images_dir={images_dir!r}: record {index} is not a readable image")
    return element["image"]

  return image


def transform(data, source, shape=None) -> transforms.DrawLatent:
  del shape  # a bucketed cache holds each latent at its bucket's shape already
  return draw(data, source.meta)


check = checks.check_latents
