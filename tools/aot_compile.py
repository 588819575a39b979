"""Compiles the train step ahead of time for a mesh you do not have, and reports memory per device and whether
it fits, so OOMs and sharding mistakes show up before a pod is booked.

    python tools/aot_compile.py --config=configs/dit_xl.py --devices=8 --device_memory_gib=80 \
        --config.mesh.fsdp=8 --config.mesh.data=1 --config.model.remat=full      # 8 fake CPU devices (8xH100)
    python tools/aot_compile.py --config=configs/dit_xl.py --topology=v5p:4x4x4 --device_memory_gib=95
    python tools/aot_compile.py --config=configs/dit_xl.py --topology=v5p:2x2x1 --estimate   # TPU step estimate
    python tools/aot_compile.py --config=configs/flux.py --topology=v5p:2x2x2 --device_memory_gib=95 --max_batch
    python tools/aot_compile.py --config=configs/dit_xl.py --devices=8 --text_encoder=t5-xxl \
        --config.mesh.fsdp=8 --config.mesh.data=1       # a frozen text encoder's forward pass instead
The config and its --config.FIELD overrides are the training run's. --devices=N compiles for N fake CPU devices
(any machine; XLA's CPU memory figures: parameter, optimizer and batch buffers are exact, temporaries follow
the CPU compiler's schedule, which does not show what rematerialization saves on a GPU or TPU;
saved_activations_gib, the activations kept for the backward pass per device, does, on any platform).
--topology compiles for a real TPU slice through jax.experimental.topologies (needs libtpu installed, no TPU).
With --config.data.buckets=SPEC the step is compiled for the bucket with the most pixels (its shape is printed as
"bucket"; every bucket of a table has at most the table's area, so this is the largest of them).
--max_batch searches the largest global batch that fits --device_memory_gib. --estimate adds XLA's cost model of
the step per device (FLOPs, HBM bytes, libtpu's optimal_seconds, the roofline against the chip's peak FLOP/s and
bandwidth, and the MFU they imply): compiler estimates, not measurements; a model that scans its blocks is
compiled again unrolled for them, since the cost of a loop counts its body once. Prints a table; --json prints
the same as JSON.
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

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jdit.aot import (compile_text_encoder, compile_train_step, largest_batch, out_of_memory,  # noqa: E402
                      target_devices)

config_flags.DEFINE_config_file("config", None, "Training config, as for jdit.main.", lock_config=True)
flags.DEFINE_integer("devices", 0, "Compile for this many fake CPU devices (0: the devices JAX sees).")
flags.DEFINE_string("topology", "", "A TPU topology such as v5p:4x4x4 or v5e:4x4 (needs libtpu).")
flags.DEFINE_float("device_memory_gib", 0.0, "Memory of one device in GiB, to say whether the step fits "
                   "(0: do not judge).")
flags.DEFINE_bool("max_batch", False, "Search the largest global batch whose step fits --device_memory_gib "
                  "(doubling, then bisecting; one compile per probe) and report its figures.")
flags.DEFINE_bool("estimate", False, "Add XLA's cost model of the step per device: FLOPs, HBM bytes, "
                  "optimal_seconds (libtpu), the roofline and the MFU they imply (compiler estimates; a model that "
                  "scans its blocks is compiled a second time unrolled for them).")
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("text_encoder", "", "Compile this text encoder's forward pass (a preset: t5-xxl, clip-g, ...) "
                    "on the config's mesh and axis rules, for config.batch_size prompts, instead of the train step.")
flags.DEFINE_integer("text_length", 0, "Prompt length in tokens for --text_encoder (0: 77 for CLIP, 256 for T5).")
flags.DEFINE_string("text_dtype", "bfloat16", "Compute dtype for --text_encoder.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    if FLAGS.text_encoder:
      row = compile_text_encoder(FLAGS.config, target_devices(FLAGS.topology), FLAGS.text_encoder,
                                 FLAGS.text_length, FLAGS.text_dtype, FLAGS.estimate)
    elif FLAGS.max_batch:
      if not FLAGS.device_memory_gib:
        raise ValueError("--max_batch needs --device_memory_gib, the memory one device has")
      row = largest_batch(FLAGS.config, target_devices(FLAGS.topology), FLAGS.device_memory_gib,
                          log=lambda line: print(line, flush=True))
    else:
      row = compile_train_step(FLAGS.config, target_devices(FLAGS.topology), FLAGS.estimate)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  except jax.errors.JaxRuntimeError as e:  # a TPU compile fails outright when the step does not fit
    if not out_of_memory(e):
      raise
    print(f"does not fit: {str(e).splitlines()[0]}", flush=True)
    return 3
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
