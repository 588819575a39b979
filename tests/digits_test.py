"""The embedded default learns: a shortened digits run whose guided samples a real-digits classifier recognizes.

The full-length run (configs/digits.py, 4000 steps) is `make demo`; its figure is in the README.
"""
import os
import sys

import numpy as np
from conftest import load_config

from jdit import sample, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import eval_digits  # noqa: E402


def test_digits_default_learns_recognizable_class_conditional_samples(tmp_path):
  config = load_config("digits.py")
  config.unlock()
  # Shortened for CI: half the blocks, 1500 of 4000 steps, sampled with the official guidance scale 4.0 (the
  # full run reaches 100% at the default 2.0).
  config.model.update(dict(depth=2))
  config.diffusion.guidance_scale = 4.0
  config.update(dict(num_train_steps=1500, log_every=500, checkpoint_every=1500, sample_every=0))
  workdir = str(tmp_path)
  train.train_and_evaluate(config, workdir)
  path = sample.sample_and_save(config, workdir)
  data = np.load(path)
  assert data["images"].shape == (100, 8, 8, 1) and data["images"].dtype == np.uint8
  assert sorted(np.bincount(data["labels"])) == [10] * 10
  accuracy = eval_digits.class_accuracy(data["images"], data["labels"])
  assert accuracy >= 0.9, accuracy
  assert os.path.exists(os.path.join(workdir, "samples.png"))
