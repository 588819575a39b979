"""Benchmarks a DiT variant: train-step and sampling throughput, compile time, memory, model-FLOPs utilization.

    python tools/bench.py --variant=XL/2 --resolution=256 --batch=32 --dtype=bfloat16        # on a GPU / TPU
    python tools/bench.py --variant=S/2 --resolution=256 --batch=8 --torch                   # vs PyTorch, same run
MFU = achieved model FLOPs / device peak, with training FLOPs = 3 x forward FLOPs and forward FLOPs = 2 x the
multiply-adds of the model table; the peak comes from a table (TPU v4/v5e/v5p/v6e, A100, H100, H200, bf16 dense)
or, on CPU, from a measured matmul probe in the compute dtype. Prints a table; --json prints the same as JSON.
"""
import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import flops, sharding
from jdit.config import base as base_config
from jdit.diffusion import objective
from jdit.models import create_dit
from jdit.models.attention import ATTENTION_BACKENDS
from jdit.train import create_train_state, jit_train_step, make_optimizer

GUIDANCE = 4.0  # classifier-free guidance scale of the sampling figures (jdit and PyTorch)
PEAK_BF16_FLOPS = {  # dense bf16 peak per chip / GPU
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12,
}


def device_peak_flops(dtype: str = "float32") -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from); on CPU a matmul in `dtype` accumulating in
  float32, the way the model's matmuls run (bf16 GEMMs run about twice as fast on CPUs with AVX512-BF16)."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower() in kind.lower():
      return peak, f"{kind} bf16 peak (table)"
  n = 2048
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / _timed(matmul, a, repeats=5), f"{kind} {dtype} matmul probe (measured)"


def _timed(fn, *args, repeats: int, wait=jax.block_until_ready) -> float:
  """Median seconds of fn(*args) after one warm-up call; `wait(result)` blocks until the work is done."""
  wait(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    wait(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def make_model(args):
  return create_dit(args.variant, input_size=args.resolution // 8, dtype=args.dtype,
                    attention_backend=args.attention_backend, remat=args.remat,
                    scan_blocks=args.scan_blocks)


def forward_macs(args) -> int:
  """Multiply-adds of one image's forward pass, counted as the model table counts them."""
  return flops.dit_stats(make_model(args))["macs"]


def bench_jdit(args) -> dict:
  latent = args.resolution // 8
  model = make_model(args)
  config = base_config()  # the paper recipe: AdamW lr 1e-4, learned-sigma Gaussian diffusion, EMA
  config.diffusion.update(dict(sampling_steps=args.sample_steps, sampler="ddim", guidance_scale=GUIDANCE))
  cfg = config.diffusion
  mesh = sharding.make_mesh({"data": -1})
  tx, schedule = make_optimizer(config.optimizer)
  rules = (("act_batch", "data"), ("layers", None))
  with jax.set_mesh(mesh):
    state, shardings = create_train_state(model, tx, jax.random.key(0), mesh, rules)
    step = jit_train_step(config, model, tx, schedule, shardings, mesh)
    batch = sharding.global_batch({"image": np.random.randn(args.batch, latent, latent, 4).astype(np.float32),
                                   "label": np.arange(args.batch, dtype=np.int32) % 1000}, mesh)
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for _ in range(args.steps + 1):
      tic = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - tic)
    step_s = float(np.median(times[1:]))
    sample = jax.jit(objective.make_sample_fn(model, cfg))
    x = jnp.asarray(np.random.randn(args.batch, latent, latent, 4), jnp.float32)
    labels = jnp.arange(args.batch) % 1000
    sample_s = _timed(sample, state.ema_params, x, labels, rng, repeats=1)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.full((args.batch,), 500.0), labels))
    forward_s = _timed(forward, state.ema_params, x, repeats=args.steps)
  macs = forward_macs(args)
  peak, peak_source = device_peak_flops(args.dtype)
  train_flops = 3 * 2 * macs * args.batch
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use") or (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                                   + memory.output_size_in_bytes)
  return {
      "variant": args.variant, "resolution": args.resolution, "batch": args.batch, "dtype": args.dtype,
      "attention_backend": args.attention_backend, "remat": args.remat, "scan_blocks": args.scan_blocks,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "gmacs_per_image": round(macs / 1e9, 4), "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "train_images_per_s": round(args.batch / step_s, 2),
      "forward_images_per_s": round(args.batch / forward_s, 2),
      "sample_images_per_s": round(args.batch / sample_s, 3), "sample_steps": args.sample_steps,
      "peak_memory_gb": round(peak_bytes / 2 ** 30, 3),
      "mfu": round(train_flops / step_s / (peak * jax.device_count()), 4), "peak_source": peak_source,
  }


def bench_torch(args) -> dict:
  """The same DiT as diffusers' DiTTransformer2DModel on this machine (CUDA if present, else CPU), in the same
  precision (bf16 autocast for --dtype=bfloat16): AdamW train step (MSE on the output), forward, and DDIM
  sampling with classifier-free guidance (batch doubled, as DiTPipeline) for --sample_steps steps."""
  import contextlib

  import torch
  from diffusers import DDIMScheduler, DiTTransformer2DModel

  from jdit.models.dit import parse_variant
  depth, hidden, heads, patch = parse_variant(args.variant)
  latent = args.resolution // 8
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                out_channels=8, num_layers=depth, sample_size=latent, patch_size=patch,
                                num_embeds_ada_norm=1000).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  x = torch.randn(args.batch, 4, latent, latent, device=device)
  t = torch.randint(0, 1000, (args.batch,), device=device)
  y = torch.arange(args.batch, device=device) % 1000
  precision = lambda: (torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                       else contextlib.nullcontext())

  def train_step():
    opt.zero_grad(set_to_none=True)
    with precision():
      loss = model(x, t, y).sample.float().square().mean()
    loss.backward()
    opt.step()

  def forward():
    with torch.no_grad(), precision():
      model(x, t, y)

  scheduler = DDIMScheduler(num_train_timesteps=1000)  # the DiT paper's linear betas 1e-4 .. 0.02
  scheduler.set_timesteps(args.sample_steps)
  labels = torch.cat([y, torch.full_like(y, 1000)])  # conditional half, then the null class

  def sample():
    latents = torch.randn_like(x)
    with torch.no_grad(), precision():
      for step in scheduler.timesteps:
        out = model(torch.cat([latents, latents]), step.expand(2 * args.batch).to(device), labels).sample
        cond, uncond = out[:, :4].float().chunk(2)  # eps; the learned-variance channels are unused by DDIM
        latents = scheduler.step(uncond + GUIDANCE * (cond - uncond), step, latents).prev_sample

  wait = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  seconds = {name: _timed(fn, repeats=repeats, wait=wait)
             for name, fn, repeats in (("train", train_step, args.steps), ("forward", forward, args.steps),
                                       ("sample", sample, 1))}
  return {"torch_device": device, "torch_train_images_per_s": round(args.batch / seconds["train"], 2),
          "torch_forward_images_per_s": round(args.batch / seconds["forward"], 2),
          "torch_sample_images_per_s": round(args.batch / seconds["sample"], 3)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="S/2")
  parser.add_argument("--resolution", type=int, default=256, help="image size; the model sees resolution/8 latents")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--sample_steps", type=int, default=10, help="DDIM steps with guidance for the sampling figure")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS)
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--scan_blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="nn.scan over the blocks (--no-scan_blocks: unrolled)")
  parser.add_argument("--torch", action="store_true", help="also time diffusers' PyTorch DiT on this machine")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  row = bench_jdit(args)
  if args.torch:
    row.update(bench_torch(args))
    for name in ("train", "forward", "sample"):
      row[f"jdit_vs_torch_{name}"] = round(row[f"{name}_images_per_s"] / row[f"torch_{name}_images_per_s"], 3)
  if args.json:
    print(json.dumps(row, indent=1))
  else:
    print("\n".join(f"{k:>28}: {v}" for k, v in row.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
