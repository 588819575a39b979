"""Compiles the train step ahead of time for a mesh you do not have, and reports memory per device and whether
it fits, so OOMs and sharding mistakes show up before a pod is booked.

    python tools/aot_compile.py --config=configs/dit_xl.py --devices=8 --device_memory_gib=80 \
        --config.mesh.fsdp=8 --config.mesh.data=1 --config.model.remat=full      # 8 fake CPU devices (8xH100)
    python tools/aot_compile.py --config=configs/dit_xl.py --topology=v5p:4x4x4 --device_memory_gib=95
    python tools/aot_compile.py --config=configs/dit_xl.py --devices=8 --text_encoder=t5-xxl \
        --config.mesh.fsdp=8 --config.mesh.data=1       # a frozen text encoder's forward pass instead
The config and its --config.FIELD overrides are the training run's. --devices=N compiles for N fake CPU devices
(any machine; XLA's CPU memory figures: parameter, optimizer and batch buffers are exact, temporaries follow
the CPU compiler's schedule, which does not show what rematerialization saves on a GPU or TPU;
saved_activations_gib, the activations kept for the backward pass per device, does, on any platform).
--topology compiles for a real TPU slice through jax.experimental.topologies (needs libtpu installed, no TPU).
With --config.data.buckets=SPEC the step is compiled for the bucket with the most pixels (its shape is printed as
"bucket"; every bucket of a table has at most the table's area, so this is the largest of them).
Prints a table; --json prints the same as JSON.
"""
import os
import sys


def _early_devices(argv) -> int:
  """--devices must be set before JAX starts: read it from argv ahead of flag parsing."""
  for arg in argv:
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 0


if __name__ == "__main__" and _early_devices(sys.argv):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_early_devices(sys.argv)}")
  os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jdit import sharding, train  # noqa: E402
from jdit.models import family  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config, as for jdit.main.", lock_config=True)
flags.DEFINE_integer("devices", 0, "Compile for this many fake CPU devices (0: the devices JAX sees).")
flags.DEFINE_string("topology", "", "A TPU topology such as v5p:4x4x4 or v5e:4x4 (needs libtpu).")
flags.DEFINE_float("device_memory_gib", 0.0, "Memory of one device in GiB, to say whether the step fits "
                   "(0: do not judge).")
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("text_encoder", "", "Compile this text encoder's forward pass (a preset: t5-xxl, clip-g, ...) "
                    "on the config's mesh and axis rules, for config.batch_size prompts, instead of the train step.")
flags.DEFINE_integer("text_length", 0, "Prompt length in tokens for --text_encoder (0: 77 for CLIP, 256 for T5).")
flags.DEFINE_string("text_dtype", "bfloat16", "Compute dtype for --text_encoder.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


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
  from jdit.data.buckets import parse_buckets
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


def compile_text_encoder(config, devices, name: str, length: int, dtype: str) -> dict:
  """Lowers and compiles a text encoder's forward pass with parameters sharded by the config's axis rules."""
  import flax.linen as nn
  import jax.numpy as jnp

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


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if FLAGS.text_encoder:
      row = compile_text_encoder(FLAGS.config, target_devices(FLAGS.topology), FLAGS.text_encoder,
                                 FLAGS.text_length, FLAGS.text_dtype)
    else:
      row = compile_train_step(FLAGS.config, target_devices(FLAGS.topology))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  if FLAGS.device_memory_gib:
    row["device_memory_gib"] = FLAGS.device_memory_gib
    row["fits"] = row["per_device_gib"] <= FLAGS.device_memory_gib
  if FLAGS.json:
    print(json.dumps(row, indent=1))
  else:
    print("\n".join(f"{k:>24}: {v}" for k, v in row.items()))
  return 0 if row.get("fits", True) else 3


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
