"""Aspect-ratio buckets: a fixed list of (H, W) shapes; each image goes to the one nearest its aspect ratio.

    bucket_table(area, step)  every (H, W) with both sides multiples of `step` (VAE factor x patch size) and
                              the largest width H x W <= area allows, landscape and portrait, up to `max_ratio`
    NAMED_BUCKETS             "sdxl" (the SDXL paper's 41 shapes of ~1 megapixel), "pixart-256|512|1024"
                              (PixArt-alpha's 33 aspect-ratio bins at each size)
    parse_buckets(spec)       a name, "HxW/STEP" (the table of area H*W), or a list "HxW,HxW,..."
    nearest_shape, shape_at_ratio   the shape for a sampling aspect ratio ("16:9": parse_aspect_ratio)
    assign(sizes, table)      the bucket of each image (nearest log aspect ratio), -1 where covering it would crop
                              away more than `max_crop` of the image (extreme ratios: dropped and counted)
An image is resized to cover its bucket and centre-cropped by what is left over, at most the rounding between
neighbouring ratios (transforms.cover_crop).
"""
import math

import numpy as np

# SDXL (Podell et al. 2023, appendix): (H, W) of its multi-aspect fine-tuning, all sides multiples of 64.
_SDXL_PORTRAIT = ((2048, 512), (1984, 512), (1920, 512), (1856, 512), (1792, 576), (1728, 576), (1664, 576),
                  (1600, 640), (1536, 640), (1472, 704), (1408, 704), (1344, 704), (1344, 768), (1280, 768),
                  (1216, 832), (1152, 832), (1152, 896), (1088, 896), (1088, 960), (1024, 960))
# PixArt-alpha's ASPECT_RATIO_1024 bins (H, W); its 512 and 256 bins are these halved and quartered.
_PIXART_1024 = ((512, 2048), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600), (640, 1536),
                (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
                (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960),
                (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
                (1472, 704), (1536, 640), (1600, 640), (1728, 576), (2048, 512))


def _sorted(shapes) -> tuple[tuple[int, int], ...]:
  """Distinct shapes ordered by aspect ratio H / W."""
  return tuple(sorted(set(shapes), key=lambda s: (s[0] / s[1], s[0])))


NAMED_BUCKETS = {
    "sdxl": _sorted(_SDXL_PORTRAIT + tuple((w, h) for h, w in _SDXL_PORTRAIT) + ((1024, 1024),)),
    **{f"pixart-{size}": _sorted((h * size // 1024, w * size // 1024) for h, w in _PIXART_1024)
       for size in (256, 512, 1024)},
}


def bucket_table(area: int, step: int, max_ratio: float = 4.0) -> tuple[tuple[int, int], ...]:
  """Every (H, W), sides multiples of `step`, the short side s and the long side the largest multiple of `step`
  with s x long <= area, in both orientations, long / short <= max_ratio; ordered by H / W."""
  if area < step * step or step < 1 or max_ratio < 1:
    raise ValueError(f"buckets: area={area}, step={step}, max_ratio={max_ratio}: expected step >= 1, "
                     "area >= step^2 and max_ratio >= 1")
  shapes = []
  for short in range(step, math.isqrt(area) + 1, step):
    long = area // short // step * step
    if long >= short and long / short <= max_ratio:
      shapes += [(short, long), (long, short)]
  return _sorted(shapes)


def parse_buckets(spec: str, field: str = "data.buckets") -> tuple[tuple[int, int], ...]:
  """The table a spec names: "sdxl", "pixart-512", "256x256/16" (area 256*256, sides multiples of 16) or an
  explicit "64x64,48x80,80x48"; a one-line error naming `field` otherwise."""
  def shape(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    if int(h) < 1 or int(w) < 1:
      raise ValueError
    return int(h), int(w)

  spec = spec.strip()
  if spec in NAMED_BUCKETS:
    return NAMED_BUCKETS[spec]
  try:
    if "/" in spec:
      size, step = spec.split("/")
      h, w = shape(size)
      return bucket_table(h * w, int(step))
    return _sorted(shape(s) for s in spec.split(","))
  except ValueError as e:
    detail = f" ({e})" if str(e) else ""
    raise ValueError(f"{field}={spec!r}: expected one of {sorted(NAMED_BUCKETS)}, 'HxW/STEP' (the buckets of "
                     f"area H*W, sides multiples of STEP) or a list 'HxW,HxW,...'{detail}") from None


MAX_ASPECT_RATIO = 16.0  # the most elongated shape sampled (SDXL's buckets reach 4:1)


def parse_aspect_ratio(text: str, field: str = "sample.aspect_ratio") -> float:
  """H / W of a width:height ratio as photographers write it ("16:9" is landscape), at most 16:1 either way."""
  try:
    width, height = (float(x) for x in text.split(":"))
    if width > 0 and height > 0 and 1 / MAX_ASPECT_RATIO <= height / width <= MAX_ASPECT_RATIO:
      return height / width
  except ValueError:
    pass
  raise ValueError(f"{field}={text!r}: expected WIDTH:HEIGHT with positive numbers at most "
                   f"{MAX_ASPECT_RATIO:g}:1 either way, e.g. '16:9' or '3:4'")


def nearest_shape(table, ratio: float) -> tuple[int, int]:
  """The (H, W) of `table` whose H / W is nearest `ratio` in log scale."""
  return min(table, key=lambda s: abs(math.log(s[0] / s[1] / ratio)))


def shape_at_ratio(area: int, ratio: float, step: int) -> tuple[int, int]:
  """(H, W), sides positive multiples of `step`, H / W about `ratio` and H W about `area`."""
  height = max(step, round(math.sqrt(area * ratio) / step) * step)
  width = max(step, round(math.sqrt(area / ratio) / step) * step)
  return height, width


def assign(sizes: np.ndarray, table, max_crop: float = 0.2) -> np.ndarray:
  """Bucket index (int32) per (h, w) row of `sizes`: the nearest log aspect ratio; -1 where that still crops away
  more than `max_crop` of the image, or where a side is 0 (unreadable)."""
  sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
  usable = (sizes > 0).all(axis=1)
  sizes = np.where(usable[:, None], sizes, 1.0)
  log_ratio = np.log(sizes[:, 0] / sizes[:, 1])  # (N,)
  table_ratio = np.log(np.array([h / w for h, w in table]))  # (K,)
  gap = np.abs(log_ratio[:, None] - table_ratio[None, :])  # (N, K)
  nearest = gap.argmin(axis=1)
  cropped = 1.0 - np.exp(-gap[np.arange(len(sizes)), nearest])
  return np.where(usable & (cropped <= max_crop + 1e-12), nearest, -1).astype(np.int32)


class BucketSchedule:
  """Global step k -> (bucket, the source indices of its global batch): a pure function of the seed, the buckets
  of the records and the global batch size G, so every host count reads the same batches and a resumed run
  continues exactly.

  Bucket b's records form one stream, epoch after epoch (epoch e: the members in the order of
  rng(seed, e, b)); its batches are consecutive chunks of G, so no batch is ragged and an epoch's remainder opens
  the next epoch's first batch. Epoch e holds the batches of each bucket that end inside its part of the stream,
  in runs of `repeat` consecutive batches of one bucket, the runs shuffled by rng(seed, e) (each bucket's
  batches keep their stream order). Every record of a
  bucket is used once per epoch (a bucket smaller than G lends its batches records of two epochs).
  """

  def __init__(self, bucket_ids, global_batch: int, seed: int = 0, repeat: int = 1):
    bucket_ids = np.asarray(bucket_ids)
    self.members = [np.flatnonzero(bucket_ids == b) for b in range(int(bucket_ids.max(initial=-1)) + 1)]
    self.sizes = np.array([len(m) for m in self.members], np.int64)  # (K,)
    if not self.sizes.any():
      raise ValueError("data.buckets: no image fits any bucket (all dropped); widen the table or data.bucket_max_crop")
    self.global_batch, self.seed, self.repeat = global_batch, seed, max(1, repeat)
    self._epochs: dict[int, np.ndarray] = {}
    self._orders: dict[tuple[int, int], np.ndarray] = {}

  def _batches_before(self, epoch: int) -> np.ndarray:
    """Per bucket, the batches completed by the first `epoch` epochs of its stream."""
    return epoch * self.sizes // self.global_batch

  def _epoch(self, epoch: int) -> np.ndarray:
    """(steps, 2) int64 rows (bucket, batch number within the bucket's stream) of one epoch, in order."""
    if epoch not in self._epochs:
      first, end = self._batches_before(epoch), self._batches_before(epoch + 1)
      counts = end - first  # (K,) batches of each bucket in this epoch
      runs = [(b, min(self.repeat, counts[b] - start)) for b in range(len(counts))
              for start in range(0, counts[b], self.repeat)]  # (bucket, length): one bucket for `length` steps
      labels = [np.full(length, b) for i in np.random.default_rng([self.seed, epoch]).permutation(len(runs))
                for b, length in [runs[i]]]
      labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)  # (steps,) bucket of each step
      numbers = np.empty_like(labels)
      for b in range(len(counts)):  # each bucket's batches in stream order
        numbers[labels == b] = np.arange(first[b], end[b])
      self._epochs = {epoch: np.stack([labels, numbers], 1)}
    return self._epochs[epoch]

  def _stream(self, bucket: int, positions: np.ndarray) -> np.ndarray:
    """Source indices at these positions of a bucket's stream (epoch p // n, place p % n)."""
    size = self.sizes[bucket]
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(positions // size):
      key = (bucket, int(epoch))
      if key not in self._orders:
        if len(self._orders) > 4 * len(self.sizes):
          self._orders.clear()
        self._orders[key] = np.random.default_rng([self.seed, int(epoch), bucket]).permutation(self.members[bucket])
      at = positions // size == epoch
      out[at] = self._orders[key][positions[at] % size]
    return out

  def epoch_of(self, step: int) -> tuple[int, int]:
    """(epoch, place within it) of a global step."""
    # S(e) = sum_b floor(e n_b / G) lies in (e N / G - K, e N / G]: start just below and walk forward.
    epoch = max(0, int(step * self.global_batch / self.sizes.sum()) - 1)
    while self._batches_before(epoch + 1).sum() <= step:
      epoch += 1
    return epoch, step - int(self._batches_before(epoch).sum())

  def batch(self, step: int) -> tuple[int, np.ndarray]:
    """(bucket, the G source indices of global step `step`)."""
    epoch, place = self.epoch_of(step)
    bucket, number = self._epoch(epoch)[place]
    positions = number * self.global_batch + np.arange(self.global_batch)
    return int(bucket), self._stream(int(bucket), positions)
