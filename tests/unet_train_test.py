"""The U-Net family through the same CLI, trainer, checkpoints, samplers, FID sample sets and AOT tool as the DiT:
a tiny U-Net learns the digits well enough that a classifier recognizes its samples."""
import os
import subprocess
import sys

import jax
import numpy as np
from conftest import load_config

from jdit import aot, checkpoint, fid_samples
from jdit.eval.digits import class_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 900  # measured: 23% / 78% / 91% / 96% of the guided samples recognized after 300 / 600 / 900 / 1200 steps


def cli(workdir, *flags):
  """python -m jdit.main with configs/unet_digits.py on one CPU device, with XLA's optimizations (a long run)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_DISABLE_MOST_OPTIMIZATIONS="0")
  result = subprocess.run([sys.executable, "-m", "jdit.main", "--config=configs/unet_digits.py",
                           f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "oneDNN" not in result.stderr and "InitializeLog" not in result.stderr  # no third-party start-up noise
  return result.stdout


def test_tiny_unet_trains_on_digits_samples_recognizable_digits_and_writes_an_fid_set(tmp_path):
  """configs/unet_digits.py shortened to 900 steps, sampled with guidance 4.0 (as the quickstart); one test, so
  that pytest-xdist workers do not each train it."""
  workdir = str(tmp_path / "unet_digits")
  train_log = cli(workdir, f"--config.num_train_steps={STEPS}", f"--config.checkpoint_every={STEPS}",
                  "--config.sample_every=0", "--config.log_every=300")
  sample_log = cli(workdir, "--mode=sample", "--config.diffusion.guidance_scale=4.0")
  assert "training UNet(model_channels=32, channel_mult=(1, 1)" in train_log and f"step {STEPS}/{STEPS}" in train_log
  assert "compiled and ran the first step in" in train_log  # the progress lines' rates exclude compilation
  assert f"restored step {STEPS} of {workdir}/checkpoints" in sample_log and f"{workdir}/samples.png" in sample_log
  data = np.load(os.path.join(workdir, "samples.npz"))
  assert data["images"].shape == (100, 8, 8, 1) and sorted(np.bincount(data["labels"])) == [10] * 10
  accuracy = class_accuracy(data["images"], data["labels"])
  assert accuracy >= 0.8, accuracy  # measured 0.91 at 900 steps: a margin for other CPUs' rounding

  model, params = checkpoint.load_pretrained(os.path.join(workdir, "checkpoints"))
  assert model.FAMILY == "unet" and model.supports_guidance and "label_emb" in params
  config = load_config("unet_digits.py")
  config.unlock()
  config.init_from = os.path.join(workdir, "checkpoints")
  config.diffusion.sampling_steps = 3
  config.sample.update(dict(fid=True, fid_samples=20, fid_shard_size=10, per_device_batch=1))
  path = fid_samples.write_fid_samples(config, str(tmp_path / "fid"))
  data = np.load(path)
  assert os.path.basename(path) == "fid_samples_20x8x8x1.npz" and data["arr_0"].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(data["labels"], minlength=10), [2] * 10)


def test_unet_train_step_compiles_ahead_of_time_with_fsdp():
  config = load_config("unet_digits.py")
  config.unlock()
  config.mesh.update(dict(data=1, fsdp=8))
  report = aot.compile_train_step(config, jax.devices())
  assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert 0 < report["arguments_gib"] < 0.5 * report["train_state_gib_total"]  # the state is split over fsdp
