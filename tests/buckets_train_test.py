"""Aspect-ratio buckets end to end: a mixed-aspect image folder (skimage photos and digits at several shapes), its
preparation (sizes recorded), bucketed batches (1 vs 2 hosts, resume), a RoPE DiT trained on it (one compilation
per bucket) and sampled at every bucket's shape."""
import contextlib
import io
import os
import shutil

import jax
import numpy as np
import pytest
import skimage.data
from conftest import load_config
from PIL import Image
from sklearn.datasets import load_digits

from jdit import checkpoint, config_check, sample, train
from jdit.data import pipeline, transforms, writers
from jdit.data.folder import open_folder
from jdit.data.latents import open_latents
from jdit.models import family

pytestmark = pytest.mark.xdist_group("buckets_train")

BUCKETS = "16x16,16x24,24x16"  # (H, W): square, landscape 2:3, portrait 3:2
PHOTOS = {  # name -> (H, W) stored: landscape, square and portrait photos; "text" (172x448) is too wide for any
    "coffee": (400, 600), "chelsea": (300, 451), "rocket": (427, 640), "astronaut": (512, 512),
    "immunohistochemistry": (512, 512), "hubble_deep_field": (872, 1000), "text": (172, 448)}
DIGIT_SHAPES = ((16, 16), (16, 24), (24, 16), (32, 48))  # digits stretched to each (H, W)


def _photo(name: str) -> np.ndarray:
  image = getattr(skimage.data, name)()
  return np.stack([image] * 3, -1) if image.ndim == 2 else image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(the converted records directory, {file name: (H, W)}) of photos (and their portrait rotations) and digits."""
  src = tmp_path_factory.mktemp("mixed")
  shapes = {}
  for name in PHOTOS:
    for turn in (0, 1) if name in ("coffee", "rocket") else (0,):
      os.makedirs(src / "photos", exist_ok=True)
      image = np.ascontiguousarray(np.rot90(_photo(name), turn))
      Image.fromarray(image).save(src / "photos" / f"{name}_{turn}.png")
      shapes[f"{name}_{turn}.png"] = image.shape[:2]
  digits = load_digits().images[:36]
  os.makedirs(src / "digits")
  for i, digit in enumerate(digits):
    height, width = DIGIT_SHAPES[i % len(DIGIT_SHAPES)]
    image = Image.fromarray(np.uint8(digit * 15)).resize((width, height), Image.BICUBIC).convert("RGB")
    image.save(src / "digits" / f"{i:02d}.png")
    shapes[f"{i:02d}.png"] = (height, width)
  (src / "digits" / "broken.png").write_bytes(b"not a png")
  out = tmp_path_factory.mktemp("records")
  counts = writers.convert_folder(str(src), str(out), num_shards=3, log=lambda message: None)
  assert counts["written"] == len(shapes) and counts["skipped"] == 1
  return str(out), shapes


def bucket_config(data_dir: str, **changes):
  c = load_config("digits.py")
  c.unlock()
  c.model.update(dict(depth=2, hidden_size=32, num_heads=2, input_size=16, in_channels=3, num_classes=2,
                      pos_embed="rope"))
  c.data.update(dict(source="folder", data_dir=data_dir, channels=3, image_size=16, buckets=BUCKETS,
                     random_flip=True))
  c.update(dict(batch_size=8, num_train_steps=6, log_every=1, checkpoint_every=3, sample_every=0))
  c.diffusion.update(dict(sampling_steps=2))
  c.sample.update(dict(num_samples=8, per_device_batch=1))
  c.update_from_flattened_dict(changes)
  return c


def _decoded_size(record: dict) -> tuple[int, int]:
  with Image.open(io.BytesIO(record["image"])) as image:
    return image.size[1], image.size[0]


def test_preparation_records_each_image_size_and_buckets_drop_extreme_ratios(folder):
  out, shapes = folder
  source = open_folder(out, "train")
  assert source.sizes is not None and len(source.sizes) == len(shapes)
  assert [tuple(s) for s in source.sizes] == [_decoded_size(source[i]) for i in range(len(source))]
  lines = []
  table, ids = pipeline.bucket_assignment(bucket_config(out).data, source, lines.append)
  sizes = source.sizes
  assert np.array_equal(ids < 0, sizes[:, 0] / sizes[:, 1] < 0.45)  # only the 172x448 text page is dropped
  ratios = np.array([h / w for h, w in table])[ids[ids >= 0]]
  assert np.all(np.abs(np.log(sizes[ids >= 0, 0] / sizes[ids >= 0, 1] / ratios)) < 0.21)
  assert "1 dropped" in lines[0] and f"{len(shapes) - 1} of {len(shapes)} images in 3 of 3 buckets" in lines[0]


def _batches(config, source, steps: int, host: int = 0, num_hosts: int = 1, start=None):
  iterator = iter(pipeline.dataset_from_config(config.data, config.batch_size, source, host, num_hosts,
                                               log=lambda message: None))
  if start is not None:
    iterator.set_state(start)
  return [next(iterator) for _ in range(steps)], iterator


def test_one_bucket_per_global_batch_identical_for_two_hosts_and_resumed_exactly(folder):
  config = bucket_config(folder[0])
  source = open_folder(folder[0], "train")
  whole, iterator = _batches(config, source, 8)
  shapes = {b["image"].shape for b in whole}
  assert len(shapes) == 3 and all(s[0] == 8 and s[-1] == 3 and b["image"].dtype == np.uint8
                                  for s, b in zip(shapes, whole))
  halves = [_batches(config, source, 8, host, 2)[0] for host in (0, 1)]
  for k in range(8):
    for key in ("image", "label"):
      assert np.array_equal(np.concatenate([halves[0][k][key], halves[1][k][key]]), whole[k][key])
  first, iterator = _batches(config, source, 5)
  resumed, _ = _batches(config, source, 3, start=iterator.get_state())
  assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(resumed, whole[5:]))


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
  """A 6-step run straight through, and the same run resumed from its step-3 checkpoint alone (as if killed)."""
  workdirs = [str(tmp_path_factory.mktemp(name)) for name in ("straight", "resumed")]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    state = train.train_and_evaluate(bucket_config(folder[0]), workdirs[0])
  lines = printed.getvalue().splitlines()
  shutil.copytree(os.path.join(workdirs[0], "checkpoints", "3"), os.path.join(workdirs[1], "checkpoints", "3"))
  resumed = train.train_and_evaluate(bucket_config(folder[0]), workdirs[1])
  return state, resumed, lines, workdirs[0]


def test_training_compiles_once_per_bucket_and_resumes_bit_identically(trained, folder):
  state, resumed, lines, _ = trained
  compiling = [line for line in lines if "compiling the train step for bucket" in line]
  assert len(compiling) == 3 and "compiled the train step 3 times for 3 bucket shapes" in lines
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params)))


@pytest.mark.parametrize("how, expected", [({}, (16, 16)), (dict(resolution=(24, 16)), (24, 16)),
                                               (dict(aspect_ratio="3:2"), (16, 24))])
def test_samples_at_each_bucket_shape(trained, folder, how, expected, tmp_path):
  workdir = trained[3]
  config = bucket_config(folder[0], init_from=os.path.join(workdir, "checkpoints"))
  config.sample.update(how)
  images = np.load(sample.sample_and_save(config, str(tmp_path)))["images"]
  assert images.shape == (8, *expected, 3) and images.std() > 0
  assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 6


def _pool_encoder(images):
  """A stand-in encoder with a VAE's interface: 2x2 mean pooling (the posterior mean) and a fixed log variance."""
  b, h, w, c = images.shape
  mean = images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return mean, np.full_like(mean, -4.0)


def test_latent_cache_with_buckets_holds_each_image_at_its_bucket_shape(folder, tmp_path):
  images = open_folder(folder[0], "train")
  out = str(tmp_path / "latents")
  meta = writers.extract_latents(images, _pool_encoder, out, image_size=16, scaling_factor=1.0, shift_factor=0.0,
                                 num_shards=2, batch_size=4, buckets=BUCKETS, log=lambda message: None)
  assert meta["latent_shape"] is None and meta["latent_shapes"] == [[8, 8, 3], [8, 12, 3], [12, 8, 3]]
  assert meta["dropped_images"] == 1 and meta["buckets"] == BUCKETS
  latents = open_latents(out, "train")
  assert len(latents) == len(images) - 1
  table, ids = pipeline.bucket_assignment(bucket_config(folder[0]).data, images, lambda message: None)
  for i in range(len(latents)):
    record = latents[i]
    assert tuple(latents.sizes[i]) == record["mean"].shape[:2]
    shape = table[ids[record["index"]]]
    pixels = transforms.Preprocess(shape, 3)(images[record["index"]])["image"][None] / 127.5 - 1.0
    np.testing.assert_allclose(record["mean"], _pool_encoder(pixels)[0][0], atol=1e-6)
  config = bucket_config(out, **{"data.source": "latents", "model.input_size": 8})
  model = family.create(config.model)
  train.check_data(config, model, latents)
  batches, _ = _batches(config, latents, 6)
  assert {b["image"].shape for b in batches} <= {(8, 8, 8, 3), (8, 8, 12, 3), (8, 12, 8, 3)}
  assert len({b["image"].shape for b in batches}) > 1 and batches[0]["image"].dtype == np.float32
  config.data.buckets = ""
  with pytest.raises(ValueError, match=r"holds several shapes .* train with --config.data.buckets=16x16,16x24,24x16"):
    train.check_data(config, model, latents)
  config.data.buckets = "16x16,16x24"
  with pytest.raises(ValueError, match=r"data.buckets='16x16,16x24' must be the buckets the latent cache .* was "
                                       r"extracted with \(16x16,16x24,24x16"):
    train.check_data(config, model, latents)


def test_bad_bucket_settings_are_one_line_errors_naming_the_field(folder):
  config = bucket_config(folder[0], **{"data.buckets": "16x16,15x24"})
  images = open_folder(folder[0], "train")
  with pytest.raises(ValueError, match=r"^data.buckets='16x16,15x24': the model input 15x24 of a bucket must have "
                                       r"sides that are multiples of 2"):
    train.check_data(config, family.create(config.model), images)
  for field, value, message in (("data.buckets", "16by16", r"^data.buckets='16by16': expected one of"),
                                ("sample.aspect_ratio", "wide", r"^sample.aspect_ratio='wide': expected WIDTH:HEIGHT"),
                                ("data.bucket_max_crop", 1.0, r"^data.bucket_max_crop=1.0: expected a number in")):
    with pytest.raises(ValueError, match=message):
      config_check.validate(bucket_config(folder[0], **{field: value}))
