"""Reliability III, the inputs: garbage weight files are one-line errors naming the file in every loader (the
safetensors header is checked against the file before anything is allocated); sampling inputs that do not fit the
model are refused; config files that do not import, raise or return no config are one line; SIGTERM before the
training loop exits 75."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import randomize
from train_test import ROOT, tiny_config

from jdit import checkpoint, config_check, convert, lora, sample
from jdit.convert.vae import load_vae
from jdit.eval.clip import load_clip_vision
from jdit.eval.features import load_inception
from jdit.models import family
from jdit.state_dict import CheckpointError
from jdit.text.weights import load_text_encoder


def _write(path, content: bytes) -> str:
  path.write_bytes(content)
  return str(path)


def _header_file(path, header, data: bytes = b"") -> str:
  raw = json.dumps(header).encode()
  return _write(path, len(raw).to_bytes(8, "little") + raw + data)


GARBAGE = {
    "random bytes": lambda p: _write(p, np.random.default_rng(0).bytes(4096)),
    "huge header": lambda p: _write(p, (2 ** 63).to_bytes(8, "little") + b"{}"),
    "shape past the data": lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6],
                                                            "data_offsets": [0, 16]}}, bytes(16)),
    "offsets past the end": lambda p: _header_file(p, {"w": {"dtype": "F32", "shape": [4],
                                                             "data_offsets": [0, 2 ** 40]}}, bytes(16)),
    "unknown dtype": lambda p: _header_file(p, {"w": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}},
                                            bytes(16)),
    "a header that is a list": lambda p: _header_file(p, [1, 2, 3]),
}
LOADERS = {
    "load_checkpoint": convert.load_checkpoint, "load_dit_checkpoint": convert.load_dit_checkpoint,
    "load_unet_checkpoint": convert.load_unet_checkpoint, "load_mmdit_checkpoint": convert.load_mmdit_checkpoint,
    "load_flux_checkpoint": convert.load_flux_checkpoint, "load_vae": load_vae,
    "load_text_encoder": load_text_encoder, "load_inception": load_inception, "load_clip_vision": load_clip_vision,
    "lora.describe_file": lora.describe_file,
}


@pytest.mark.parametrize("kind", GARBAGE)
def test_every_loader_turns_a_garbage_file_into_one_line_naming_it(tmp_path, kind):
  path = GARBAGE[kind](tmp_path / "weights.safetensors")
  for name, loader in LOADERS.items():
    with pytest.raises(CheckpointError) as info:
      loader(path)
    message = str(info.value)
    assert path in message and "\n" not in message, (name, message)
    assert "not a readable safetensors file" in message, (name, message)


def test_sampling_inputs_that_do_not_fit_the_model_are_refused(tmp_path):
  config = tiny_config()
  model = family.create(config.model)
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  checkpoint.save_pretrained(str(tmp_path / "checkpoints"), model, jax.tree.map(np.asarray, params))
  for changes, message in [({"sample.classes": (3, 11)}, r"sample.classes=\(3, 11\): DiT\(.*\) has classes 0 to 9"),
                           ({"sample.prompts": ("a red three",)}, "sample.prompts: DiT.* is not text-conditioned")]:
    with pytest.raises(ValueError, match=message):
      sample.sample_and_save(tiny_config(**changes), str(tmp_path))
  assert not (tmp_path / "samples.npz").exists()
  for changes, message in [({"diffusion.guidance_scale": float("inf")}, "diffusion.guidance_scale=inf: expected"),
                           ({"sample.aspect_ratio": "1000000000:1"}, "at most 16:1 either way")]:
    with pytest.raises(ValueError, match=message):
      config_check.validate(tiny_config(**changes), "sample", str(tmp_path))


def cli(*args, **kwargs):
  return subprocess.Popen([sys.executable, "-m", "jdit.main", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), **kwargs)


@pytest.mark.parametrize("source,message", [
    ("def get_config(:\n  pass\n", "line 1: invalid syntax"),
    ("def get_config():\n  raise RuntimeError('boom')\n", "get_config\\(\\) raised RuntimeError: boom"),
    ("def get_config():\n  return 3\n", "get_config\\(\\) returned int, not an ml_collections ConfigDict"),
    ("x = 1\n", "defines no get_config\\(\\)"),
])
def test_config_files_that_fail_are_one_line(tmp_path, source, message):
  (tmp_path / "bad.py").write_text(source)
  _, err = cli(f"--config={tmp_path / 'bad.py'}", f"--workdir={tmp_path / 'w'}").communicate(timeout=120)
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
  assert err.startswith(f"error: --config={tmp_path / 'bad.py'}: ") and re.search(message, err), err


def test_sigterm_before_the_training_loop_exits_75_and_leaves_nothing(tmp_path):
  process = cli("--config=configs/digits.py", f"--workdir={tmp_path / 'w'}")
  time.sleep(1.0)  # importing: long before the loop
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 75, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("SIGTERM before training started") and not (tmp_path / "w").exists()
