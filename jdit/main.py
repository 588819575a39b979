"""jdit's main job: train or sample from an ml_collections config.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits [--config.FIELD=VALUE ...]
    python -m jdit.main --config=configs/dit.py:B/2 --workdir=DIR --mode=sample [--config.init_from=PATH]
    python -m jdit.main --config=configs/dit_xl.py --workdir=DIR --mode=fid_samples --config.sample.fid=True
Multi-host: pass --coordinator_address/--num_processes/--process_id (or run on a Cloud TPU pod with
--distributed, where JAX finds them itself).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with an argument: FILE.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "fid_samples"],
                  "train: train (resuming if possible); sample: samples.npz + samples.png; fid_samples: an "
                  "evaluation set (config.sample.fid_samples images) in the ADM .npz layout.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def check_supported(config, mode: str) -> None:
  """FID sample sets are balanced over classes: text-conditioned families (MM-DiT) have none."""
  from jdit.models import family
  from jdit.models.conditioning import text_conditioned
  if mode == "fid_samples" and text_conditioned(family.create(config.model)):
    raise ValueError(f"--mode=fid_samples for model.family={config.model.family!r}: FID sets are class-balanced; "
                     "sample prompts with --mode=sample --config.sample.prompts=FILE")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS["verbosity"].present == 0:
    logging.set_verbosity(logging.WARNING)  # Orbax and clu log every step at INFO; progress lines are ours
  import jax
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from jdit import fid_samples, sample, train
  run = {"train": train.train_and_evaluate, "sample": sample.sample_and_save,
         "fid_samples": fid_samples.write_fid_samples}[FLAGS.mode]
  try:
    check_supported(FLAGS.config, FLAGS.mode)
    run(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
