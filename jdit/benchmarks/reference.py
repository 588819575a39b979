"""The PyTorch reference of the model benchmark, timed in the same run (tools/bench.py --torch): the family's
reference module (jdit/convert/<family>.py torch_reference) with an AdamW train step, the forward, and guided
sampling, in the same precision; and its train step by op category under torch.profiler."""
import collections
import time

from jdit import convert, profile
from jdit.benchmarks.common import timed
from jdit.benchmarks.model import GUIDANCE, make_model
from jdit.config import base as base_config

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


def bench_torch(options) -> dict:
  """The same model in its PyTorch reference (diffusers' DiTTransformer2DModel or SD3Transformer2DModel,
  guided-diffusion's UNetModel) on this machine (CUDA if present, else CPU), in the same precision (bf16 autocast
  for --dtype=bfloat16): AdamW train step (MSE on the output), forward, and sampling with classifier-free
  guidance (batch doubled, as the pipelines do) for --sample_steps steps: DDIM (Gaussian families) or
  FlowMatchEuler (MM-DiT)."""
  import contextlib

  import torch
  from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

  spec = make_model(options)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  module, model = convert.converter(spec.FAMILY).torch_reference(spec)
  module.to(device)
  channels = spec.in_channels
  x = torch.randn(options.batch, channels, *spec.input_hw, device=device)
  t = torch.randint(0, 1000, (options.batch,), device=device)
  cond, null = _torch_conditioning(spec, options.batch, device)
  opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.0)
  precision = lambda: (torch.autocast(device, dtype=torch.bfloat16) if options.dtype == "bfloat16"
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
    scheduler.set_timesteps(options.sample_steps)  # also resets the flow scheduler's step counter
    latents = torch.randn_like(x)
    with torch.no_grad(), precision():
      for step in scheduler.timesteps:
        out = model(torch.cat([latents, latents]), step.expand(2 * options.batch).to(device), both)
        guided, unguided = out[:, :channels].float().chunk(2)  # learned-variance channels go unused
        latents = scheduler.step(unguided + GUIDANCE * (guided - unguided), step, latents).prev_sample

  wait = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  seconds = {name: timed(fn, repeats=repeats, wait=wait)
             for name, fn, repeats in (("train", train_step, options.steps), ("forward", forward, options.steps),
                                       ("sample", sample, 1))}
  return {"torch_device": device, "torch_train_images_per_s": round(options.batch / seconds["train"], 2),
          "torch_forward_images_per_s": round(options.batch / seconds["forward"], 2),
          "torch_sample_images_per_s": round(options.batch / seconds["sample"], 3),
          **({"torch_train_step_profile": torch_profile(train_step, options.steps)}
             if getattr(options, "profile", False) and device == "cpu" else {})}
