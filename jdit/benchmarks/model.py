"""The model benchmark (tools/bench.py): one model of a family's table at a resolution and batch: train-step time,
compile time, forward and guided sampling throughput, memory and MFU. `options` carries tools/bench.py's flags
(family, variant, resolution, batch, steps, sample_steps, dtype, attention_backend, remat, scan_blocks,
samplers, profile)."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdit import flops, profile, sharding, train
from jdit.benchmarks.common import device_peak_flops, timed
from jdit.config import base as base_config
from jdit.diffusion import objective
from jdit.models import family

GUIDANCE = 4.0  # classifier-free guidance scale of the sampling figures (jdit and PyTorch)
EQUAL_QUALITY = {  # --samplers=equal_quality: Gaussian, the README's digits table (within 10% of DDPM-250's FD);
    # flow, the step counts at which tests/diffusion_toy_test.py's samplers match the mixture's class statistics
    "gaussian": "ddpm:250,ddim:50,dpmpp_2m:10,dpmpp_2m_sde:20",
    "flow": "euler:100,heun:25,dpmpp_2m:10,dpmpp_2m_sde:20"}
def make_model(options):
  """The named model at --resolution with the benchmark's options (those its family has)."""
  model = family.get(options.family).table_model(options.variant, options.resolution)
  options = dict(dtype=options.dtype, attention_backend=options.attention_backend, remat=options.remat,
                 scan_blocks=options.scan_blocks,
                 class_dropout_prob=max(getattr(model, "class_dropout_prob", 0.0), 0.1))  # a null class: guidance
  return model.clone(**{k: v for k, v in options.items() if hasattr(model, k)})


def forward_macs(options) -> int:
  """Multiply-adds of one image's forward pass, counted as the model table counts them."""
  return flops.model_stats(make_model(options))["macs"]


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


def bench_model(options) -> dict:
  model = make_model(options)
  config = base_config(model.FAMILY)  # the paper recipe: AdamW lr 1e-4, learned-sigma Gaussian diffusion, EMA
  sampler = "ddim" if config.diffusion.kind == "gaussian" else config.diffusion.sampler  # flow (MM-DiT): euler
  config.diffusion.update(dict(sampling_steps=options.sample_steps, sampler=sampler, guidance_scale=GUIDANCE))
  to_time = samplers_to_time(options.samplers, config.diffusion.kind)
  config.update(dict(batch_size=options.batch, mesh={"data": -1, "fsdp": 1, "tensor": 1}))
  run = train.setup(config, model=model)
  model, mesh = run.model, run.mesh
  batch = {k: np.asarray(v) for k, v in model.dummy_batch(options.batch).items()}
  batch["image"] = np.random.randn(*batch["image"].shape).astype(np.float32)
  if "label" in batch:
    batch["label"] = np.arange(options.batch, dtype=np.int32) % model.num_classes
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

    step_s = timed(train_once, repeats=options.steps)
    if options.profile:
      step_profile = profile.profile(compiled.as_text(), train_once, repeats=options.steps)
    cond = model.condition(batch)
    for key, null in getattr(model, "null_keys", {}).items():  # text families: the empty prompt for guidance
      cond[null] = jnp.zeros_like(cond[key])
    sampling_s = lambda diffusion: timed(jax.jit(objective.make_sample_fn(model, diffusion)), state.ema_params,
                                          batch["image"], cond, rng, repeats=1)
    sample_s = sampling_s(config.diffusion)
    per_sampler = {}
    for name, steps in to_time:
      diffusion = config.diffusion.copy_and_resolve_references()
      diffusion.update(dict(sampler=name, sampling_steps=steps))
      per_sampler[f"{name}:{steps}"] = round(options.batch / sampling_s(diffusion), 3)
    t = jnp.full((options.batch,), 500.0)
    forward = jax.jit(lambda p, x: family.apply(model, p, x, t, cond))
    forward_s = timed(forward, state.ema_params, batch["image"], repeats=options.steps)
  macs = forward_macs(options)
  peak, peak_source = device_peak_flops(options.dtype)
  train_flops = 3 * 2 * macs * options.batch
  stats = jax.devices()[0].memory_stats() or {}
  peak_bytes = stats.get("peak_bytes_in_use") or (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                                   + memory.output_size_in_bytes)
  return {
      "model": model.describe(), "resolution": options.resolution, "batch": options.batch, "dtype": options.dtype,
      "attention_backend": options.attention_backend, "remat": options.remat, "scan_blocks": options.scan_blocks,
      "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # hugetlb=1: big buffers on huge pages (README)
      "gmacs_per_image": round(macs / 1e9, 4), "compile_s": round(compile_s, 2), "step_s": round(step_s, 4),
      "train_images_per_s": round(options.batch / step_s, 2),
      "forward_images_per_s": round(options.batch / forward_s, 2),
      "sample_images_per_s": round(options.batch / sample_s, 3), "sample_steps": options.sample_steps,
      **({"sampler_images_per_s": per_sampler} if per_sampler else {}),
      **({"train_step_profile": step_profile} if options.profile else {}),
      "peak_memory_gb": round(peak_bytes / 2 ** 30, 3),
      "mfu": round(train_flops / step_s / (peak * jax.device_count()), 4), "peak_source": peak_source,
  }
