"""Record formats on disk: what a shard holds and how its files are named (no reading or writing logic).

    image records   the class index (int32), then the original encoded file bytes (tools/prepare_image_folder.py)
    latent records  label, shape and the source index, then the VAE posterior moments (mean, logvar) of an image
                    and of its horizontal flip, float32 (tools/extract_latents.py); jdit_latents.json describes
                    the cache
    captioned       the caption's byte length (uint32), the UTF-8 caption, then the original encoded file bytes
    image sizes     {split}.sizes.npy beside the image shards: (height, width) of each record (aspect buckets)
    array records   a JSON header (its byte length, uint32, first) with the record's fields and the names,
                    dtypes and shapes of the arrays that follow it (text embeddings, tools/encode_text.py)
"""
import json
import math
import os
import struct

import numpy as np

FOLDER_META = "jdit_folder.json"  # class names (or "captions": true) and counts, next to the image-record shards
LATENT_SETTINGS = "jdit_latents.settings.json"  # what determines a latent cache, claimed before its first shard
LATENT_META = "jdit_latents.json"  # latent shape, the VAE's scaling, image size and channel statistics
SIZES = "{split}.sizes.npy"  # (N, 2) int32 (height, width) of each image record in source order (buckets)
_LABEL = struct.Struct("<i")
_LENGTH = struct.Struct("<I")
_LATENT_HEADER = struct.Struct("<4i")  # label, h, w, c


def serialize_image(image_bytes: bytes, label: int) -> bytes:
  return _LABEL.pack(label) + image_bytes


def parse_image(record: bytes) -> dict:
  return {"label": _LABEL.unpack_from(record)[0], "image": record[_LABEL.size:]}


def serialize_captioned(image_bytes: bytes, caption: str) -> bytes:
  text = caption.encode("utf-8")
  return _LENGTH.pack(len(text)) + text + image_bytes


def parse_captioned(record: bytes) -> dict:
  """{"caption", "image"} (image: encoded bytes) and label 0, so image pipelines read captioned sets too."""
  size = _LENGTH.unpack_from(record)[0]
  begin = _LENGTH.size
  return {"caption": record[begin:begin + size].decode("utf-8"), "image": record[begin + size:], "label": 0}


def serialize_arrays(fields: dict, arrays: dict[str, np.ndarray]) -> bytes:
  """A record of JSON-able `fields` and named arrays (stored in their dtype, bfloat16 included)."""
  arrays = {name: np.asarray(a) for name, a in arrays.items()}  # tobytes() writes C order
  header = json.dumps({"fields": fields, "arrays": [[n, str(a.dtype), list(a.shape)] for n, a in arrays.items()]})
  header = header.encode("utf-8")
  return _LENGTH.pack(len(header)) + header + b"".join(a.tobytes() for a in arrays.values())


def parse_arrays(record: bytes) -> dict:
  """{**fields, name: array} of a serialize_arrays record (arrays are read-only views of the record)."""
  import ml_dtypes
  size = _LENGTH.unpack_from(record)[0]
  header = json.loads(record[_LENGTH.size:_LENGTH.size + size])
  out, offset = dict(header["fields"]), _LENGTH.size + size
  for name, dtype, shape in header["arrays"]:
    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    count = math.prod(shape)
    out[name] = np.frombuffer(record, dtype, count, offset).reshape(shape)
    offset += count * np.dtype(dtype).itemsize
  return out


def image_shard_paths(out: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(out, f"{split}.array_record-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def sizes_path(out: str, split: str) -> str:
  return os.path.join(out, SIZES.format(split=split))


def write_sizes(out: str, split: str, sizes) -> None:
  """Atomically, like the shards."""
  path = sizes_path(out, split)
  with open(path + ".tmp", "wb") as f:
    np.save(f, np.asarray(sizes, np.int32).reshape(-1, 2))
  os.replace(path + ".tmp", path)


def serialize_latent(label: int, mean, logvar, flip_mean, flip_logvar, index: int) -> bytes:
  """Header (label, h, w, c, the record's index in the source dataset), then the four float32 moments."""
  h, w, c = mean.shape
  arrays = (np.asarray(a, np.float32).tobytes() for a in (mean, logvar, flip_mean, flip_logvar))
  return _LATENT_HEADER.pack(int(label), h, w, c) + _LABEL.pack(int(index)) + b"".join(arrays)


def parse_latent(record: bytes) -> dict:
  """{"label", "index" (-1 in caches written before it was stored), "mean", "logvar", "flip_mean",
  "flip_logvar"}; the header's length tells the two formats apart."""
  label, h, w, c = _LATENT_HEADER.unpack_from(record)
  header = len(record) - 16 * h * w * c
  index = _LABEL.unpack_from(record, _LATENT_HEADER.size)[0] if header > _LATENT_HEADER.size else -1
  arrays = np.frombuffer(record, np.float32, offset=header).reshape(4, h, w, c)
  return {"label": label, "index": index, "mean": arrays[0], "logvar": arrays[1], "flip_mean": arrays[2],
          "flip_logvar": arrays[3]}


def latent_shard_paths(out: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(out, f"{split}.latents-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def read_json(directory: str, name: str) -> dict | None:
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(directory: str, name: str, contents: dict) -> None:
  """Atomically (temporary file, then rename)."""
  path = os.path.join(directory, name)
  with open(path + ".tmp", "w") as f:
    json.dump(contents, f, indent=1)
  os.replace(path + ".tmp", path)


def require_positive(**counts: int) -> None:
  """ValueError naming the first flag (--NAME) whose count is below 1: sizes and counts are never clamped."""
  for name, value in counts.items():
    if value < 1:
      raise ValueError(f"--{name}={value}: expected an integer >= 1")


def check_directory(out: str) -> None:
  """ValueError when a writer's output directory `out` exists as something else."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out} is a file, not a directory")


def claim_settings(out: str, name: str, settings: dict, flags: dict | None = None) -> None:
  """A resumable writer's settings (what determines its output), recorded in out/<name> before its first shard;
  resuming under other settings is a ValueError naming the first field that differs (as the flag `flags` maps it
  to, when given) and how to start over. Settings are compared as JSON."""
  settings = json.loads(json.dumps(settings))
  check_directory(out)
  stored = read_json(out, name)
  if stored is None:
    os.makedirs(out, exist_ok=True)
    write_json(out, name, settings)
    return
  for key in sorted(set(stored) | set(settings)):
    if stored.get(key) != settings.get(key):
      flag = (flags or {}).get(key, key)
      raise ValueError(f"{flag}={settings.get(key)!r}: {out} holds output written with {flag}={stored.get(key)!r}; "
                       f"rerun with the same settings to resume, or write to a new directory (or delete {out}) to "
                       "start over")
