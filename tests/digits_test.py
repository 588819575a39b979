"""The embedded default learns: a shortened digits run whose guided samples a real-digits classifier recognizes.

Runs the main job as a user does (train, then --mode=sample) on one CPU device. The full-length run
(configs/digits.py, 4000 steps) is `make demo`; its figure is in the README.
"""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import eval_digits  # noqa: E402

# Shortened for CI: half the blocks, 1500 of 4000 steps, sampled with the official guidance scale 4.0 (the full
# run reaches 100% at the default 2.0).
SHORT = ["--config.model.depth=2", "--config.num_train_steps=1500", "--config.log_every=500",
         "--config.checkpoint_every=1500", "--config.sample_every=0", "--config.diffusion.guidance_scale=4.0"]


def test_digits_default_learns_recognizable_class_conditional_samples(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  for mode in ("train", "sample"):
    result = subprocess.run([sys.executable, "-m", "jdit.main", "--config=configs/digits.py",
                             f"--workdir={tmp_path}", f"--mode={mode}", *SHORT],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
  assert "step 1500/1500" in result.stdout or os.path.exists(tmp_path / "samples.npz")
  data = np.load(tmp_path / "samples.npz")
  assert data["images"].shape == (100, 8, 8, 1) and data["images"].dtype == np.uint8
  assert sorted(np.bincount(data["labels"])) == [10] * 10
  accuracy = eval_digits.class_accuracy(data["images"], data["labels"])
  assert accuracy >= 0.9, accuracy
  assert os.path.exists(tmp_path / "samples.png")
