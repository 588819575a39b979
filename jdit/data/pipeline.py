"""grain input pipeline: deterministic shuffling, host sharding, per-record transforms, checkpointable iterators.

The data order depends only on the seed and the global batch size, never on the number of hosts: host h of
H reads, for global batch k of size G, the shuffled elements k G + h G/H ... k G + (h+1) G/H - 1. Random flips
and latent draws come from (seed, global element index). So 1 host and H hosts feed the model identical global
batches.

With aspect-ratio buckets (data.buckets) an element is a whole host batch: global step k draws one bucket and the
G source indices of its batch from BucketSchedule(seed, k) (every host the same), host h transforms rows
h G/H ... (h+1) G/H - 1 to that bucket's shape, row j with the rng of (seed, k G + j). The iterator state is the
step, so a resumed run continues bit-identically.
"""
import logging

import grain
import numpy as np

from jdit.data import buckets, sources, transforms
from jdit.data.readers import image_sizes

_MAX_ELEMENTS = 2 ** 62  # "infinite": the shuffled source repeats forever


class HostElement:
  """Host-local element j -> transform(shuffled record, rng), laid out by global batch; the rng is drawn from
  (seed, global element index), so every host count sees the same flips and noise."""

  def __init__(self, shuffled, global_batch: int, host: int, num_hosts: int, seed: int, transform):
    self.shuffled, self.seed, self.transform = shuffled, seed, transform
    self.per_host, self.global_batch, self.host = global_batch // num_hosts, global_batch, host

  def __call__(self, j: int) -> dict | None:
    k, offset = divmod(j, self.per_host)
    index = k * self.global_batch + self.host * self.per_host + offset
    return self.transform(self.shuffled[index], np.random.default_rng([self.seed, index]))


def make_dataset(source, *, global_batch: int, transform=None, image_size: int = 0, channels: int = 3,
                 seed: int = 0, random_flip: bool = False, host: int = 0, num_hosts: int = 1, num_workers: int = 0,
                 read_threads: int = 0):
  """An IterDataset of host-local batches {"image": (B_host, H, W, C), "label": int32 (B_host,)}; `transform`
  defaults to ImageTransform(image_size, channels, random_flip) (uint8 images). Elements are read in the calling
  thread (read_threads=0: fastest for in-memory sources; grain's default 16-thread, 500-element prefetch spent
  more time polling its buffer than the digits took to read) or by `read_threads` threads, two batches ahead."""
  if global_batch % num_hosts:
    raise ValueError(f"batch_size={global_batch} must be divisible by the number of hosts ({num_hosts})")
  transform = transform or transforms.ImageTransform(image_size, channels, random_flip)
  shuffled = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  element = HostElement(shuffled, global_batch, host, num_hosts, seed, transform)
  ds = grain.MapDataset.range(_MAX_ELEMENTS).map(element).filter(lambda e: e is not None)
  per_host = global_batch // num_hosts
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * per_host if read_threads else 0)
  ds = ds.to_iter_dataset(options).batch(per_host, drop_remainder=True)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


class BucketStep:
  """Global step k -> this host's rows of global batch k, all of one bucket's shape (BucketSchedule); an
  unreadable row is replaced by a readable one of the same batch, so batches stay full."""

  def __init__(self, source, schedule: buckets.BucketSchedule, bucket_transforms, host: int, num_hosts: int,
               seed: int):
    self.source, self.schedule, self.transforms, self.seed = source, schedule, bucket_transforms, seed
    self.per_host = schedule.global_batch // num_hosts
    self.begin = host * self.per_host

  def __call__(self, step: int) -> dict:
    bucket, indices = self.schedule.batch(step)
    transform, first = self.transforms[bucket], step * self.schedule.global_batch
    rows = [transform(self.source[int(indices[j])], np.random.default_rng([self.seed, first + j]))
            for j in range(self.begin, self.begin + self.per_host)]
    readable = [r for r in rows if r is not None]
    if not readable:
      raise ValueError(f"step {step}: none of this host's {len(rows)} images of bucket {bucket} is readable")
    if len(readable) < len(rows):
      logging.warning("step %d: %d unreadable images replaced by others of the batch", step,
                      len(rows) - len(readable))
    rows = [r if r is not None else readable[i % len(readable)] for i, r in enumerate(rows)]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def make_bucketed_dataset(source, bucket_ids, bucket_transforms, *, global_batch: int, seed: int = 0,
                          repeat: int = 1, host: int = 0, num_hosts: int = 1, num_workers: int = 0,
                          read_threads: int = 0):
  """An IterDataset of host batches, one bucket per global step; bucket_ids[i] is record i's bucket (-1:
  dropped) and bucket_transforms[b](record, rng) makes an element of bucket b's shape."""
  if global_batch % num_hosts:
    raise ValueError(f"batch_size={global_batch} must be divisible by the number of hosts ({num_hosts})")
  schedule = buckets.BucketSchedule(bucket_ids, global_batch, seed, repeat)
  element = BucketStep(source, schedule, bucket_transforms, host, num_hosts, seed)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 if read_threads else 0)
  ds = grain.MapDataset.range(_MAX_ELEMENTS).map(element).to_iter_dataset(options)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def bucket_assignment(data, source, log=print) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
  """(the table of data.buckets, each record's bucket or -1) with a summary line of what was assigned."""
  table = buckets.parse_buckets(data.buckets)
  ids = buckets.assign(image_sizes(source, log), table, data.bucket_max_crop)
  counts = np.bincount(ids[ids >= 0], minlength=len(table))
  used = ", ".join(f"{h}x{w}: {n}" for (h, w), n in zip(table, counts) if n)
  log(f"buckets: {int(counts.sum())} of {len(ids)} images in {int((counts > 0).sum())} of {len(table)} "
      f"buckets ({used}); {int((ids < 0).sum())} dropped (aspect ratio beyond data.bucket_max_crop="
      f"{data.bucket_max_crop} of every bucket, or unreadable)")
  return table, ids


def dataset_from_config(data, batch_size: int, source, host: int = 0, num_hosts: int = 1, log=print):
  """The host's iterable dataset of config.data `data` over `source`, in global batches of batch_size (one
  bucket per global step with data.buckets)."""
  if data.buckets:
    table, ids = bucket_assignment(data, source, log)
    bucket_transforms = [sources.transform(data, source, shape) for shape in table]
    return make_bucketed_dataset(source, ids, bucket_transforms, global_batch=batch_size, seed=data.seed,
                                 repeat=data.bucket_repeat, host=host, num_hosts=num_hosts,
                                 num_workers=data.num_workers, read_threads=data.read_threads)
  transform = sources.transform(data, source)
  return make_dataset(source, global_batch=batch_size, transform=transform, seed=data.seed, host=host,
                      num_hosts=num_hosts, num_workers=data.num_workers, read_threads=data.read_threads)
