"""tools/aot_compile.py (jdit.aot): the train step compiles for a mesh on abstract inputs; FSDP and remat show up in the
memory figures; the CLI says whether the step fits; --estimate reads XLA's cost model of every block."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config

from jdit import aot
from jdit.models import family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.xdist_group("aot_compile")


def digits(**model):
  config = load_config("digits.py")
  config.unlock()
  config.model.update({"depth": 2, **model})
  return config


@pytest.fixture(scope="module")
def replicated():
  return aot.compile_train_step(digits(), jax.devices(), estimate=True)


def test_fsdp_shards_the_state_and_remat_cuts_the_saved_activations(replicated):
  assert replicated["devices"] == 8 and replicated["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert replicated["arguments_gib"] == pytest.approx(replicated["train_state_gib_total"], rel=0.05)
  fsdp = digits(remat="full")
  fsdp.mesh.update(dict(data=1, fsdp=8))
  sharded = aot.compile_train_step(fsdp, jax.devices())
  assert sharded["arguments_gib"] < 0.25 * replicated["arguments_gib"]
  assert sharded["saved_activations_gib"] < 0.5 * replicated["saved_activations_gib"]


def test_cli_reports_whether_the_step_fits():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  run = lambda gib: subprocess.run([sys.executable, "tools/aot_compile.py", "--config=configs/digits.py",
                                    "--devices=4", f"--device_memory_gib={gib}", "--config.model.depth=1"],
                                   cwd=ROOT, env=env, capture_output=True, text=True)
  small = run(0.001)
  assert small.returncode == 3, small.stderr[-2000:]
  assert "fits: False" in small.stdout and "devices: 4" in small.stdout
  bad = subprocess.run([sys.executable, "tools/aot_compile.py", "--config=configs/digits.py", "--devices=4",
                        "--topology=v5p:2x2x1"], cwd=ROOT, env=env, capture_output=True, text=True)
  assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: --topology=v5p:2x2x1")


def test_text_encoder_parameters_split_over_fsdp():
  """--text_encoder: bigG's 2.6 GiB of float32 parameters hold 1/8 per device on an 8-way fsdp axis; --estimate
  counts the FLOPs of all its layers."""
  config = digits()
  config.mesh.update(dict(data=1, fsdp=8))
  row = aot.compile_text_encoder(config, jax.devices(), "clip-g", 0, "bfloat16", estimate=True)
  assert (row["parameters"], row["length"]) == (694_659_840, 77)
  assert row["estimate_from"] == "the pass with its layers unrolled"  # its 32 layers, not one scanned layer
  assert row["xla_tflops"] == pytest.approx(row["model_tflops"], rel=0.05)  # the forward matmuls per device
  assert row["params_gib_per_device"] == pytest.approx(row["params_gib_total"] / 8, rel=0.02)
  assert row["arguments_gib"] == pytest.approx(row["params_gib_per_device"], rel=0.02)


def test_buckets_compile_the_bucket_with_the_most_pixels(replicated):
  config = digits()
  config.data.buckets = "8x8,8x16,16x8,4x8"
  assert aot.worst_bucket(config, family.create(config.model)) == (16, 8)
  row = aot.compile_train_step(config, jax.devices())
  assert row["bucket"] == "16x8" and "bucket" not in replicated
  model = family.create(config.model)
  per_device = config.batch_size // 8
  wide = aot.saved_activation_bytes(model.clone(input_size=(16, 8)), per_device)
  assert wide == pytest.approx(2 * aot.saved_activation_bytes(model, per_device), rel=0.1)  # twice the tokens
  assert row["saved_activations_gib"] == round(wide / 2 ** 30, 3)


def test_max_batch_finds_the_largest_global_batch_that_fits(monkeypatch):
  """largest_batch (--max_batch): doubling then bisecting on the per-device batch, on a memory model of the step
  (1 GiB + 0.5 GiB per example per device; from 12 examples the compiler runs out of memory, as a TPU compile
  does): the batch it returns fits and one more example per device does not."""
  probed = []

  def fake_compile(config, devices):
    per_device = config.batch_size // 8
    probed.append(per_device)
    if per_device >= 12:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM")
    return {"global_batch": config.batch_size, "per_device_gib": 1 + 0.5 * per_device}

  monkeypatch.setattr(aot, "compile_train_step", fake_compile)
  lines = []
  config = digits()
  config.batch_size = 8
  row = aot.largest_batch(config, jax.devices(), 5.6, log=lines.append)  # 9 per device: 5.5 GiB
  assert row == {"global_batch": 72, "per_device_gib": 5.5, "largest_batch": 72}
  assert probed == [1, 2, 4, 8, 16, 12, 10, 9]
  assert lines[-4:] == ["global batch 128: does not fit (the compiler ran out of device memory)",
                        "global batch 96: does not fit (the compiler ran out of device memory)",
                        "global batch 80: 6.0 GiB per device", "global batch 72: 5.5 GiB per device"]
  assert aot.largest_batch(config, jax.devices(), 1.0, log=lines.append) == {"largest_batch": 0}


def test_estimate_counts_every_block_and_reads_the_roofline(replicated):
  """--estimate: XLA's FLOPs of the unrolled step are the model's matmul FLOPs (forward and backward) plus a
  little elementwise work, where the scanned step's cost counts one of its 2 blocks; the roofline and MFU follow
  from the cost and the chip's peaks (here a v5p's, with libtpu's optimal_seconds)."""
  row = replicated
  assert row["estimate_from"] == "the step with its blocks unrolled" and "estimated_mfu" not in row  # CPU: no peaks
  assert 1.0 < row["xla_tflops"] / row["model_tflops"] < 1.3 and row["hbm_gb"] > 0
  assert row["scanned_xla_tflops"] < 0.7 * row["xla_tflops"]  # one of the 2 blocks

  class Compiled:
    def __init__(self, **cost):
      self.cost = cost

    def cost_analysis(self):
      return self.cost

  tpu = aot.cost_estimate(Compiled(flops=2.3e13, **{"bytes accessed": 2.0e11, "optimal_seconds": 0.1}), 2.0e13,
                          "TPU v5p")
  assert tpu["roofline_compute_ms"] == pytest.approx(2.3e13 / 459e12 * 1e3, rel=1e-3) and tpu["bound"] == "memory"
  assert tpu["roofline_memory_ms"] == pytest.approx(2.0e11 / 2.765e12 * 1e3, rel=1e-3)
  assert tpu["estimated_step_s"] == 0.1 and tpu["estimated_mfu"] == round(2.0e13 / 0.1 / 459e12, 3)
  roofline = aot.cost_estimate(Compiled(flops=2.3e13, **{"bytes accessed": 2.0e11}), 2.0e13, "TPU v5p")
  assert roofline["estimated_step_s"] == pytest.approx(2.0e11 / 2.765e12, rel=1e-3)  # no optimal_seconds: the bound


def test_a_program_traced_for_a_tpu_on_this_host_has_the_tpus_layers():
  """An AOT compile for a TPU topology runs on a CPU host: traced for the target (jdit.nn.platform), its layers
  are the TPU's (bf16 activations, splash attention), not this host's (float32 activations, blockwise)."""
  from jdit.nn import attention, matmul, platform
  model = family.create(digits(dtype="bfloat16").model)
  with platform.targeting("tpu"):
    assert matmul.activation_dtype("bfloat16") == jnp.bfloat16 and platform.target() == "tpu"
    assert attention.resolve_backend("auto", "bfloat16", 256, 72) == "splash"
  assert matmul.activation_dtype("bfloat16") == jnp.float32 and platform.target() == "cpu"
  assert attention.resolve_backend("auto", "bfloat16", 256, 72) == "blockwise"
  tpu, cpu = (aot.saved_activation_bytes(model, 8, target) for target in ("tpu", "cpu"))
  assert 0.45 < tpu / cpu < 0.75  # the activations the backward pass keeps, mostly halved in bfloat16
