"""Cached VAE latents: extraction into array_record shards, and the source that training reads.

Each record holds an image's label and the posterior moments (mean, logvar) of the image AND of its horizontal
flip. Training draws a fresh latent mean + exp(logvar / 2) * eps every time it reads a record and picks the flip
at random, so neither the flip nor one posterior sample is frozen at extraction. Shards are written to temporary
names and renamed when complete: an interrupted extraction resumes by skipping finished shards, and each host
encodes only its own shards (shard i on host i mod num_hosts).
"""
import json
import os
import struct
import time

import jax
import numpy as np

META = "jdit_latents.json"
_HEADER = struct.Struct("<4i")  # label, h, w, c


def serialize(label: int, mean, logvar, flip_mean, flip_logvar) -> bytes:
  h, w, c = mean.shape
  arrays = (np.asarray(a, np.float32).tobytes() for a in (mean, logvar, flip_mean, flip_logvar))
  return _HEADER.pack(int(label), h, w, c) + b"".join(arrays)


def parse(record: bytes) -> dict:
  label, h, w, c = _HEADER.unpack_from(record)
  arrays = np.frombuffer(record, np.float32, offset=_HEADER.size).reshape(4, h, w, c)
  return {"label": label, "mean": arrays[0], "logvar": arrays[1], "flip_mean": arrays[2], "flip_logvar": arrays[3]}


class LatentSource:
  """Random access to the records of `data_dir` (split `split`)."""

  def __init__(self, data_dir: str, split: str = "train"):
    import grain
    from jdit.data.sources import DatasetNotFoundError
    meta = read_meta(data_dir)
    paths = _shard_paths(data_dir, split, meta["num_shards"]) if meta else []
    if meta is None or meta["split"] != split or not all(os.path.exists(p) for p in paths):
      raise DatasetNotFoundError(
          f"data.data_dir={data_dir!r}: no finished latent dataset ({split}.latents-* shards and {META}); "
          f"extract one with `python tools/extract_latents.py --out={data_dir} ...`")
    self.records, self.meta = grain.sources.ArrayRecordDataSource(paths), meta

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    return parse(self.records[index])


class DrawLatent:
  """Record -> {"image": scale * (a fresh posterior sample, or the mean), "label"}, flip chosen at random."""

  def __init__(self, scale: float, sample: bool = True):
    self.scale, self.sample = scale, sample

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    flip = "flip_" if rng.random() < 0.5 else ""
    mean, logvar = record[flip + "mean"], record[flip + "logvar"]
    latent = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32) if self.sample else mean
    return {"image": (self.scale * latent).astype(np.float32), "label": np.int32(record["label"])}


def read_meta(data_dir: str) -> dict | None:
  path = os.path.join(data_dir, META)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _shard_paths(out: str, split: str, num_shards: int) -> list[str]:
  return [os.path.join(out, f"{split}.latents-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]


def extract(source, encode_fn, out: str, *, image_size: int, channels: int = 3, split: str = "train",
            num_shards: int = 16, batch_size: int = 32, host: int = 0, num_hosts: int = 1, log=print) -> dict:
  """Encodes every image of `source` and its flip with encode_fn(images (B, S, S, C) in [-1, 1]) -> (mean, logvar)
  into this host's shards; writes META (with per-channel statistics) once all shards exist. Returns META or None."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from jdit.data.pipeline import Preprocess

  os.makedirs(out, exist_ok=True)
  preprocess = Preprocess(image_size, channels)
  paths = _shard_paths(out, split, num_shards)
  start, done = time.time(), 0
  mine = [i for i in range(num_shards) if i % num_hosts == host]
  for shard in mine:
    if os.path.exists(paths[shard]):
      log(f"shard {shard + 1}/{num_shards} already done, skipping")
      continue
    indices = list(range(shard, len(source), num_shards))
    writer = ArrayRecordWriter(paths[shard] + ".tmp", "group_size:1")
    stats = np.zeros((3, 0))
    for begin in range(0, len(indices), batch_size):
      elements = [e for e in (preprocess(source[i]) for i in indices[begin:begin + batch_size]) if e is not None]
      if not elements:
        continue
      images = np.stack([e["image"] for e in elements]).astype(np.float32) / 127.5 - 1.0
      mean, logvar = map(np.asarray, jax.device_get(encode_fn(images)))
      flip_mean, flip_logvar = map(np.asarray, jax.device_get(encode_fn(images[:, :, ::-1])))
      for k, e in enumerate(elements):
        writer.write(serialize(e["label"], mean[k], logvar[k], flip_mean[k], flip_logvar[k]))
      flat = mean.reshape(-1, mean.shape[-1])
      batch_stats = np.stack([flat.sum(0), (flat ** 2).sum(0), np.full(flat.shape[1], len(flat))])
      stats = batch_stats if stats.size == 0 else stats + batch_stats
      done += len(elements)
      log(f"shard {shard + 1}/{num_shards}: {min(begin + batch_size, len(indices))}/{len(indices)} images "
          f"({done / max(time.time() - start, 1e-9):.1f} images/s)")
    writer.close()
    with open(paths[shard] + ".stats.json", "w") as f:
      json.dump({"sums": stats.tolist(), "shape": list(mean.shape[1:]), "skipped": preprocess.skipped}, f)
    os.replace(paths[shard] + ".tmp", paths[shard])
  return _finish(out, paths, split) if all(os.path.exists(p) for p in paths) else None


def _finish(out: str, paths: list[str], split: str) -> dict:
  sums, shape, skipped = None, None, 0
  for path in paths:
    with open(path + ".stats.json") as f:
      part = json.load(f)
    if part["sums"]:
      sums = np.asarray(part["sums"]) if sums is None else sums + np.asarray(part["sums"])
      shape = part["shape"]
    skipped += part["skipped"]
  count = sums[2]
  mean = sums[0] / count
  meta = {"split": split, "latent_shape": shape, "num_shards": len(paths), "num_latent_pixels": int(count[0]),
          "skipped_images": skipped, "channel_mean": mean.tolist(),
          "channel_std": np.sqrt(np.maximum(sums[1] / count - mean ** 2, 0.0)).tolist()}
  with open(os.path.join(out, META) + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(os.path.join(out, META) + ".tmp", os.path.join(out, META))
  return meta
