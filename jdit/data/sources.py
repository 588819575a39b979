"""Random-access data sources (readers) yielding records.

    digits   scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default, no download
    digit_scenes  two colored digits per 8x16 canvas with captions, made from the same digits (text-to-image)
    tfds     any tfds dataset prepared in array_record format (read with tfds.data_source, no TensorFlow)
    folder   an image folder converted once by tools/prepare_image_folder.py into array_record shards (class
             sub-folders, or a captioned imagefolder: records then also carry "caption")
    latents  VAE posterior moments cached by tools/extract_latents.py
    captioned  such latents joined with their captions' cached text embeddings (jdit.text.captioned)
Image sources yield {"image": uint8 (H, W, C) or encoded bytes, "label": int}; the latent source yields
{"label", "mean", "logvar", "flip_mean", "flip_logvar"} and carries the cache description as `meta`.
"""
import glob
import os

import numpy as np

from jdit.data import records

SOURCES = ("digits", "tfds", "folder", "latents", "captioned", "digit_scenes")
LATENT_META_KEYS = ("latent_shape", "image_size", "scaling_factor", "shift_factor")


class DatasetNotFoundError(FileNotFoundError):
  """The configured dataset is not where the config points; the message says how to prepare it."""


class DigitsSource:
  """The 8x8 grayscale digits scaled to uint8 0..255, shape (8, 8, 1)."""

  def __init__(self):
    from sklearn.datasets import load_digits
    digits = load_digits()
    self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    self.labels = digits.target.astype(np.int32)
    self.sizes = np.full((len(self.labels), 2), 8, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}


class ArrayRecordSource:
  """Records of array_record shards, decoded by `parse` (records.parse_image or records.parse_latent)."""

  def __init__(self, paths: list[str], parse, meta: dict | None = None, sizes: np.ndarray | None = None):
    import grain
    self.records, self.parse, self.meta = grain.sources.ArrayRecordDataSource(paths), parse, meta
    self.sizes = sizes  # (N, 2) (height, width) of image records, when the preparation tool recorded them

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.parse(self.records[index])


class TfdsSource:
  """Adapter from a tfds data source to {"image", "label"} records."""

  def __init__(self, source, image_key: str = "image", label_key: str = "label"):
    self.source, self.image_key, self.label_key = source, image_key, label_key

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = self.source[index]
    return {"image": record[self.image_key], "label": int(record.get(self.label_key, 0))}


def open_tfds(name: str, split: str, data_dir: str | None) -> TfdsSource:
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DatasetNotFoundError(
        f"data.name={name!r} split={split!r}: not found under {where} in array_record format "
        f"({type(e).__name__}); prepare it with `tfds build {name} --file_format=array_record "
        f"--data_dir={where}` or set --config.data.data_dir") from e
  return TfdsSource(source)


def open_folder(data_dir: str, split: str) -> ArrayRecordSource:
  pattern = os.path.join(data_dir, f"{split}.array_record-*")
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise DatasetNotFoundError(
        f"data.data_dir={data_dir!r}: no {split!r} shards ({pattern}); convert an image folder with "
        f"`python tools/prepare_image_folder.py --src=IMAGES --out={data_dir}`")
  meta = records.read_json(data_dir, records.FOLDER_META) or {}
  parse = records.parse_captioned if meta.get("captions") else records.parse_image
  source = ArrayRecordSource(paths, parse, meta)
  sizes_file = records.sizes_path(data_dir, split)
  if os.path.exists(sizes_file):
    sizes = np.load(sizes_file, allow_pickle=False)
    source.sizes = sizes if len(sizes) == len(source) else None  # stale: read the sizes again when needed
  return source


def image_sizes(source, log=print) -> np.ndarray:
  """(N, 2) int32 (height, width) of every image of `source` (0 where unreadable): those the preparation tool
  recorded, else read once from the records (with progress)."""
  if getattr(source, "sizes", None) is not None:
    return np.asarray(source.sizes, np.int32)
  import io

  from PIL import Image
  sizes = np.zeros((len(source), 2), np.int32)
  for i in range(len(source)):
    image = source[i]["image"]
    try:
      if isinstance(image, (bytes, np.bytes_)):
        with Image.open(io.BytesIO(image)) as opened:
          sizes[i] = opened.size[1], opened.size[0]
      else:
        sizes[i] = np.shape(image)[:2]
    except Exception:  # Pillow raises many error types for broken data: the image is dropped
      pass
    if (i + 1) % 10_000 == 0 or i + 1 == len(source):
      log(f"image sizes for buckets: {i + 1}/{len(source)}")
  return sizes


def open_latents(data_dir: str, split: str) -> ArrayRecordSource:
  """The finished latent cache of `data_dir`; its `meta` holds the latent shape and the VAE's scaling."""
  meta = records.read_json(data_dir, records.LATENT_META)
  paths = records.latent_shard_paths(data_dir, split, meta["num_shards"]) if meta else []
  if meta is None or meta["split"] != split or not all(os.path.exists(p) for p in paths):
    raise DatasetNotFoundError(
        f"data.data_dir={data_dir!r}: no finished latent dataset ({split}.latents-* shards and "
        f"{records.LATENT_META}); extract one with `python tools/extract_latents.py --out={data_dir} ...`")
  missing = [k for k in LATENT_META_KEYS if k not in meta]
  if missing:
    raise ValueError(f"data.data_dir={data_dir!r}: {records.LATENT_META} lacks {', '.join(missing)} (written by an "
                     "older jdit); add them by hand (the SD VAE: scaling_factor 0.18215, shift_factor 0.0) or "
                     "extract the cache again")
  source = ArrayRecordSource(paths, records.parse_latent, meta)
  if meta.get("buckets"):  # extracted with aspect-ratio buckets: each latent's (h, w), for data.buckets
    source.sizes = np.load(records.sizes_path(data_dir, split), allow_pickle=False)
  return source


def open_source(data_cfg):
  """The source named by data_cfg.source; DatasetNotFoundError says where it looked and how to prepare it."""
  if data_cfg.source == "digits":
    return DigitsSource()
  if data_cfg.source == "digit_scenes":  # captioned 8x16 two-digit canvases (jdit.data.digit_scenes)
    from jdit.data.digit_scenes import DigitScenesSource
    return DigitScenesSource(data_cfg.split, data_cfg.seed)
  if data_cfg.source == "tfds":
    return open_tfds(data_cfg.name, data_cfg.split, data_cfg.data_dir)
  if data_cfg.source == "folder":
    return open_folder(data_cfg.data_dir, data_cfg.split)
  if data_cfg.source == "latents":
    return open_latents(data_cfg.data_dir, data_cfg.split)
  if data_cfg.source == "captioned":  # latents joined with cached text embeddings (text-to-image families)
    from jdit.text.captioned import open_captioned
    return open_captioned(data_cfg)
  raise ValueError(f"data.source must be one of {SOURCES}, got {data_cfg.source!r}")
