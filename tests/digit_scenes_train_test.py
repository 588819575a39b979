"""Text conditioning is real: a shortened digit-scenes run (the bundled config, 500 of its 4000 steps) already
draws both cells in the colors the held-out prompts ask for, far above chance (1/7); the full run's figure is in
the README (make demo-t2i)."""
import os
import sys

import numpy as np
import pytest
from conftest import load_config

from jdit import sample, train
from jdit.data import digit_scenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import eval_digit_scenes  # noqa: E402

pytestmark = pytest.mark.usefixtures("optimized")


def test_a_short_run_follows_the_prompts_colors(tmp_path):
  config = load_config("digit_scenes.py")
  config.unlock()
  config.update(dict(num_train_steps=500, sample_every=0, log_every=250, checkpoint_every=500))
  train.train_and_evaluate(config, str(tmp_path))
  names = list(digit_scenes.COLORS)
  prompts = [digit_scenes.caption(a, b, names[i % 7], names[(i + j + 1) % 7])
             for j in range(3) for i, (a, b) in enumerate(digit_scenes.pairs("held_out"))]  # never trained on
  config.sample.prompts = tuple(prompts)
  data = np.load(sample.sample_and_save(config, str(tmp_path)))
  assert data["prompts"].tolist() == prompts and data["images"].shape == (30, 8, 16, 3)
  result = eval_digit_scenes.score(data["images"], data["prompts"])
  assert result["left_color"] >= 0.8 and result["right_color"] >= 0.8, result
