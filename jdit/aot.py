"""Ahead-of-time compilation: the sharded train step (or a text encoder's forward pass) of a config lowered and
compiled on abstract inputs for a mesh you do not have, with the memory XLA reports per device, so OOMs and
sharding mistakes show up before a pod is booked (tools/aot_compile.py is its CLI). The program is traced for the
target's platform (jdit.nn.platform): a TPU topology compiled from a CPU host gets the TPU's layers.

    compile_train_step(config, target_devices("v5p:2x2x1"))   # {"per_device_gib", "temporaries_gib", ...}
"""
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit import flops, sharding, train
from jdit.benchmarks import common
from jdit.data.buckets import parse_buckets
from jdit.models import family
from jdit.nn import platform


def target_devices(topology: str) -> list:
  if not topology:
    return jax.devices()
  from jax.experimental import topologies
  megacore = topology.split(":")[0] in ("v4", "v5p")  # one device per chip (two cores as one)
  try:
    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        chip_config_name="megacore" if megacore else "default").devices
  except Exception as e:  # no libtpu / unknown topology: say what is needed
    raise ValueError(f"--topology={topology}: cannot describe it here ({type(e).__name__}: {e}); it needs libtpu "
                     "(pip install 'jax[tpu]'); use --devices=N to compile for N fake CPU devices") from None


def saved_activation_bytes(model, per_device_batch: int, target: str = "") -> int:
  """Bytes the forward pass keeps for the backward pass at this batch (the residuals of its vjp, less the
  parameters they reference): what the remat policy changes, computed from shapes for the `target` platform
  (default: this host's)."""
  inputs = model.dummy_inputs(per_device_batch)
  params = family.abstract_params(model)
  forward = lambda p: model.apply({"params": p}, *inputs)
  with platform.targeting(target or platform.target()):
    residuals = jax.eval_shape(lambda p: jax.vjp(forward, p)[1], params)
  nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
  return max(nbytes(residuals) - nbytes(params), 0)


def worst_bucket(config, model) -> tuple[int, int] | None:
  """The model-input (H, W) of the data.buckets shape with the most pixels (the most tokens: the most memory),
  None without buckets; bucket sides are in pixels, data.image_size / the model's input side per model pixel."""
  if not config.data.buckets:
    return None
  factor = max(1, config.data.image_size // model.input_hw[0])
  height, width = max(parse_buckets(config.data.buckets), key=lambda s: (s[0] * s[1], s))
  return height // factor, width // factor


def _compiled_train_step(config, devices):
  """(run, model, bucket, abstract state, compiled step, lower_s, compile_s) of config's train step."""
  run = train.setup(config, devices)
  model, mesh = run.model, run.mesh
  bucket = worst_bucket(config, model)
  model = model if bucket is None else model.clone(input_size=bucket)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((config.batch_size, *a.shape[1:]), a.dtype,
                                                      sharding=sharding.batch_sharding(mesh)), model.dummy_batch())
  rng = jax.random.key(0)
  with run.context(), platform.targeting(devices[0].platform):  # the target's layers, not this host's
    state = jax.eval_shape(run.init, rng)  # shapes with their shardings, nothing allocated
    tic = time.perf_counter()
    lowered = run.step.lower(state, batch, rng)
    lower_s = time.perf_counter() - tic
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tic - lower_s
  return run, model, bucket, state, compiled, lower_s, compile_s


def compile_train_step(config, devices, estimate: bool = False) -> dict:
  """Lowers and compiles the sharded train step on abstract inputs (nothing is allocated); returns the figures.
  With data.buckets, for the bucket with the most pixels. estimate=True adds XLA's cost model of the step
  (cost_estimate), from the step compiled with its blocks unrolled when the model scans them (the cost of a
  scanned program counts its loop body once)."""
  run, model, bucket, state, compiled, lower_s, compile_s = _compiled_train_step(config, devices)
  mesh, dp = run.mesh, sharding.data_parallel_size(run.mesh)
  memory = compiled.memory_analysis()
  gib = lambda n: round(n / 2 ** 30, 3)
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
           + memory.temp_size_in_bytes)
  row = {
      "model": model.describe(), **({"bucket": "x".join(map(str, bucket))} if bucket else {}),
      "devices": len(devices), "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape), "global_batch": config.batch_size, "dtype": model.dtype,
      "remat": model.remat, "train_state_gib_total": gib(state_bytes),
      "arguments_gib": gib(memory.argument_size_in_bytes), "outputs_gib": gib(memory.output_size_in_bytes),
      "aliased_gib": gib(memory.alias_size_in_bytes), "temporaries_gib": gib(memory.temp_size_in_bytes),
      "per_device_gib": gib(total),
      "saved_activations_gib": gib(saved_activation_bytes(model, config.batch_size // dp, devices[0].platform)),
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
  }
  if not estimate:
    return row
  model_flops = 3 * 2 * flops.model_stats(model)["macs"] * config.batch_size / len(devices)  # forward + backward
  if not getattr(model, "scan_blocks", False):
    return {**row, "estimate_from": "the step as compiled (no scanned blocks)",
            **cost_estimate(compiled, model_flops, devices[0].device_kind)}
  scanned_tflops = cost_estimate(compiled, model_flops, "")["xla_tflops"]  # one iteration of each loop
  unrolled = config.copy_and_resolve_references()
  unrolled.unlock()
  unrolled.model.scan_blocks = False
  return {**row, "estimate_from": "the step with its blocks unrolled", "scanned_xla_tflops": scanned_tflops,
          **cost_estimate(_compiled_train_step(unrolled, devices)[4], model_flops, devices[0].device_kind)}


def cost_estimate(compiled, model_flops: float, device_kind: str) -> dict:
  """XLA's cost model of a compiled program, per device: its FLOPs ("xla_tflops"), the bytes it moves to and from
  device memory ("hbm_gb"), their ratio and, where the compiler fills it in (libtpu), "optimal_seconds". For a
  device in the peak tables also the roofline (FLOPs / peak, bytes / bandwidth; which of the two bounds the
  step), the estimated step time (optimal_seconds, else the roofline's bound) and the MFU it implies: model_flops
  (the model's own matmul FLOPs per device) / step time / peak. Compiler estimates, not measurements."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops_, nbytes, optimal = (float(cost.get(k, d)) for k, d in (("flops", 0), ("bytes accessed", 0),
                                                               ("optimal_seconds", -1)))
  figure = lambda x: float(f"{x:.4g}")  # noqa: E731  (four significant digits)
  row = {"xla_tflops": figure(flops_ / 1e12), "model_tflops": figure(model_flops / 1e12),
         "hbm_gb": figure(nbytes / 1e9), "flops_per_byte": figure(flops_ / max(nbytes, 1.0))}
  if optimal > 0:
    row["optimal_seconds"] = figure(optimal)
  peaks = common.table_peaks(device_kind)
  if peaks is None:
    return row
  compute_s, memory_s = flops_ / peaks[0], nbytes / peaks[1]
  step_s = optimal if optimal > 0 else max(compute_s, memory_s)
  return {**row, "roofline_compute_ms": figure(compute_s * 1e3), "roofline_memory_ms": figure(memory_s * 1e3),
          "bound": "memory" if memory_s > compute_s else "compute", "estimated_step_s": figure(step_s),
          "estimated_mfu": round(model_flops / step_s / peaks[0], 3)}


def largest_batch(config, devices, memory_gib: float, log=print) -> dict:
  """The largest global batch (a multiple of the data-parallel size) whose compiled train step fits `memory_gib`
  per device: doubling from config.batch_size's per-device share, then bisecting; each probe is one compile.
  Returns the figures of that batch (compile_train_step's) or, when even one example per device does not fit,
  those of the smallest probe with "largest_batch" 0."""
  dp = sharding.data_parallel_size(sharding.make_mesh(dict(config.mesh), devices))

  def probe(per_device: int) -> dict | None:
    """The figures of this per-device batch when it fits, else None (a TPU compile itself fails when it does not
    fit the chip's HBM)."""
    trial = config.copy_and_resolve_references()
    trial.unlock()
    trial.batch_size = per_device * dp
    try:
      row = compile_train_step(trial, devices)
    except jax.errors.JaxRuntimeError as e:
      if not out_of_memory(e):
        raise
      log(f"global batch {trial.batch_size}: does not fit (the compiler ran out of device memory)")
      return None
    log(f"global batch {trial.batch_size}: {row['per_device_gib']} GiB per device")
    return row if row["per_device_gib"] <= memory_gib else None

  low, high, best = 0, max(1, config.batch_size // dp), None
  while (row := probe(high)) is not None:  # grow until a probe does not fit
    low, best, high = high, row, high * 2
  while high - low > 1:
    middle = (low + high) // 2
    row = probe(middle)
    low, high, best = (middle, high, row) if row is not None else (low, middle, best)
  return {**(best or {}), "largest_batch": low * dp}


def out_of_memory(error: Exception) -> bool:
  """Whether a compile failed because the step does not fit the device's memory."""
  return "RESOURCE_EXHAUSTED" in str(error)


def compile_text_encoder(config, devices, name: str, length: int, dtype: str, estimate: bool = False) -> dict:
  """Lowers and compiles a text encoder's forward pass with parameters sharded by the config's axis rules;
  estimate=True adds XLA's cost model of the pass (cost_estimate; its layers unrolled)."""
  from jdit.text import create_text_encoder
  from jdit.text.encode import DEFAULT_MAX_LENGTH, abstract_params
  encoder = create_text_encoder(name, dtype=dtype)
  length = length or DEFAULT_MAX_LENGTH[encoder.KIND]
  mesh, rules = sharding.make_mesh(dict(config.mesh), devices), sharding.rules(config.axis_rules)
  ids = jax.ShapeDtypeStruct((config.batch_size, length), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def compiled_forward(module):
    """(compiled forward pass, the function, its abstract sharded parameters) of an encoder."""
    boxed = abstract_params(module)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                          shardings)

    def forward(p, x):
      with nn.logical_axis_rules(rules):
        return module.apply({"params": p}, x)

    with jax.set_mesh(mesh), platform.targeting(devices[0].platform):
      return jax.jit(forward).lower(params, ids).compile(), forward, params

  tic = time.perf_counter()
  compiled, forward, params = compiled_forward(encoder)
  compile_s = time.perf_counter() - tic
  memory = compiled.memory_analysis()
  gib = lambda n: round(n / 2 ** 30, 3)
  total_params = sum(a.size for a in jax.tree.leaves(params))
  per_device_params = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                          for a in jax.tree.leaves(params))
  row = {
      "text_encoder": name, "parameters": total_params, "devices": len(devices),
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "global_batch": config.batch_size,
      "length": length, "dtype": dtype, "params_gib_total": gib(total_params * 4),
      "params_gib_per_device": gib(per_device_params), "arguments_gib": gib(memory.argument_size_in_bytes),
      "outputs_gib": gib(memory.output_size_in_bytes), "temporaries_gib": gib(memory.temp_size_in_bytes),
      "per_device_gib": gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            + memory.temp_size_in_bytes),
      "compile_s": round(compile_s, 1),
  }
  if not estimate:
    return row
  unrolled = compiled_forward(encoder.clone(scan_layers=False))[0] if encoder.scan_layers else compiled
  with jax.set_mesh(mesh), platform.targeting(devices[0].platform):
    model_flops = 2 * flops.count_macs(forward, params, ids) / len(devices)
  return {**row, "estimate_from": "the pass with its layers unrolled" if encoder.scan_layers else "the pass",
          **cost_estimate(unrolled, model_flops, devices[0].device_kind)}
