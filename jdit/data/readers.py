"""Readers shared by the data sources: array_record shards as random-access sources, the missing-dataset error,
and the (height, width) of every image of a source (aspect-ratio buckets)."""
import io

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
  """The configured dataset is not where the config points; the message says how to prepare it."""


class ArrayRecordSource:
  """Records of array_record shards, decoded by `parse` (records.parse_image, parse_latent, ...)."""

  def __init__(self, paths: list[str], parse, meta: dict | None = None, sizes: np.ndarray | None = None):
    import grain
    self.records, self.parse, self.meta = grain.sources.ArrayRecordDataSource(paths), parse, meta
    self.sizes = sizes  # (N, 2) (height, width) of image records, when the preparation tool recorded them

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return self.parse(self.records[index])


def image_sizes(source, log=print) -> np.ndarray:
  """(N, 2) int32 (height, width) of every image of `source` (0 where unreadable): those the preparation tool
  recorded, else read once from the records (with progress)."""
  if getattr(source, "sizes", None) is not None:
    return np.asarray(source.sizes, np.int32)
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
