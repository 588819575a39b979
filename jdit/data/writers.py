"""Dataset writers: an image folder (class sub-folders, or captioned) into record shards, and a dataset into a
cached-latent dataset.

Shards are written to temporary names and renamed when complete, so an interrupted run never leaves a
half-written shard behind; latent extraction resumes by skipping finished shards, and each host encodes only
its own shards (shard i on host i mod num_hosts).
"""
import io
import glob
import json
import os
import time

import jax
import numpy as np
from PIL import Image

from jdit.data import buckets as buckets_lib
from jdit.data import records
from jdit.data.readers import image_sizes
from jdit.data.transforms import Preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
#                                Image folders -> image records
# ----------------------------------------------------------------------------------------------

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


def image_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) of an encoded image, None when it cannot be decoded."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return image.size[1], image.size[0]
  except Exception:  # Pillow raises many error types for broken files
    return None


def list_captioned_images(src: str) -> tuple[list[tuple[str, str]], int]:
  """([(path, caption)], the number of images left out for want of a caption) of a Hugging Face imagefolder with
  captions: metadata.jsonl lines {"file_name", "text"}, or a caption file NAME.txt beside each image NAME.ext."""
  images = [os.path.join(root, name) for root, _, names in sorted(os.walk(src)) for name in sorted(names)
            if name.lower().endswith(IMAGE_EXTENSIONS)]
  metadata = os.path.join(src, "metadata.jsonl")
  if os.path.exists(metadata):
    files = []
    with open(metadata, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          files.append((os.path.join(src, entry["file_name"]), str(entry["text"])))
        except (json.JSONDecodeError, KeyError) as e:
          raise ValueError(f"{metadata} line {number}: expected a JSON object with file_name and text ({e})") from e
    listed = {os.path.normpath(path) for path, _ in files}
    return files, sum(os.path.normpath(path) not in listed for path in images)
  files = []
  for path in images:
    caption = os.path.splitext(path)[0] + ".txt"
    if os.path.exists(caption):
      with open(caption, encoding="utf-8") as f:
        files.append((path, f.read().strip()))
  return files, len(images) - len(files)


def is_captioned(src: str) -> bool:
  """Whether `src` is a captioned imagefolder (metadata.jsonl, or images with .txt captions at its top level)."""
  if os.path.exists(os.path.join(src, "metadata.jsonl")):
    return True
  names = set(os.listdir(src)) if os.path.isdir(src) else set()
  return any(n.lower().endswith(IMAGE_EXTENSIONS) and os.path.splitext(n)[0] + ".txt" in names for n in names)


def convert_folder(src: str, out: str, split: str = "train", num_shards: int = 8, log=print) -> dict:
  """Writes {split}.array_record-0000N-of-0000M shards, {split}.sizes.npy (each record's (height, width), for
  aspect-ratio buckets) and jdit_folder.json; returns counts. A folder of class sub-folders gives image records;
  a captioned imagefolder (see list_captioned_images) captioned records."""
  from array_record.python.array_record_module import ArrayRecordWriter

  uncaptioned = 0
  if is_captioned(src):
    (files, uncaptioned), classes = list_captioned_images(src), []
    serialize = records.serialize_captioned
    if uncaptioned:
      where = "metadata.jsonl" if os.path.exists(os.path.join(src, "metadata.jsonl")) else "a NAME.txt beside them"
      log(f"{uncaptioned} images have no caption in {where}: left out")
  else:
    classes, files = list_images(src)
    serialize = records.serialize_image
  if not files:
    expected = "captioned images" if serialize is records.serialize_captioned else \
        f"images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders"
    raise FileNotFoundError(f"--src={src}: no {expected} found")
  records.require_positive(num_shards=num_shards)
  records.check_directory(out)
  if num_shards > len(files):
    log(f"{len(files)} files: writing {len(files)} shards, not --num_shards={num_shards}")
  os.makedirs(out, exist_ok=True)
  final = records.image_shard_paths(out, split, min(num_shards, len(files)))
  writers = [ArrayRecordWriter(path + ".tmp", "group_size:1") for path in final]
  written = skipped = 0
  sizes = [[] for _ in writers]  # per shard, in record order
  for i, (path, target) in enumerate(files):
    data = size = None
    if os.path.exists(path):
      with open(path, "rb") as f:
        data = f.read()
      size = image_size(data)
    if size is None:
      skipped += 1
      log(f"skipping {'unreadable' if data else 'missing'} image {path}")
      continue
    writers[written % len(writers)].write(serialize(data, target))
    sizes[written % len(writers)].append(size)
    written += 1
    if (i + 1) % 1000 == 0 or i + 1 == len(files):
      log(f"{i + 1}/{len(files)} files, {written} written, {skipped} skipped")
  for writer in writers:
    writer.close()
  if not written:
    for path in final:
      os.remove(path + ".tmp")
    raise FileNotFoundError(f"--src={src}: none of its {len(files)} image files is readable; nothing was written")
  stale = set(glob.glob(os.path.join(out, f"{split}.array_record-*"))) - set(final) - {p + ".tmp" for p in final}
  for path in sorted(stale):  # an earlier conversion's shards (another count) or temporary files: replaced
    os.remove(path)
  for path in final:
    os.replace(path + ".tmp", path)
  records.write_sizes(out, split, [s for shard in sizes for s in shard])  # the source reads shards in order
  kind = {"classes": classes} if classes else {"captions": True}
  records.write_json(out, records.FOLDER_META, {**kind, "splits": {split: written}})
  return {"written": written, "skipped": skipped, "uncaptioned": uncaptioned, "classes": len(classes),
          "captioned": not classes}


# ----------------------------------------------------------------------------------------------
#                                 Images -> cached VAE latents
# ----------------------------------------------------------------------------------------------

def pending_shards(paths: list[str], num_items: int, host: int, num_hosts: int, log=print):
  """Yields (shard, its item indices shard, shard + N, ..., temporary path) for each shard of this host (shard
  mod num_hosts == host) not finished yet; once the caller's loop body has written and closed the temporary
  file, it is renamed to the shard's path, so a shard exists only when complete."""
  for shard, path in enumerate(paths):
    if shard % num_hosts != host:
      continue
    if os.path.exists(path):
      log(f"shard {shard + 1}/{len(paths)} already done, skipping")
      continue
    yield shard, list(range(shard, num_items, len(paths))), path + ".tmp"
    os.replace(path + ".tmp", path)


def extract_latents(source, encode_fn, out: str, *, image_size: int, scaling_factor: float, shift_factor: float,
                    split: str = "train", num_shards: int = 16, batch_size: int = 32, host: int = 0,
                    num_hosts: int = 1, buckets: str = "", bucket_max_crop: float = 0.2, identity: dict | None = None,
                    log=print) -> dict | None:
  """Encodes every image of `source` and its flip with encode_fn(images (B, H, W, 3) in [-1, 1]) -> (mean, logvar)
  into this host's shards; once all shards exist, writes jdit_latents.json (latent shape, image size, the VAE's
  scaling_factor and shift_factor, per-channel statistics) and returns it, else returns None. With `buckets`
  (a data.buckets spec) each image is encoded at its aspect-ratio bucket's shape (extreme ratios dropped) and
  {split}.sizes.npy holds each latent's (h, w), so training draws batches of one shape (data.buckets). The
  settings (and `identity`: the VAE and the source, from the tool) are claimed before the first shard: resuming
  under others is a one-line error (records.claim_settings)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  records.require_positive(image_size=image_size, num_shards=num_shards, batch_size=batch_size)
  records.claim_settings(out, records.LATENT_SETTINGS, {
      "split": split, "image_size": image_size, "num_shards": num_shards, "scaling_factor": scaling_factor,
      "shift_factor": shift_factor, "buckets": buckets, "bucket_max_crop": bucket_max_crop, **(identity or {})},
      {k: f"--{k}" for k in ("split", "image_size", "num_shards", "buckets", "bucket_max_crop", "vae", "vae_name",
                             "source", "data_dir", "name")})
  table = buckets_lib.parse_buckets(buckets, "--buckets") if buckets else ((image_size, image_size),)
  bucket_of = (buckets_lib.assign(image_sizes(source, log), table, bucket_max_crop) if buckets
               else np.zeros(len(source), np.int32))
  preprocess = [Preprocess(shape, 3) for shape in table]
  paths = records.latent_shard_paths(out, split, num_shards)
  start, done = time.time(), 0
  for shard, indices, temporary in pending_shards(paths, len(source), host, num_hosts, log):
    writer = ArrayRecordWriter(temporary, "group_size:1")
    stats, shapes, sizes, dropped = np.zeros((3, 0)), set(), [], int((bucket_of[indices] < 0).sum())
    groups = [[i for i in indices if bucket_of[i] == b] for b in range(len(table))]  # one shape per batch
    batches = [(b, group[k:k + batch_size]) for b, group in enumerate(groups)
               for k in range(0, len(group), batch_size)]
    for number, (bucket, batch) in enumerate(batches):
      elements = [(i, e) for i, e in ((i, preprocess[bucket](source[i])) for i in batch) if e is not None]
      if not elements:
        continue
      kept, elements = [i for i, _ in elements], [e for _, e in elements]
      images = np.stack([e["image"] for e in elements]).astype(np.float32) / 127.5 - 1.0
      mean, logvar = map(np.asarray, jax.device_get(encode_fn(images)))
      flip_mean, flip_logvar = map(np.asarray, jax.device_get(encode_fn(images[:, :, ::-1])))
      for k, e in enumerate(elements):
        writer.write(records.serialize_latent(e["label"], mean[k], logvar[k], flip_mean[k], flip_logvar[k],
                                              kept[k]))
      flat = mean.reshape(-1, mean.shape[-1])
      shapes.add(tuple(mean.shape[1:]))
      sizes += [list(mean.shape[1:3])] * len(elements)
      batch_stats = np.stack([flat.sum(0), (flat ** 2).sum(0), np.full(flat.shape[1], len(flat))])
      stats = batch_stats if stats.size == 0 else stats + batch_stats
      done += len(elements)
      rate = done / max(time.time() - start, 1e-9)
      log(f"shard {shard + 1}/{num_shards}: batch {number + 1}/{len(batches)} ({rate:.1f} images/s)")
    writer.close()
    with open(paths[shard] + ".stats.json", "w") as f:
      json.dump({"sums": stats.tolist(), "shapes": sorted(map(list, shapes)), "sizes": sizes,
                 "skipped": sum(p.skipped for p in preprocess), "dropped": dropped}, f)
  if not all(os.path.exists(p) for p in paths):
    return None
  meta = {"split": split, "num_shards": num_shards, "image_size": image_size, "scaling_factor": scaling_factor,
          "shift_factor": shift_factor, **_channel_statistics(paths)}
  if buckets:
    meta.update(buckets=buckets, bucket_max_crop=bucket_max_crop)
    records.write_sizes(out, split, [s for p in paths for s in _read_stats(p)["sizes"]])
  records.write_json(out, records.LATENT_META, meta)
  return meta


def _read_stats(path: str) -> dict:
  with open(path + ".stats.json") as f:
    return json.load(f)


def _channel_statistics(paths: list[str]) -> dict:
  """Latent shape(s), counts and per-channel mean/std of the posterior means, summed over the shards."""
  sums, shapes, skipped, dropped = None, set(), 0, 0
  for path in paths:
    part = _read_stats(path)
    if part["sums"]:
      sums = np.asarray(part["sums"]) if sums is None else sums + np.asarray(part["sums"])
      shapes |= set(map(tuple, part.get("shapes", [part.get("shape")])))  # "shape": written by an older jdit
    skipped += part["skipped"]
    dropped += part.get("dropped", 0)
  count = sums[2]
  mean = sums[0] / count
  shapes = sorted(map(list, shapes))
  return {"latent_shape": shapes[0] if len(shapes) == 1 else None, "latent_shapes": shapes,
          "num_latent_pixels": int(count[0]), "skipped_images": skipped, "dropped_images": dropped,
          "channel_mean": mean.tolist(), "channel_std": np.sqrt(np.maximum(sums[1] / count - mean ** 2, 0)).tolist()}
