"""Aspect-ratio buckets: the tables, the assignment of images to them and the cover-and-crop to a bucket."""
import math

import numpy as np
import pytest
from PIL import Image

from jdit.data import buckets
from jdit.data.transforms import center_crop, cover_crop


def test_named_tables_are_the_published_ones():
  pixart = pytest.importorskip("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha")
  for size in (256, 512, 1024):
    published = getattr(pixart, f"ASPECT_RATIO_{size}_BIN")
    assert set(buckets.NAMED_BUCKETS[f"pixart-{size}"]) == {(int(h), int(w)) for h, w in published.values()}
  sdxl = buckets.NAMED_BUCKETS["sdxl"]
  assert len(sdxl) == 41 and (1024, 1024) in sdxl and (512, 2048) in sdxl and (2048, 512) in sdxl
  assert all(h % 64 == 0 and w % 64 == 0 and 0.85e6 < h * w <= 1.05e6 for h, w in sdxl)
  assert set(sdxl) == {(w, h) for h, w in sdxl}


def test_bucket_table_fills_the_area_in_steps_both_orientations():
  table = buckets.bucket_table(256 * 256, 16)
  assert (256, 256) in table and set(table) == {(w, h) for h, w in table}
  ratios = [h / w for h, w in table]
  assert ratios == sorted(ratios) and max(ratios) <= 4.0
  for h, w in table:
    short, long = min(h, w), max(h, w)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 256 * 256 < short * (long + 16)
  assert buckets.parse_buckets("256x256/16") == table
  assert buckets.parse_buckets("16x16/8") == ((8, 32), (16, 16), (32, 8))
  assert buckets.parse_buckets("64x64, 48x80,80x48") == ((48, 80), (64, 64), (80, 48))


@pytest.mark.parametrize("spec", ["", "sdxxl", "256x256/0", "64x", "0x64", "16x16/32"])
def test_bad_bucket_spec_is_one_line_naming_the_field(spec):
  with pytest.raises(ValueError, match=r"^data\.buckets=") as error:
    buckets.parse_buckets(spec)
  assert "\n" not in str(error.value)


def test_assign_picks_the_nearest_log_ratio_and_drops_extremes():
  table = buckets.parse_buckets("256x256/16")
  rng = np.random.default_rng(0)
  sizes = np.stack([rng.integers(40, 2000, 500), rng.integers(40, 2000, 500)], axis=1)
  assigned = buckets.assign(sizes, table, max_crop=0.2)
  for (h, w), b in zip(sizes, assigned):
    gaps = [abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in table]
    nearest = int(np.argmin(gaps))
    kept = 1 - math.exp(-gaps[nearest]) <= 0.2
    assert b == (nearest if kept else -1)
  assert (assigned == -1).sum() > 0 and (assigned >= 0).sum() > 400  # ratios beyond 4:1 by > 20% are dropped
  # Inside the table's range the crop is at most the rounding: half the widest log gap between neighbours.
  bound = 1 - math.exp(-np.diff(np.log([h / w for h, w in table])).max() / 2)
  for h, w in [(h, w) for h, w in sizes if 0.25 <= h / w <= 4.0]:
    bh, bw = table[buckets.assign([(h, w)], table)[0]]
    assert 1 - min((h / w) / (bh / bw), (bh / bw) / (h / w)) <= bound + 1e-12


def test_cover_crop_fills_the_bucket_from_a_real_photo():
  skimage_data = pytest.importorskip("skimage.data")
  photo = Image.fromarray(skimage_data.coffee())  # 400 x 600
  for shape in ((48, 80), (80, 48), (64, 64), (16, 64)):
    out = cover_crop(photo, shape)
    assert out.shape == (*shape, 3) and out.dtype == np.uint8 and out.std() > 10
  assert np.array_equal(center_crop(photo, 64), cover_crop(photo, (64, 64)))
  # Covering (48, 80) from 400x600 (ratio 0.667 vs 0.6) keeps the full height and crops the width by 10%.
  small = photo.resize((80 * 600 // 400, 80))  # no box halving: the crop is the centre of the resized photo
  assert np.array_equal(cover_crop(small, (80, 80 * 600 // 400 - 20)), np.asarray(small)[:, 10:-10])


def _schedule_batches(schedule, steps):
  return [schedule.batch(k) for k in range(steps)]


def test_schedule_covers_each_bucket_once_per_epoch_in_full_batches():
  ids = np.random.default_rng(1).choice([-1, 0, 1, 2], size=203, p=[0.05, 0.5, 0.3, 0.15])  # -1: dropped
  schedule = buckets.BucketSchedule(ids, global_batch=8, seed=3)
  n = np.bincount(ids[ids >= 0])
  steps = int(sum(3 * n // 8))  # three epochs of every bucket's stream
  batches = _schedule_batches(schedule, steps)
  assert all(len(idx) == 8 and np.all(ids[idx] == b) for b, idx in batches)  # one bucket per global batch
  for b in range(3):
    used = np.concatenate([idx for bb, idx in batches if bb == b])
    assert len(used) == 3 * n[b] // 8 * 8
    for e in range(len(used) // n[b]):  # the stream: each epoch is a permutation of the bucket
      assert sorted(used[e * n[b]:(e + 1) * n[b]]) == sorted(np.flatnonzero(ids == b))
  first_epoch = [b for b, _ in batches[:int(sum(n // 8))]]
  assert first_epoch != sorted(first_epoch)  # buckets interleave
  # Pure in (seed, step): a fresh schedule, asked out of order (a resumed run), gives the same batches.
  again = buckets.BucketSchedule(ids, global_batch=8, seed=3)
  for k in (steps - 1, 5, 0, steps // 2):
    b, idx = again.batch(k)
    assert b == batches[k][0] and np.array_equal(idx, batches[k][1])
  other = _schedule_batches(buckets.BucketSchedule(ids, global_batch=8, seed=4), 10)
  assert any(not np.array_equal(a[1], c[1]) for a, c in zip(batches, other))


def test_schedule_repeats_a_bucket_and_lends_small_buckets_across_epochs():
  ids = np.array([0] * 40 + [1] * 5)  # bucket 1 is smaller than a batch
  batches = _schedule_batches(buckets.BucketSchedule(ids, global_batch=8, seed=0, repeat=2), 40)
  runs = [b for i, (b, _) in enumerate(batches) if i == 0 or batches[i - 1][0] != b]
  assert 1 in runs and sum(b == 1 for b, _ in batches) >= 4
  zero = [i for i, (b, _) in enumerate(batches) if b == 0]
  ends = [i for i in range(len(batches)) if i + 1 == len(batches) or batches[i + 1][0] != batches[i][0]]
  lengths = np.diff([-1] + ends)  # lengths of the runs of one bucket
  assert lengths.max() >= 2 and len(zero) > 0
  small = [idx for b, idx in batches if b == 1]
  assert all(set(idx) <= set(range(40, 45)) for idx in small)
