"""The main job as users run it: CLI errors, SIGKILL-and-resume bit-identity, SIGTERM save, 2 processes."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import free_port, load_config, load_tool

from jdit import checkpoint, config_check, config_listing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.depth=2", "--config.model.hidden_size=32", "--config.model.num_heads=2",
        "--config.batch_size=16", "--config.sample_every=0"]


def launch(workdir, *flags, devices=1, config="configs/digits.py", extra_env=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             **(extra_env or {}))
  return subprocess.Popen([sys.executable, "-m", "jdit.main", f"--config={config}", f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(workdir, *flags, **kwargs):
  proc = launch(workdir, *flags, **kwargs)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def train_params(workdir, step):
  """The raw (non-EMA) parameters of a training checkpoint as host numpy arrays, whatever devices saved it."""
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_handlers={"train": ocp.StandardCheckpointHandler()}) as manager:
    metadata = manager.item_metadata(step)["train"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    restored = manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore(target)))
  return restored["train"]["params"]


@pytest.mark.parametrize("flags,message", [
    (["--config.model.variant=Huge/2"], "error: unknown DiT variant 'Huge/2'"),
    (["--config.batch_size=15"], "error: batch_size=15 must be divisible by the data-parallel size 2"),
    (["--config.mesh.data=3"], "error: mesh: {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit the 2 devices"),
])
def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path, flags, message):
  code, _, err = run(str(tmp_path / "w"), *flags, devices=2)
  assert code != 0
  assert err.strip().splitlines()[-1].startswith(message), err[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_missing_dataset_says_where_it_looked_and_how_to_prepare(tmp_path):
  code, _, err = run(str(tmp_path / "w"), f"--config.data.data_dir={tmp_path}/latents", config="configs/dit_xl.py")
  last = err.strip().splitlines()[-1]
  assert code != 0
  assert last.startswith(f"error: data.data_dir='{tmp_path}/latents': no finished latent dataset")
  assert "tools/extract_latents.py" in last


def validation_numbers(out: str, step: int) -> list[float]:
  """The loss, x0_hat variance, change and error of the validation line of `step` in a run's output."""
  line = re.search(rf"step {step}: validation loss .*", out).group(0)
  return [float(value) for value in re.findall(r"(?:loss|variance|change|error) ([-+.\de]+)", line)]


def test_sigkill_and_restart_ends_bit_identical(tmp_path):
  flags = TINY + ["--config.num_train_steps=60", "--config.checkpoint_every=5", "--config.log_every=5",
                  "--config.eval.val_every=30", "--config.eval.val_num_samples=16"]
  reference = str(tmp_path / "reference")
  uninterrupted = launch(reference, *flags)  # runs alongside the killed run
  killed = str(tmp_path / "killed")
  proc = launch(killed, *flags)
  ckpts = os.path.join(killed, "checkpoints")
  deadline = time.time() + 120
  while (checkpoint.latest_step(ckpts) or 0) < 10 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  interrupted_at = checkpoint.latest_step(ckpts)
  assert interrupted_at is not None and interrupted_at < 60, "the run was not interrupted mid-way"
  code, out, _ = run(killed, *flags)
  assert code == 0 and f"resuming from {ckpts} step {interrupted_at}" in out
  reference_out, _ = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0
  for a, b in zip(jax.tree.leaves(train_params(killed, 60)), jax.tree.leaves(train_params(reference, 60))):
    np.testing.assert_array_equal(a, b)
  assert validation_numbers(out, 60) == validation_numbers(reference_out, 60)  # the validation pass too, exactly


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
  workdir = str(tmp_path / "w")
  proc = launch(workdir, *TINY, "--config.num_train_steps=100000", "--config.checkpoint_every=50",
                "--config.log_every=50")
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 120
  while checkpoint.latest_step(ckpts) is None and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-2000:]  # EX_TEMPFAIL, not 0: the run must be restarted
  saved = int(re.search(r"SIGTERM: saved a checkpoint at step (\d+) of 100000 .* run the same command again",
                        err.strip().splitlines()[-1]).group(1))
  assert checkpoint.latest_step(ckpts) == saved and saved < 100000


def test_two_processes_match_one_process(tmp_path, capsys):
  """Two processes train and validate as one; the evaluation tool's prediction stability of the run (its EMA
  weights, with ema_decay=0 the trained ones) is the validation pass's."""
  flags = TINY + ["--config.num_train_steps=3", "--config.checkpoint_every=3", "--config.log_every=1",
                  "--config.eval.val_every=3", "--config.eval.val_num_samples=16", "--config.ema_decay=0"]
  single = str(tmp_path / "single")
  reference = launch(single, *flags, devices=8)  # runs alongside the 2-process job
  multi = str(tmp_path / "multi")
  port = free_port()
  procs = [launch(multi, *flags, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                  f"--process_id={i}", devices=4) for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), results[0][1][-2000:] + results[1][1][-2000:]
  single_out, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-2000:]
  assert "on 8 devices" in results[0][0]
  for a, b in zip(jax.tree.leaves(train_params(multi, 3)), jax.tree.leaves(train_params(single, 3))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  validation = [validation_numbers(out, 3) for out in (results[0][0], single_out)]
  assert validation[0] == pytest.approx(validation[1], rel=1e-5)  # the same held-out set, steps and noise
  assert len(validation[0]) == 4 and all(value > 0 for value in validation[0])
  assert load_tool("evaluate").main(["--stability", f"--workdir={single}"]) == 0
  assert "x0_variance" in capsys.readouterr().out
  with open(os.path.join(single, "stability.json")) as f:
    numbers = json.load(f)
  assert [numbers[name] for name in ("loss", "x0_variance", "x0_change", "x0_error")] == pytest.approx(
      validation[1], rel=1e-5)


def test_mode_config_lists_every_field_with_its_value_and_meaning():
  """--mode=config prints every field of the config, overrides applied, each with what it means (from the comment
  where it is declared); fields a preset sets show the preset's value. Every bundled recipe's fields have one."""
  result = subprocess.run([sys.executable, "-m", "jdit.main", "--config=configs/digits.py", "--mode=config",
                           "--config.model.depth=2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = dict(line.split(" = ", 1) for line in result.stdout.strip().splitlines())
  config = load_config("digits.py")
  assert set(lines) == {name for name, _ in config_check.leaves(config)}
  assert lines["model.depth"].startswith("2  # blocks") and lines["diffusion.guidance_scale"].startswith("2.0  # ")
  for args in [("digits.py", "unet"), ("mmdit.py",), ("digit_scenes.py",), ("adm.py",), ("dit_flow.py",),
               ("lightning_dit.py",)]:
    listing = config_listing.listing(load_config(*args)).splitlines()
    assert all("  # " in line for line in listing), [line for line in listing if "  # " not in line]
  mmdit = config_listing.listing(load_config("mmdit.py", "sd3-medium"))
  assert "model.num_heads = None -> 24 (the preset's)  # attention heads" in mmdit
