"""Fault injection: each kind of file a checkpoint holds is damaged (truncated, overwritten with random bytes of the
same size, deleted) in the newest of three steps; restoring falls back to the step before it with one line naming
the step and the file, moves the damaged step aside and loses nothing older. Plus the bad inputs that used to give
tracebacks, silent success or weak messages: each is now a one-line error naming the field or the file."""
import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from train_test import ROOT, tiny_config

from jdit import checkpoint, checkpoint_files, config_check, convert, train
from jdit.data import pipeline, sources

# One pytest-xdist worker runs the whole module (make test: --dist loadgroup), so the run is trained once.
pytestmark = pytest.mark.xdist_group("reliability")
STEPS = (1, 2, 3)
FILES = {  # what a step holds, by kind: a path pattern under the step directory
    "array data": "train/ocdbt.process_0/d/*",
    "orbax metadata": "params/_METADATA",
    "model config": "model/metadata",
    "data iterator state": "data/process_0-of-1.json",
}


def _config(**changes):
  return tiny_config(**{"model.depth": 1, "batch_size": 8, "num_train_steps": 3, "checkpoint_every": 1,
                        "keep_checkpoints": 3, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """A run with checkpoints at steps 1, 2 and 3."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  train.train_and_evaluate(_config(), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
  return workdir


@pytest.fixture(scope="module")
def fresh_state():
  """(abstract state, iterator factory, model) to restore into, as train_and_evaluate builds them."""
  config = _config()
  run = train.setup(config)
  with run.context():
    state = run.init(jax.random.key(0))
  source = sources.open_source(config.data)
  iterator = lambda: iter(pipeline.dataset_from_config(config.data, config.batch_size, source, 0, 1))  # noqa: E731
  return train.abstract_state(state), iterator, run.model


def damage(step_dir: str, pattern: str, how: str) -> str:
  """Damages the largest file matching `pattern` in the step; returns its path relative to the step."""
  path = max(glob.glob(os.path.join(step_dir, pattern)), key=os.path.getsize)
  size = os.path.getsize(path)
  if how == "truncate":
    os.truncate(path, size // 2)
  elif how == "random bytes":
    with open(path, "wb") as f:
      f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
  else:
    os.remove(path)
  return os.path.relpath(path, step_dir)


def copy_checkpoints(trained: str, tmp_path) -> str:
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(trained, "checkpoints"), directory)
  return directory


def files_of(step_dir: str) -> dict:
  out = {}
  for path in glob.glob(os.path.join(step_dir, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, step_dir)] = f.read()
  return out


@pytest.mark.parametrize("how", ["truncate", "random bytes", "delete"])
@pytest.mark.parametrize("kind", list(FILES))
def test_training_restore_falls_back_past_a_damaged_latest_step(trained, fresh_state, tmp_path, kind, how):
  directory = copy_checkpoints(trained, tmp_path)
  older = {step: files_of(os.path.join(directory, str(step))) for step in (1, 2)}
  damaged = damage(os.path.join(directory, "3"), FILES[kind], how)
  abstract, iterator, model = fresh_state
  lines = []
  ckpt = checkpoint.TrainCheckpointer(directory)
  state, _, step = ckpt.restore(abstract, iterator(), model, lines.append)
  ckpt.close()
  assert step == 2 and int(state.step) == 2
  assert len(lines) == 1 and "\n" not in lines[0], lines
  # the step and the file; same-size random bytes in array data are found by the read, which names the array
  named = "train/: ValueError: " if (kind, how) == ("array data", "random bytes") else damaged
  assert lines[0].startswith(f"checkpoint step 3 is unreadable ({named}") and "using step 2" in lines[0], lines
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"]
  assert damaged in files_of(os.path.join(directory, "3.corrupt")) or how == "delete"  # moved aside, not deleted
  for step, files in older.items():
    assert files_of(os.path.join(directory, str(step))) == files  # nothing older is touched
  _, ema = checkpoint.load_pretrained(os.path.join(trained, "checkpoints"), step=2)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)


def test_training_resumes_from_the_step_before_and_trains_on(trained, tmp_path, capsys):
  workdir = tmp_path / "run"
  copy_checkpoints(trained, workdir)
  damage(str(workdir / "checkpoints" / "3"), FILES["array data"], "truncate")
  state = train.train_and_evaluate(_config(num_train_steps=4), str(workdir))
  out = capsys.readouterr().out
  assert int(state.step) == 4 and "checkpoint step 3 is unreadable (train/ocdbt.process_0/d/" in out
  assert "resuming from" in out and "step 2" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3", "3.corrupt", "4"]  # keep=3 retires step 1


def test_sampling_falls_back_too_and_an_old_step_without_manifest_is_read_error_checked(trained, tmp_path):
  directory = copy_checkpoints(trained, tmp_path)
  os.remove(os.path.join(directory, "3", checkpoint_files.MANIFEST))  # as written before manifests existed
  damage(os.path.join(directory, "3"), "params/ocdbt.process_0/d/*", "truncate")  # what sampling reads
  lines = []
  model, params = checkpoint.load_pretrained(directory, log=lines.append)
  assert model.depth == 1 and lines[0].startswith("checkpoint step 3 is unreadable (params/: ValueError: "
                                                  "OUT_OF_RANGE"), lines
  assert sorted(os.listdir(directory)) == ["1", "2", "3.corrupt"]


def test_no_readable_step_is_one_error_listing_what_was_tried_and_nothing_moves(trained, fresh_state, tmp_path):
  directory = copy_checkpoints(trained, tmp_path)
  for step in STEPS:
    damage(os.path.join(directory, str(step)), FILES["model config"], "delete")
  abstract, iterator, model = fresh_state
  with pytest.raises(checkpoint.CheckpointUnreadable, match="no readable checkpoint \\(tried step 3: model/metadata: "
                     "missing; step 2: model/metadata: missing; step 1: model/metadata: missing\\); nothing was "
                     "moved") as info:
    checkpoint.TrainCheckpointer(directory).restore(abstract, iterator(), model)
  assert "\n" not in str(info.value) and sorted(os.listdir(directory)) == ["1", "2", "3"]
  with pytest.raises(checkpoint.CheckpointUnreadable):
    checkpoint.load_pretrained(directory)


def test_a_checkpoint_of_another_model_is_a_config_error_not_damage(trained, tmp_path):
  workdir = tmp_path / "run"
  copy_checkpoints(trained, workdir)
  with pytest.raises(ValueError, match="checkpoint step 3 in .* belongs to another model: params\\['blocks'\\].* is "
                     "\\(1, .*\\) there, \\(2, .*\\) for config.model .* new --workdir") as info:
    train.train_and_evaluate(_config(**{"model.depth": 2}), str(workdir))
  assert "\n" not in str(info.value) and sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]


# ----------------------------------------------------------------------------------------------
#                                 Bad inputs: one line each
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,message", [
    (dict(checkpoint_every=0), "checkpoint_every=0: expected an integer >= 1"),
    (dict(num_train_steps=-5), "num_train_steps=-5: expected an integer >= 1"),
    ({"diffusion.sampling_steps": 0}, "diffusion.sampling_steps=0: expected an integer >= 1"),
    ({"data.caption_dropout_prob": 1.5}, "data.caption_dropout_prob=1.5: expected a number in \\[0.0, 1.0\\]"),
    ({"diffusion.guidance_mode": "twice"}, "diffusion.guidance_mode='twice': expected one of 'first3', 'all'"),
    ({"model.dtype": "float31"}, "model.dtype='float31': expected one of 'float32', 'bfloat16', 'float16'"),
    ({"init_from": "/nonexistent/weights.pt"}, "init_from='/nonexistent/weights.pt': no such file or directory"),
])
def test_config_fields_are_checked_before_anything_runs(tmp_path, changes, message):
  with pytest.raises(ValueError, match=message) as info:
    train.train_and_evaluate(_config(**changes), str(tmp_path / "w"))
  assert "\n" not in str(info.value) and not (tmp_path / "w").exists()


def test_unknown_fields_and_every_bundled_config(tmp_path):
  config = _config()
  config.foo = 1
  with pytest.raises(ValueError, match="foo: unknown config field \\(known: axis_rules, batch_size"):
    config_check.validate(config)
  config = _config()
  config.model.depht = 2
  with pytest.raises(ValueError, match="model.depht: unknown config field \\(known in model: .*depth"):
    config_check.validate(config)
  from conftest import load_config
  for args in [("digits.py",), ("unet_digits.py",), ("digit_scenes.py",), ("dit_xl.py",), ("dit.py", "B/2"),
               ("dit_flow.py",), ("mmdit.py", "sd3.5-large"), ("adm.py", "adm64")]:
    config_check.validate(load_config(*args))  # the schema knows every field of every bundled config


def test_workdirs_that_cannot_be_written_name_the_path_and_the_reason(tmp_path):
  (tmp_path / "file").write_text("x")
  for workdir, message in [(tmp_path / "file", "is a file, not a directory"),
                           (tmp_path / "file" / "run", f"is under {tmp_path / 'file'}, which is a file, not a dir")]:
    with pytest.raises(ValueError, match=f"--workdir={workdir} {message}"):
      config_check.check_workdir(str(workdir))
  if os.path.isdir("/proc/self"):  # a special filesystem that cannot hold directories
    with pytest.raises(ValueError, match="--workdir=/proc/x: cannot create directories in /proc \\(.*proc filesystem"):
      config_check.check_workdir("/proc/x")
  config_check.check_workdir(str(tmp_path / "new" / "run"))
  assert sorted(os.listdir(tmp_path)) == ["file"]  # the check leaves nothing behind


def test_weight_errors_name_the_file_and_a_failed_init_from_leaves_no_directories(tmp_path):
  (tmp_path / "notes.pt").write_text("hello, not weights")
  with pytest.raises(convert.CheckpointError, match="notes.pt: not a PyTorch weight file \\(it starts with b'hell'"):
    convert.load_checkpoint(str(tmp_path / "notes.pt"))
  from safetensors.numpy import save_file
  os.makedirs(tmp_path / "foreign")
  save_file({"x": np.zeros(3, np.float32)}, str(tmp_path / "foreign" / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(ValueError, match="config.init_from=.*/foreign: .*/foreign/diffusion_pytorch_model.safetensors: "
                                       "missing key 'x_embedder.proj.weight'") as info:
    train.train_and_evaluate(_config(init_from=str(tmp_path / "foreign")), str(tmp_path / "w"))
  assert "\n" not in str(info.value) and not (tmp_path / "w").exists()


def cli(workdir, *flags):
  return subprocess.run([sys.executable, "-m", "jdit.main", f"--workdir={workdir}", *flags], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def test_a_non_finite_loss_before_any_checkpoint_says_so_and_exits_3(tmp_path):
  result = cli(tmp_path / "w", "--config=configs/digits.py", "--config.model.depth=1", "--config.model.hidden_size=32",
               "--config.model.num_heads=2", "--config.batch_size=8", "--config.sample_every=0",
               "--config.num_train_steps=50", "--config.log_every=1", "--config.checkpoint_every=1000",
               "--config.optimizer.learning_rate=1e6")
  assert result.returncode == 3, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: non-finite loss") and \
      result.stderr.strip().endswith("stopping, no checkpoint had been written yet")


@pytest.mark.parametrize("flags,message", [
    (["--config=configs/digits.py", "--config.foo=1"], "error: --config.foo: unknown config field 'foo'"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file"),
    (["--config=configs/digits.py", "--config.model.learning_rate=1"],
     "error: --config.model.learning_rate: unknown config field 'learning_rate'"),
])
def test_cli_flag_errors_are_one_line(tmp_path, flags, message):
  result = cli(tmp_path / "w", *flags)
  assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
