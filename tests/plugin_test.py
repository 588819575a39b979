"""A family and a data source are one module each: a toy family and a toy source written to a temporary path,
named by their import paths and registered nowhere, train, checkpoint, resume and sample through the normal entry
points (in this process and from the command line)."""
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jdit import config as config_lib
from jdit import sample, train
from jdit.data import sources
from jdit.models import family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_FAMILY = '''
"""A toy family: two 3x3 convolutions per pixel, conditioned on the timestep and the class."""
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jdit.models.conditioning import ClassConditional
from jdit.nn import layers


class Toy(ClassConditional, nn.Module):
  FAMILY: ClassVar[str] = "toy_family"
  width: int = 16  # features per pixel
  input_size: int = 8
  in_channels: int = 1
  num_classes: int = 4  # 0: unconditional
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  dtype: str = "float32"

  size_multiple = 1

  @property
  def out_channels(self) -> int:
    return self.in_channels

  def describe(self) -> str:
    return f"Toy(width={self.width})"

  def check_config(self) -> None:
    if self.width < 1:
      raise ValueError(f"width={self.width} must be >= 1")

  @nn.compact
  def __call__(self, x, t, y=None, train=False):
    c = layers.TimestepEmbedder(self.width, name="t_embedder")(t)  # (B, D)
    if self.num_classes:
      c = c + layers.LabelEmbedder(self.num_classes, self.width, self.class_dropout_prob, name="y")(y, train)
    h = nn.Conv(self.width, (3, 3), name="conv_in")(x) + c[:, None, None]  # (B, H, W, D)
    return nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(nn.silu(h))


MODEL = Toy
PRESETS = {"small": dict(width=16), "wide": dict(width=64)}
VARIANT = "small"
'''

TOY_SOURCE = '''
"""A toy source: 8x8 stripes whose direction is the class (rows, columns, two diagonals), with a random phase."""
import numpy as np

from jdit.data import checks, transforms

PROVIDES = ("image", "label")


class Stripes:
  def __len__(self):
    return 256

  def __getitem__(self, index):
    label, phase = index % 4, (index // 4) % 4
    i, j = np.mgrid[:8, :8]
    wave = (i, j, i + j, i - j)[label] + phase
    return {"image": (255 * (wave % 4 < 2)).astype(np.uint8)[..., None], "label": label}


def open_source(data):
  return Stripes()


transform = transforms.image_transform
check = checks.check_images
'''

@pytest.fixture
def plugins(tmp_path, monkeypatch):
  """The toy modules on the import path (as a user's own package would be)."""
  (tmp_path / "toy_family.py").write_text(TOY_FAMILY)
  (tmp_path / "toy_source.py").write_text(TOY_SOURCE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def toy_config(**changes):
  c = config_lib.base("toy_family")
  c.data.update(dict(source="toy_source", image_size=8, channels=1))
  c.diffusion.update(dict(variance="fixed_small", sampler="ddim", sampling_steps=4, guidance_scale=2.0))
  c.optimizer.update(dict(learning_rate=1e-3))
  c.update(dict(batch_size=8, num_train_steps=4, log_every=2, checkpoint_every=2, sample_every=4))
  c.sample.update(dict(num_samples=8, per_device_batch=1))
  c.update_from_flattened_dict(changes)
  return c


def test_a_toy_family_and_source_train_resume_and_sample(plugins):
  assert family.known("toy_family") and sources.known("toy_source")
  assert not family.known("toy_source") and not sources.known("toy_family")  # each checks its interface
  config = toy_config()
  assert config.model.width is None and config.model.variant == "small"  # PRESET: from the variant
  workdir = str(plugins / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4 and state.params["conv_in"]["kernel"].shape == (3, 3, 1, 16)
  assert os.path.exists(os.path.join(workdir, "samples", "step_0000004.png"))
  state = train.train_and_evaluate(toy_config(num_train_steps=6), workdir)  # resumes from step 4
  assert int(state.step) == 6
  path = sample.sample_and_save(config, workdir)
  with np.load(path) as samples:
    assert samples["images"].shape == (8, 8, 8, 1) and samples["labels"].tolist() == [0, 1, 2, 3] * 2

  with pytest.raises(ValueError, match=f"model.family must be one of {re.escape(str(family.FAMILIES))}, got 'toy_famly'"):
    family.default_config("toy_famly")
  with pytest.raises(ValueError, match="unknown Toy variant 'huge'; expected one of small, wide"):
    train.train_and_evaluate(toy_config(**{"model.variant": "huge"}), str(plugins / "other"))

  # A fresh process restores the checkpoint by the family's import path and samples it from the command line.
  tests = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(plugins), tests, ROOT]))
  (plugins / "toy_config.py").write_text(textwrap.dedent('''
      from plugin_test import toy_config


      def get_config():
        c = toy_config()
        c.lock()
        return c
  '''))
  result = subprocess.run([sys.executable, "-m", "jdit.main", f"--config={plugins / 'toy_config.py'}",
                           f"--workdir={workdir}", "--mode=sample", "--config.sample.num_samples=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  with np.load(os.path.join(workdir, "samples.npz")) as samples:
    assert samples["images"].shape == (4, 8, 8, 1)


def test_a_plugin_that_fails_to_import_says_why(tmp_path, monkeypatch):
  """A missing module is 'not a family or a source'; a module that exists but fails on its own import says so."""
  (tmp_path / "broken_family.py").write_text("import a_dependency_that_is_not_installed\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
    family.get("broken_family")
  with pytest.raises(ValueError, match="data.source must be one of .*got 'no_such_source'"):
    sources.get("no_such_source")
  assert not sources.known("json")  # importable, but not a source
