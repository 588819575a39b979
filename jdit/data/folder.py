"""An image folder converted once by tools/prepare_image_folder.py into array_record shards: class sub-folders,
or a captioned imagefolder (records then also carry "caption", which tools/encode_text.py encodes).

    data.source = "folder"    data.data_dir = the converted shards
"""
import glob
import os

import numpy as np

from jdit.data import checks, records, transforms
from jdit.data.readers import ArrayRecordSource, DatasetNotFoundError

PROVIDES = ("image", "label")


def open_folder(data_dir: str, split: str) -> ArrayRecordSource:
  pattern = os.path.join(data_dir, f"{split}.array_record-*")
  paths = sorted(p for p in glob.glob(pattern) if not p.endswith(".tmp"))  # never a shard being written
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


def open_source(data) -> ArrayRecordSource:
  return open_folder(data.data_dir, data.split)


transform = transforms.image_transform
check = checks.check_images
