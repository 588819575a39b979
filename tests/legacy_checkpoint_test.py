"""Checkpoints written by an earlier jdit still restore, sample and predict identically.

tests/data/legacy was written by jdit 1fa238d (before families were declared once): a 2-step digits DiT training
run (checkpoints/2 with params, model, train and data items) and the 4 samples --mode=sample drew from it;
pretrained U-Net and MM-DiT checkpoints of random weights and their outputs on fixed inputs (outputs.npz).
"""
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import load_config

from jdit import checkpoint, sample
from jdit.models import family

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy")


def digits_config():
  """The config the legacy run was trained and sampled with."""
  c = load_config("digits.py")
  c.model.update(dict(depth=1, hidden_size=32, num_heads=2))
  c.batch_size, c.num_train_steps, c.log_every, c.checkpoint_every, c.sample_every = 8, 2, 1, 2, 0
  c.diffusion.sampling_steps = 4
  c.sample.update(dict(num_samples=4, per_device_batch=4))
  return c


def test_a_legacy_training_run_samples_as_it_did(tmp_path):
  work = str(tmp_path / "run")
  shutil.copytree(os.path.join(LEGACY, "dit_digits"), work)
  path = sample.sample_and_save(digits_config(), work)
  with np.load(path) as new, np.load(os.path.join(LEGACY, "dit_digits_samples.npz")) as old:
    np.testing.assert_array_equal(new["labels"], old["labels"])
    # uint8 images of float32 samples: at most one level apart across CPUs (rounding at a .5 boundary)
    assert np.abs(new["images"].astype(int) - old["images"].astype(int)).max() <= 1
    assert (new["images"] == old["images"]).mean() > 0.97


@pytest.mark.parametrize("name", ["unet", "mmdit"])
def test_a_legacy_pretrained_checkpoint_predicts_as_it_did(name):
  model, params = checkpoint.load_pretrained(os.path.join(LEGACY, f"{name}_pretrained"))
  assert model.FAMILY == name
  with np.load(os.path.join(LEGACY, "outputs.npz")) as stored:
    arrays = {k.split(".", 1)[1]: stored[k] for k in stored if k.startswith(name + ".")}
  x, t, expected = arrays.pop("x"), arrays.pop("t"), arrays.pop("out")
  out = np.asarray(jax.jit(family.apply, static_argnums=0)(model, params, x, t, model.condition(arrays)))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_init_from_takes_a_workdir_its_checkpoints_or_one_step(tmp_path):
  """config.init_from names a run as its workdir, WORKDIR/checkpoints or WORKDIR/checkpoints/STEP; anything else
  is one error saying what it looked for."""
  from jdit import convert
  run = os.path.join(LEGACY, "dit_digits")
  expected = None
  for path in (run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "2")):
    model, params = convert.load_checkpoint(path, "dit")
    leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)])
    expected = leaves if expected is None else expected
    assert model.depth == 1 and np.array_equal(leaves, expected)
  config = digits_config()
  config.init_from = os.path.join(run, "checkpoints", "2")
  path = sample.sample_and_save(config, str(tmp_path / "fresh"))  # a workdir without checkpoints: init_from
  with np.load(path) as new, np.load(os.path.join(LEGACY, "dit_digits_samples.npz")) as old:
    assert np.abs(new["images"].astype(int) - old["images"].astype(int)).max() <= 1
  os.makedirs(tmp_path / "untrained")
  with pytest.raises(convert.CheckpointError, match=r"untrained: no diffusers weights found \(looked for .*\); "
                                                    r"nor is it a jdit checkpoint directory, a run's workdir"):
    convert.load_checkpoint(str(tmp_path / "untrained"), "dit")
