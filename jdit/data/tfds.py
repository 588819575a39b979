"""Any tfds dataset prepared in array_record format, read with tfds.data_source (no TensorFlow).

    data.source = "tfds"    data.name = "imagenet2012"    data.data_dir = tfds data_dir (default TFDS_DATA_DIR)
"""
import os

from jdit.data import checks, transforms
from jdit.data.readers import DatasetNotFoundError

PROVIDES = ("image", "label")


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
  import tensorflow_datasets
  try:
    source = tensorflow_datasets.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise DatasetNotFoundError(
        f"data.name={name!r} split={split!r}: not found under {where} in array_record format "
        f"({type(e).__name__}); prepare it with `tfds build {name} --file_format=array_record "
        f"--data_dir={where}` or set --config.data.data_dir") from e
  return TfdsSource(source)


def open_source(data) -> TfdsSource:
  return open_tfds(data.name, data.split, data.data_dir)


transform = transforms.image_transform
check = checks.check_images
