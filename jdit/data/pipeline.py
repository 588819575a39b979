"""grain input pipeline: deterministic shuffling, host sharding, per-record transforms, checkpointable iterators.

The data order depends only on the seed and the global batch size, never on the number of hosts: host h of
H reads, for global batch k of size G, the shuffled elements k G + h G/H ... k G + (h+1) G/H - 1. Random flips
and latent draws come from (seed, global element index). So 1 host and H hosts feed the model identical global
batches.
"""
import grain
import numpy as np

from jdit.data import transforms

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


def dataset_from_config(config, source, host: int = 0, num_hosts: int = 1):
  data = config.data
  transform = transforms.transform_from_config(data, source)
  return make_dataset(source, global_batch=config.batch_size, transform=transform, seed=data.seed, host=host,
                      num_hosts=num_hosts, num_workers=data.num_workers, read_threads=data.read_threads)
