"""The benchmark tools run on small configs (bench.py, bench_attention.py, bench_vae.py, bench_text.py), and the
model benchmark's FLOP count agrees with the model table."""
import argparse
import json
import os

import pytest
from conftest import load_tool

from jdit import flops
from jdit.benchmarks.model import forward_macs

bench = load_tool("bench")


def test_bench_flops_agree_with_the_model_table():
  table = {r["model"]: r for r in flops.table_rows("dit", ["S/8", "XL/2"])}
  for variant in ("S/8", "XL/2"):
    for scan_blocks in (False, True):  # MACs inside the scanned block count depth times
      args = argparse.Namespace(family="dit", variant=variant, resolution=256, dtype="float32",
                                      attention_backend="xla", remat="none", scan_blocks=scan_blocks)
      assert forward_macs(args) / 1e9 == pytest.approx(table[variant]["gmacs"], abs=1e-3)
  unet = flops.table_rows("unet", ["adm64"])[0]
  args = argparse.Namespace(family="unet", variant="adm64", resolution=64, dtype="float32",
                                  attention_backend="xla", remat="none", scan_blocks=True)
  assert forward_macs(args) / 1e9 == pytest.approx(unet["gmacs"], abs=1e-3)


def test_bench_reports_throughput_memory_and_mfu(capsys):
  assert bench.main(["--variant=Tiny/2", "--resolution=64", "--batch=8", "--steps=2", "--sample_steps=2",
                     "--scan_blocks", "--remat=full", "--profile", "--samplers=ddim:3,dpmpp_2m:2", "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["gmacs_per_image"] > 0
  for key in ("compile_s", "step_s", "train_images_per_s", "sample_images_per_s", "peak_memory_gb", "mfu"):
    assert row[key] > 0, key
  assert 0 < row["mfu"] < 1 and "probe" in row["peak_source"]  # CPU: measured matmul peak
  assert row["cpu_cores"] == os.cpu_count() and row["cpu_model"] and row["load_average_1m"] >= 0  # the host
  assert set(row["sampler_images_per_s"]) == {"ddim:3", "dpmpp_2m:2"} and min(row["sampler_images_per_s"].values()) > 0
  categories = row["train_step_profile"]["categories"]
  assert sum(c["ms"] for c in categories.values()) == pytest.approx(row["train_step_profile"]["op_ms"], abs=0.01)
  for name in ("matmul", "attention", "norm/reduce", "elementwise", "optimizer", "scan"):  # remat=full scans blocks
    assert categories[name]["ops"] > 0 and categories[name]["ms"] > 0, name


def test_a_busy_machine_gets_a_warning():
  from jdit.benchmarks.common import busy_warning
  assert busy_warning({"cpu_model": "x", "cpu_cores": 2, "load_average_1m": 0.4}) is None
  assert busy_warning({"cpu_model": "x", "cpu_cores": 2, "load_average_1m": 7.0}).startswith(
      "warning: load average 7.0 on 2 cores: the machine is busy")


def test_bench_rejects_an_unknown_sampler(capsys):
  assert bench.main(["--variant=Tiny/2", "--resolution=64", "--samplers=ddim:3,plms:4"]) == 2
  assert "--samplers: 'plms:4' is not SAMPLER:STEPS" in capsys.readouterr().err


def test_pytorch_side_by_side_runs():
  pytest.importorskip("diffusers")
  for dtype in ("float32", "bfloat16"):  # bf16: under autocast, as jdit's bf16 compute
    args = argparse.Namespace(family="dit", variant="S/8", resolution=64, batch=2, steps=1, sample_steps=2,
                                    dtype=dtype, attention_backend="xla", remat="none", scan_blocks=True,
                                    profile=dtype == "float32")
    from jdit.benchmarks.reference import bench_torch
    row = bench_torch(args)
    assert row["torch_device"] == "cpu"
    for key in ("torch_train_images_per_s", "torch_forward_images_per_s", "torch_sample_images_per_s"):
      assert row[key] > 0, key
    assert ("torch_train_step_profile" in row) == args.profile
    if args.profile:  # PyTorch's step in jdit.profile's categories: every op of the step lands in one
      step_profile = row["torch_train_step_profile"]
      for name in ("matmul", "attention", "elementwise", "optimizer"):
        assert step_profile["categories"][name]["ms"] > 0, name
      assert 0 < step_profile["op_ms"] <= 1.5 * step_profile["wall_ms"]


def test_unet_bench_runs_beside_guided_diffusion(capsys):
  pytest.importorskip("guided_diffusion")
  assert bench.main(["--family=unet", "--variant=tiny", "--resolution=8", "--batch=8", "--steps=1",
                     "--sample_steps=2", "--torch", "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["model"].startswith("UNet(model_channels=32") and row["resolution"] == 8
  for key in ("train_images_per_s", "sample_images_per_s", "torch_train_images_per_s", "torch_sample_images_per_s"):
    assert row[key] > 0, key


def test_text_encoder_bench_counts_the_encoder_and_times_transformers(capsys):
  """tools/bench_text.py on a one-layer T5-base: the traced multiply-adds equal the analytic count (q, k, v, o,
  gated FFN, two attention matmuls per token), and transformers' model is timed in the same run."""
  bench_text = load_tool("bench_text")
  assert bench_text.main(["--encoder=t5-base", "--layers=1", "--batch=2", "--length=8", "--repeats=1", "--torch",
                          "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  d, f, length = 768, 2048, 8
  assert row["gmacs_per_prompt"] == pytest.approx(length * (4 * d * d + 3 * d * f + 2 * length * d) / 1e9, abs=1e-3)
  assert row["prompts_per_s"] > 0 and row["torch_prompts_per_s"] > 0 and row["jdit_vs_torch"] > 0
  assert bench_text.main(["--encoder=clip-l", "--length=100"]) == 2


def test_mmdit_bench_runs_beside_diffusers_sd3(capsys):
  """--family=mmdit: the tiny MM-DiT's train step, forward and guided flow sampling, and diffusers'
  SD3Transformer2DModel with FlowMatchEulerDiscreteScheduler in the same run."""
  assert bench.main(["--family=mmdit", "--variant=tiny", "--resolution=64", "--batch=8", "--steps=1",
                     "--sample_steps=2", "--torch", "--json"]) == 0
  row = json.loads(capsys.readouterr().out)
  assert row["model"].startswith("MMDiT depth=2") and row["gmacs_per_image"] > 0
  assert all(row[f"jdit_vs_torch_{name}"] > 0 for name in ("train", "forward", "sample"))


def test_attention_bench_compares_backends_and_skips_what_would_not_fit(capsys):
  bench_attention = load_tool("bench_attention")
  rows = {}
  for limit in ("16", "0.00001"):
    assert bench_attention.main(["--tokens=64,96", "--heads=2", "--head_dim=8", "--steps=1", "--json",
                                 f"--max_memory_gib={limit}"]) == 0
    rows[limit] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["tokens"], r["backend"]) for r in rows["16"]] == [(64, "einsum"), (64, "blockwise"), (96, "einsum"),
                                                               (96, "blockwise")]
  assert all(r["memory_estimate_gib"] > 0 and r["forward_backward_s"] > 0 and r["forward_s"] > 0 for r in rows["16"])
  assert all("skipped" in r and "forward_s" not in r for r in rows["0.00001"])
  assert bench_attention.main(["--backends=einsum,flash"]) == 2


def test_vae_decode_bench_reports_time_and_memory_tiled_or_not(capsys):
  bench_vae = load_tool("bench_vae")
  for tile in (0, 4):
    assert bench_vae.main(["--vae=small", "--resolution=64", f"--tile={tile}", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["tile"] == tile and row["decode_s"] > 0 and row["process_growth_gib"] >= 0
    assert ("xla_temp_gib" in row) == (tile == 0)
  assert bench_vae.main(["--tile=-1"]) == 2
  assert "vae.decode_tile=-1" in capsys.readouterr().err
