"""Image folders (ImageNet layout: one sub-folder per class) converted once into array_record shards.

Each record holds the class index (int32) and the original encoded file bytes; files Pillow cannot read are skipped,
counted and reported. Shards are written to temporary names and renamed when complete, so an interrupted
conversion leaves no half-written shard behind.
"""
import io
import json
import os
import struct

from PIL import Image

from jdit.data.sources import FOLDER_META

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def serialize_record(image_bytes: bytes, label: int) -> bytes:
  """The label as a little-endian int32, then the encoded image bytes."""
  return struct.pack("<i", label) + image_bytes


def parse_record(record: bytes) -> dict:
  return {"label": struct.unpack("<i", record[:4])[0], "image": record[4:]}


def list_images(src: str) -> tuple[list[str], list[tuple[str, int]]]:
  """(sorted class names, [(path, class index)]) of a folder of class sub-folders."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"--src={src}: not a directory of class sub-folders")
  classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
  if not classes:
    raise FileNotFoundError(f"--src={src}: no class sub-folders found")
  files = []
  for index, name in enumerate(classes):
    for root, _, names in sorted(os.walk(os.path.join(src, name))):
      files += [(os.path.join(root, n), index) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
  return classes, files


def readable(data: bytes) -> bool:
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
    return True
  except Exception:  # Pillow raises many error types for broken files
    return False


def convert_folder(src: str, out: str, split: str = "train", num_shards: int = 8, log=print) -> dict:
  """Writes {split}.array_record-0000N-of-0000M shards and jdit_folder.json; returns counts."""
  from array_record.python.array_record_module import ArrayRecordWriter

  classes, files = list_images(src)
  os.makedirs(out, exist_ok=True)
  num_shards = max(1, min(num_shards, len(files)))
  final = [os.path.join(out, f"{split}.array_record-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
  writers = [ArrayRecordWriter(path + ".tmp", "group_size:1") for path in final]
  written = skipped = 0
  for i, (path, label) in enumerate(files):
    with open(path, "rb") as f:
      data = f.read()
    if not readable(data):
      skipped += 1
      log(f"skipping unreadable image {path}")
      continue
    writers[written % num_shards].write(serialize_record(data, label))
    written += 1
    if (i + 1) % 1000 == 0 or i + 1 == len(files):
      log(f"{i + 1}/{len(files)} files, {written} written, {skipped} skipped")
  for writer, path in zip(writers, final):
    writer.close()
    os.replace(path + ".tmp", path)
  with open(os.path.join(out, FOLDER_META), "w") as f:
    json.dump({"classes": classes, "splits": {split: written}}, f)
  return {"written": written, "skipped": skipped, "classes": len(classes)}
