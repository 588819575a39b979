"""Ahead-of-time compilation: the sharded train step (or a text encoder's forward pass) of a config lowered and
compiled on abstract inputs for a mesh you do not have, with the memory XLA reports per device, so OOMs and
sharding mistakes show up before a pod is booked (tools/aot_compile.py is its CLI).

    compile_train_step(config, target_devices("v5p:2x2x1"))   # {"per_device_gib", "temporaries_gib", ...}
"""
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit import sharding, train
from jdit.data.buckets import parse_buckets
from jdit.models import family


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


def saved_activation_bytes(model, per_device_batch: int) -> int:
  """Bytes the forward pass keeps for the backward pass at this batch (the residuals of its vjp, less the
  parameters they reference): what the remat policy changes, computed from shapes, whatever the platform."""
  inputs = model.dummy_inputs(per_device_batch)
  params = family.abstract_params(model)
  forward = lambda p: model.apply({"params": p}, *inputs)
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


def compile_train_step(config, devices) -> dict:
  """Lowers and compiles the sharded train step on abstract inputs (nothing is allocated); returns the figures.
  With data.buckets, for the bucket with the most pixels."""
  run = train.setup(config, devices)
  model, mesh = run.model, run.mesh
  dp = sharding.data_parallel_size(mesh)
  rng = jax.random.key(0)
  batch_sharding = sharding.batch_sharding(mesh)
  bucket = worst_bucket(config, model)
  model = model if bucket is None else model.clone(input_size=bucket)
  batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((config.batch_size, *a.shape[1:]), a.dtype,
                                                      sharding=batch_sharding), model.dummy_batch())
  with run.context():
    state = jax.eval_shape(run.init, rng)  # shapes with their shardings, nothing allocated
    tic = time.perf_counter()
    lowered = run.step.lower(state, batch, rng)
    lower_s = time.perf_counter() - tic
    compiled = lowered.compile()
    compile_s = time.perf_counter() - tic - lower_s
  memory = compiled.memory_analysis()
  gib = lambda n: round(n / 2 ** 30, 3)
  state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state))
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
           + memory.temp_size_in_bytes)
  return {
      "model": model.describe(), **({"bucket": "x".join(map(str, bucket))} if bucket else {}),
      "devices": len(devices), "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape), "global_batch": config.batch_size, "dtype": model.dtype,
      "remat": model.remat, "train_state_gib_total": gib(state_bytes),
      "arguments_gib": gib(memory.argument_size_in_bytes), "outputs_gib": gib(memory.output_size_in_bytes),
      "aliased_gib": gib(memory.alias_size_in_bytes), "temporaries_gib": gib(memory.temp_size_in_bytes),
      "per_device_gib": gib(total),
      "saved_activations_gib": gib(saved_activation_bytes(model, config.batch_size // dp)),
      "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
  }


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


def compile_text_encoder(config, devices, name: str, length: int, dtype: str) -> dict:
  """Lowers and compiles a text encoder's forward pass with parameters sharded by the config's axis rules."""
  from jdit.text import create_text_encoder
  from jdit.text.encode import DEFAULT_MAX_LENGTH, abstract_params
  encoder = create_text_encoder(name, dtype=dtype)
  length = length or DEFAULT_MAX_LENGTH[encoder.KIND]
  mesh, rules = sharding.make_mesh(dict(config.mesh), devices), sharding.rules(config.axis_rules)
  boxed = abstract_params(encoder)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
  ids = jax.ShapeDtypeStruct((config.batch_size, length), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def forward(p, x):
    with nn.logical_axis_rules(rules):
      return encoder.apply({"params": p}, x)

  with jax.set_mesh(mesh):
    tic = time.perf_counter()
    compiled = jax.jit(forward).lower(params, ids).compile()
    compile_s = time.perf_counter() - tic
  memory = compiled.memory_analysis()
  gib = lambda n: round(n / 2 ** 30, 3)
  total_params = sum(a.size for a in jax.tree.leaves(params))
  per_device_params = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                          for a in jax.tree.leaves(params))
  return {
      "text_encoder": name, "parameters": total_params, "devices": len(devices),
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "global_batch": config.batch_size,
      "length": length, "dtype": dtype, "params_gib_total": gib(total_params * 4),
      "params_gib_per_device": gib(per_device_params), "arguments_gib": gib(memory.argument_size_in_bytes),
      "outputs_gib": gib(memory.output_size_in_bytes), "temporaries_gib": gib(memory.temp_size_in_bytes),
      "per_device_gib": gib(memory.argument_size_in_bytes + memory.output_size_in_bytes
                            + memory.temp_size_in_bytes),
      "compile_s": round(compile_s, 1),
  }
