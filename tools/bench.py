"""Benchmarks a model of any family: train-step and sampling throughput, compile time, memory, model-FLOPs
utilization, and optionally the PyTorch reference model side by side.

    python tools/bench.py --variant=XL/2 --resolution=256 --batch=32 --dtype=bfloat16        # on a GPU / TPU
    python tools/bench.py --variant=S/2 --resolution=256 --batch=8 --torch                   # vs PyTorch, same run
    python tools/bench.py --family=unet --variant=adm64 --resolution=64 --batch=8 --torch    # ADM U-Net, pixels
    python tools/bench.py --family=mmdit --variant=sd3.5-medium --resolution=1024 --batch=4 --dtype=bfloat16
    python tools/bench.py --attention --tokens=1024,4096,16384 --heads=16 --head_dim=64 --batch=1   # backends
    python tools/bench.py --vae_decode --vae=sd --resolution=1024 --tile=64       # one VAE decode; --tile=0 untiled
    python tools/bench.py --variant=S/2 --profile --samplers=equal_quality   # + op categories, images/s per sampler
DiT variants see resolution/8 latents (the SD VAE), MM-DiT presets resolution/8 16-channel latents and SD3's 333
text tokens, U-Net presets pixels. --attention instead times one attention layer's forward and backward pass
per backend (--backends) and token count, with its memory: the device's peak where it reports one, else XLA's
compiled estimate (arguments + outputs + temporaries); a backend whose estimate exceeds --max_memory_gib is
compiled but not run. --vae_decode times one decode of a random latent with an untrained VAE (--vae: a VAE
config, or "small", widths 32-128), tiled (jdit.models.tiling) or not, and reports the device's peak memory where it
reports one, else how much the process grew (resident set high-water mark) over the first call: run one --tile per
process to compare them.
MFU = achieved model FLOPs / device peak, with training FLOPs = 3 x forward FLOPs and forward FLOPs = 2 x the
multiply-adds of the model table; the peak comes from a table (TPU v4/v5e/v5p/v6e, A100, H100, H200, bf16 dense)
or, on CPU, from a measured matmul probe in the compute dtype. Prints a table; --json prints the same as JSON.
"""
import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import convert, flops, profile, sharding, train
from jdit.config import base as base_config
from jdit.diffusion import objective
from jdit.models import family
from jdit.models.vae import VAE_CONFIGS
from jdit.nn.attention import ATTENTION_BACKENDS

GUIDANCE = 4.0  # classifier-free guidance scale of the sampling figures (jdit and PyTorch)
EQUAL_QUALITY = {  # --samplers=equal_quality: Gaussian, the README's digits table (within 10% of DDPM-250's FD);
    # flow, the step counts at which tests/diffusion_toy_test.py's samplers match the mixture's class statistics
    "gaussian": "ddpm:250,ddim:50,dpmpp_2m:10,dpmpp_2m_sde:20",
    "flow": "euler:100,heun:25,dpmpp_2m:10,dpmpp_2m_sde:20"}
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
  """The named model at --resolution with the benchmark's options (those its family has)."""
  model = family.get(args.family).table_model(args.variant, args.resolution)
  options = dict(dtype=args.dtype, attention_backend=args.attention_backend, remat=args.remat,
                 scan_blocks=args.scan_blocks,
                 class_dropout_prob=max(getattr(model, "class_dropout_prob", 0.0), 0.1))  # a null class: guidance
  return model.clone(**{k: v for k, v in options.items() if hasattr(model, k)})


def forward_macs(args) -> int:
  """Multiply-adds of one image's forward pass, counted as the model table counts them."""
  return flops.model_stats(make_model(args))["macs"]


def samplers_to_time(spec: str, kind: str) -> list[tuple[str, int]]:
  """--samplers: "SAMPLER:STEPS,..." or "equal_quality" (EQUAL_QUALITY[kind]); each checked against the kind."""
  if not spec:
    return []
  spec = EQUAL_QUALITY[kind] if spec == "equal_quality" else spec
  pairs = []
  for item in spec.split(","):
    name, _, steps = item.partition(":")
    if name not in objective.SAMPLERS[kind] or not steps.isdigit() or int(steps) < 1:
      raise ValueError(f"--samplers: {item!r} is not SAMPLER:STEPS with SAMPLER one of {objective.SAMPLERS[kind]}")
    pairs.append((name, int(steps)))
  return pairs


def bench_jdit(args) -> dict:
  model = make_model(args)
  config = base_config(model.FAMILY)  # the paper recipe: AdamW lr 1e-4, learned-sigma Gaussian diffusion, EMA
  sampler = "ddim" if config.diffusion.kind == "gaussian" else config.diffusion.sampler  # flow (MM-DiT): euler
  config.diffusion.update(dict(sampling_steps=args.sample_steps, sampler=sampler, guidance_scale=GUIDANCE))
  to_time = samplers_to_time(args.samplers, config.diffusion.kind)
  config.update(dict(batch_size=args.batch, mesh={"data": -1, "fsdp": 1, "tensor": 1}))
  run = train.setup(config, model=model)
  model, mesh = run.model, run.mesh
  batch = {k: np.asarray(v) for k, v in model.dummy_batch(args.batch).items()}
  batch["image"] = np.random.randn(*batch["image"].shape).astype(np.float32)
  if "label" in batch:
    batch["label"] = np.arange(args.batch, dtype=np.int32) % model.num_classes
  with run.context():
    state = run.init(jax.random.key(0))
    batch = sharding.global_batch(batch, mesh)
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = run.step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def train_once():
      nonlocal state
      state, metrics = compiled(state, batch, rng)
      return metrics

    step_s = _timed(train_once, repeats=args.steps)
    if args.profile:
      step_profile = profile.profile(compiled.as_text(), train_once, repeats=args.steps)
    cond = model.condition(batch)
    for key, null in getattr(model, "null_keys", {}).items():  # text families: the empty prompt for guidance
      cond[null] = jnp.zeros_like(cond[key])
    sampling_s = lambda diffusion: _timed(jax.jit(objective.make_sample_fn(model, diffusion)), state.ema_params,
                                          batch["image"], cond, rng, repeats=1)
    sample_s = sampling_s(config.diffusion)
    per_sampler = {}
    for name, steps in to_time:
      diffusion = config.diffusion.copy_and_resolve_references()
      diffusion.update(dict(sampler=name, sampling_steps=steps))
      per_sampler[f"{name}:{steps}"] = round(args.batch / sampling_s(diffusion), 3)
    t = jnp.full((args.batch,), 500.0)
    forward = jax.jit(lambda p, x: family.apply(model, p, x, t, cond))
    forward_s = _timed(forward, state.ema_params, batch["image"], repeats=args.steps)
  macs = forward_macs(args)
  peak, peak_source = device_peak_flops(args.dtype)
  train_flops = 3 * 2 * macs * args.batch
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use") or (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                                   + memory.output_size_in_bytes)
  return {
      "model": model.describe(), "resolution": args.resolution, "batch": args.batch, "dtype": args.dtype,
      "attention_backend": args.attention_backend, "remat": args.remat, "scan_blocks": args.scan_blocks,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # hugetlb=1: big buffers on huge pages (README)
      "gmacs_per_image": round(macs / 1e9, 4), "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "train_images_per_s": round(args.batch / step_s, 2),
      "forward_images_per_s": round(args.batch / forward_s, 2),
      "sample_images_per_s": round(args.batch / sample_s, 3), "sample_steps": args.sample_steps,
      **({"sampler_images_per_s": per_sampler} if per_sampler else {}),
      **({"train_step_profile": step_profile} if args.profile else {}),
      "peak_memory_gb": round(peak_bytes / 2 ** 30, 3),
      "mfu": round(train_flops / step_s / (peak * jax.device_count()), 4), "peak_source": peak_source,
  }


def bench_attention(args):
  """Yields one row per (tokens, backend): seconds and memory of the value-and-grad of an attention layer."""
  from jdit.nn.attention import dot_product_attention
  for tokens in args.tokens:
    shape = (args.batch, tokens, args.heads, args.head_dim)
    q, k, v, w = (jax.random.normal(jax.random.key(i), shape, args.dtype) for i in range(4))
    for backend in args.backends:
      def loss(q, k, v, w, backend=backend):
        return jnp.vdot(dot_product_attention(q, k, v, backend).astype(jnp.float32), w.astype(jnp.float32))
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      memory = step.lower(q, k, v, w).compile().memory_analysis()
      estimate = (memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes) / 2 ** 30
      row = {"tokens": tokens, "backend": backend, "memory_estimate_gib": round(estimate, 3)}
      if estimate <= args.max_memory_gib:
        row["forward_backward_s"] = round(_timed(step, q, k, v, w, repeats=args.steps), 4)
        row["forward_s"] = round(_timed(jax.jit(loss), q, k, v, w, repeats=args.steps), 4)
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        if peak:
          row["device_peak_gib"] = round(peak / 2 ** 30, 3)
      else:
        row["skipped"] = f"over --max_memory_gib={args.max_memory_gib}"
      yield row


SMALL_VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=8)


def bench_vae_decode(args) -> dict:
  """Seconds (after a warm-up call) and memory of one decode of (1, resolution/8, resolution/8, C) latents."""
  import resource

  from jdit.models import tiling
  from jdit.models import vae as vae_lib
  vae = vae_lib.AutoencoderKL(**(SMALL_VAE if args.vae == "small" else vae_lib.VAE_CONFIGS[args.vae]),
                              dtype=args.dtype)
  params = vae.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  size = args.resolution // vae.downsample_factor
  latents = np.random.RandomState(0).randn(1, size, size, vae.latent_channels).astype(np.float32)
  row = {"vae": args.vae, "resolution": args.resolution, "tile": args.tile}
  if args.tile:
    decode = lambda z: tiling.decode_tiled(vae, params, z, args.tile)  # noqa: E731
  else:
    decode = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode)).lower(latents).compile()
    row["xla_temp_gib"] = round(decode.memory_analysis().temp_size_in_bytes / 2 ** 30, 3)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes on Linux
  row["decode_s"] = round(_timed(decode, latents, repeats=1), 3)
  row["process_growth_gib"] = round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2 ** 30, 3)
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  if peak:
    row["device_peak_gib"] = round(peak / 2 ** 30, 3)
  return row


def _torch_conditioning(spec, batch: int, device) -> tuple[tuple, tuple]:
  """(conditional, unconditional) inputs of the reference, by the model's condition keys: class labels and the
  null class, or random text embeddings (context, pooled) and the empty-prompt stand-in (zeros)."""
  import torch
  if "label" in spec.condition_keys:
    y = torch.arange(batch, device=device) % spec.num_classes
    return (y,), (torch.full_like(y, spec.num_classes),)
  shapes = {k: v.shape for k, v in spec.dummy_batch(batch).items()}
  cond = tuple(torch.randn(*shapes[k], device=device) for k in spec.condition_keys)
  return cond, tuple(map(torch.zeros_like, cond))


TORCH_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::convolution",
                 "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution")
TORCH_COPIES = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy")


def _torch_category(event) -> str:
  """jdit.profile's category of one PyTorch op (its own time): matmul, attention, optimizer (run under
  Optimizer.step), copy/transpose, elementwise (the rest: norms, GELU, modulation, reductions)."""
  parent = event
  while parent is not None:
    if parent.name.startswith("Optimizer.step"):
      return "optimizer"
    parent = parent.cpu_parent
  name = event.name
  if name in TORCH_MATMULS:
    return "matmul"
  if "scaled_dot_product" in name or "softmax" in name:
    return "attention"
  return "copy/transpose" if name in TORCH_COPIES else "elementwise"


def torch_profile(step, repeats: int) -> dict:
  """jdit.profile.profile's result for a PyTorch step: its ops' own CPU time by category under torch.profiler."""
  import torch
  step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
    start = time.perf_counter()
    for _ in range(repeats):
      step()
    wall = (time.perf_counter() - start) / repeats
  timed = collections.defaultdict(float)  # (op, category) -> ms per step
  for event in trace.events():
    if event.self_cpu_time_total > 0 and not event.name.startswith(("Optimizer.step", "ProfilerStep")):
      timed[event.name, _torch_category(event)] += event.self_cpu_time_total / 1e3 / repeats
  return profile.summarize([(ms, name, category, "") for (name, category), ms in timed.items()], wall)


def bench_torch(args) -> dict:
  """The same model in its PyTorch reference (diffusers' DiTTransformer2DModel or SD3Transformer2DModel,
  guided-diffusion's UNetModel) on this machine (CUDA if present, else CPU), in the same precision (bf16 autocast
  for --dtype=bfloat16): AdamW train step (MSE on the output), forward, and sampling with classifier-free
  guidance (batch doubled, as the pipelines do) for --sample_steps steps: DDIM (Gaussian families) or
  FlowMatchEuler (MM-DiT)."""
  import contextlib

  import torch
  from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

  spec = make_model(args)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  module, model = convert.converter(spec.FAMILY).torch_reference(spec)
  module.to(device)
  channels = spec.in_channels
  x = torch.randn(args.batch, channels, *spec.input_hw, device=device)
  t = torch.randint(0, 1000, (args.batch,), device=device)
  cond, null = _torch_conditioning(spec, args.batch, device)
  opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.0)
  precision = lambda: (torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                       else contextlib.nullcontext())

  def train_step():
    opt.zero_grad(set_to_none=True)
    with precision():
      loss = model(x, t, cond).float().square().mean()
    loss.backward()
    opt.step()

  def forward():
    with torch.no_grad(), precision():
      model(x, t, cond)

  flow = base_config(spec.FAMILY).diffusion.kind == "flow"
  scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else DDIMScheduler(num_train_timesteps=1000)
  both = tuple(torch.cat([c, n]) for c, n in zip(cond, null))  # conditional half, then the unconditional

  def sample():
    scheduler.set_timesteps(args.sample_steps)  # also resets the flow scheduler's step counter
    latents = torch.randn_like(x)
    with torch.no_grad(), precision():
      for step in scheduler.timesteps:
        out = model(torch.cat([latents, latents]), step.expand(2 * args.batch).to(device), both)
        guided, unguided = out[:, :channels].float().chunk(2)  # learned-variance channels go unused
        latents = scheduler.step(unguided + GUIDANCE * (guided - unguided), step, latents).prev_sample

  wait = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  seconds = {name: _timed(fn, repeats=repeats, wait=wait)
             for name, fn, repeats in (("train", train_step, args.steps), ("forward", forward, args.steps),
                                       ("sample", sample, 1))}
  return {"torch_device": device, "torch_train_images_per_s": round(args.batch / seconds["train"], 2),
          "torch_forward_images_per_s": round(args.batch / seconds["forward"], 2),
          "torch_sample_images_per_s": round(args.batch / seconds["sample"], 3),
          **({"torch_train_step_profile": torch_profile(train_step, args.steps)}
             if getattr(args, "profile", False) and device == "cpu" else {})}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--family", default="dit", choices=family.FAMILIES)
  parser.add_argument("--variant", default="S/2", help="a variant of the family's model table (S/2, adm64, ...)")
  parser.add_argument("--resolution", type=int, default=256,
                      help="image size (DiT: the model sees resolution/8 latents; U-Net: pixels)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed train steps")
  parser.add_argument("--sample_steps", type=int, default=10, help="DDIM steps with guidance for the sampling figure")
  parser.add_argument("--profile", action="store_true", help="also time the train step's ops by category "
                      "(jdit.profile: matmul, attention, norm/reduce, elementwise, copy/transpose, scan, optimizer); "
                      "with --torch on CPU, PyTorch's step too (torch.profiler)")
  parser.add_argument("--samplers", default="", help="also time these samplers with guidance: SAMPLER:STEPS,... or "
                      "equal_quality (each sampler at the steps that match DDPM-250 on digits; README table)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--attention_backend", default="auto", choices=ATTENTION_BACKENDS)
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--scan_blocks", action=argparse.BooleanOptionalAction, default=True,
                      help="nn.scan over the blocks (--no-scan_blocks: unrolled)")
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference model on this machine")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--attention", action="store_true", help="benchmark attention backends instead of a model")
  parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1024, 4096, 16384])
  parser.add_argument("--backends", type=lambda s: s.split(","), default=["einsum", "blockwise"])
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--max_memory_gib", type=float, default=16.0)
  parser.add_argument("--vae_decode", action="store_true", help="benchmark one VAE decode instead of a model")
  parser.add_argument("--vae", default="small", choices=("small", *VAE_CONFIGS))
  parser.add_argument("--tile", type=int, default=64, help="--vae_decode: latent pixels per tile, 0 = untiled")
  args = parser.parse_args(argv)
  if args.attention:
    unknown = [b for b in args.backends if b not in ATTENTION_BACKENDS]
    if unknown:
      print(f"error: --backends: unknown {', '.join(unknown)}; expected some of {', '.join(ATTENTION_BACKENDS)}",
            file=sys.stderr)
      return 2
    for row in bench_attention(args):
      print(json.dumps(row) if args.json else " | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return 0
  try:
    row = bench_vae_decode(args) if args.vae_decode else bench_jdit(args)
  except ValueError as e:  # an unknown variant, a resolution the model cannot take, ...
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.torch:
    row.update(bench_torch(args))
    for name in ("train", "forward", "sample"):
      row[f"jdit_vs_torch_{name}"] = round(row[f"{name}_images_per_s"] / row[f"torch_{name}_images_per_s"], 3)
  print_row(row, args.json)
  return 0


def print_row(row: dict, as_json: bool) -> None:
  """The benchmark's figures as JSON or as an aligned table."""
  if as_json:
    print(json.dumps(row, indent=1))
    return
  scalars = {k: v for k, v in row.items() if not k.endswith("train_step_profile")}
  width = max(map(len, scalars))
  print("\n".join(f"{k:>{width}}: {v}" for k, v in scalars.items()))
  for key, who in (("train_step_profile", "jdit"), ("torch_train_step_profile", "PyTorch")):
    if key in row:
      print(f"\n{who} train step by op category:\n" + profile.format_table(row[key]))


if __name__ == "__main__":
  sys.exit(main())
