"""Input pipeline: sources, image-folder conversion with corrupt files, host sharding, checkpointable state."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jdit.data import pipeline, transforms
from jdit.data.digits import DigitsSource
from jdit.data.folder import open_folder
from jdit.data.readers import DatasetNotFoundError
from jdit.data.tfds import open_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_image_folder(root, per_class=6):
  """Real digits (upscaled to 16x16 RGB PNGs) in class sub-folders, plus one corrupt file."""
  digits = DigitsSource()
  for label in (3, 7):
    os.makedirs(root / f"class_{label}")
    picks = np.flatnonzero(digits.labels == label)[:per_class]
    for i, index in enumerate(picks):
      image = Image.fromarray(digits.images[index, :, :, 0]).resize((16, 16), Image.NEAREST).convert("RGB")
      image.save(root / f"class_{label}" / f"{i}.png")
  (root / "class_7" / "broken.png").write_bytes(b"\x89PNG not really an image")
  return 2 * per_class


def test_digits_source_is_the_bundled_dataset():
  digits = DigitsSource()
  assert len(digits) == 1797 and digits[0]["image"].shape == (8, 8, 1) and digits[0]["image"].dtype == np.uint8
  assert sorted(set(digits.labels.tolist())) == list(range(10))


def test_folder_conversion_skips_corrupt_files_and_trains_from_the_records(tmp_path):
  total = make_image_folder(tmp_path / "images")
  out = tmp_path / "records"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_image_folder.py"),
                           f"--src={tmp_path / 'images'}", f"--out={out}", "--num_shards=2"],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  assert f"{total} images in 2 classes" in result.stdout and "1 unreadable files skipped" in result.stdout
  assert "broken.png" in result.stdout
  assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
  source = open_folder(str(out), "train")
  assert len(source) == total and source.meta["classes"] == ["class_3", "class_7"]
  batch = next(iter(pipeline.make_dataset(source, global_batch=4, image_size=16, channels=3)))
  assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"].tolist()) <= {0, 1}


def test_unreadable_records_are_skipped_while_reading(caplog):
  good = io.BytesIO()
  Image.fromarray(np.full((8, 8), 200, np.uint8)).save(good, format="PNG")
  records = [{"image": good.getvalue(), "label": 1}, {"image": b"garbage", "label": 2}] * 4
  batches = iter(pipeline.make_dataset(records, global_batch=2, image_size=8, channels=1))
  for _ in range(4):
    batch = next(batches)
    assert batch["label"].tolist() == [1, 1]
  assert "skipping unreadable image" in caplog.text


def test_center_crop_is_adm_style():
  image = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(300, 200, 3).astype(np.uint8))
  assert transforms.center_crop(image, 64).shape == (64, 64, 3)


def test_iterator_state_round_trips():
  ds = pipeline.make_dataset(DigitsSource(), global_batch=8, image_size=8, channels=1, seed=3)
  it = iter(ds)
  next(it)
  state = it.get_state()
  expected = next(it)
  resumed = iter(ds)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_every_epoch_is_reshuffled_and_hosts_split_each_global_batch():
  source = DigitsSource()
  one = iter(pipeline.make_dataset(source, global_batch=1797, image_size=8, channels=1, seed=0))
  first, second = next(one)["label"], next(one)["label"]
  assert sorted(first) == sorted(source.labels) and not np.array_equal(first, second)
  whole = next(iter(pipeline.make_dataset(source, global_batch=8, image_size=8, channels=1, seed=5)))
  parts = [next(iter(pipeline.make_dataset(source, global_batch=8, image_size=8, channels=1, seed=5, host=h,
                                           num_hosts=4)))["image"] for h in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), whole["image"])
  with pytest.raises(ValueError, match="batch_size=10 must be divisible by the number of hosts \\(4\\)"):
    pipeline.make_dataset(source, global_batch=10, image_size=8, channels=1, num_hosts=4)


def test_tfds_array_record_dataset_feeds_the_pipeline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  digits = DigitsSource()

  class TinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 1)), "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(24):
        encoded = io.BytesIO()
        Image.fromarray(digits.images[i, :, :, 0]).save(encoded, format="PNG")
        yield i, {"image": encoded.getvalue(), "label": int(digits.labels[i])}

  TinyDigits(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = open_tfds("tiny_digits", "train", str(tmp_path))
  assert len(source) == 24
  batch = next(iter(pipeline.make_dataset(source, global_batch=24, image_size=8, channels=1)))
  assert sorted(batch["label"].tolist()) == sorted(digits.labels[:24].tolist())
  assert {img.tobytes() for img in batch["image"]} == {img.tobytes() for img in digits.images[:24]}
  with pytest.raises(DatasetNotFoundError, match="data.name='nothing_here'.*tfds build nothing_here"):
    open_tfds("nothing_here", "train", str(tmp_path))
