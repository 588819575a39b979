"""jdit's main job: train or sample from an ml_collections config.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits [--config.FIELD=VALUE ...]
    python -m jdit.main --config=configs/dit.py:B/2 --workdir=DIR --mode=sample [--config.init_from=PATH]
    python -m jdit.main --config=configs/dit_xl.py --workdir=DIR --mode=fid_samples --config.sample.fid=True
    python -m jdit.main --config=configs/digits.py --mode=config      # every field: value and meaning
Multi-host: pass --coordinator_address/--num_processes/--process_id (or run on a Cloud TPU pod with
--distributed, where JAX finds them itself).
Exit status: 0 finished; 1 an error (one line on stderr); 3 stopped on a non-finite loss (earlier checkpoints
kept); 75 preempted by SIGTERM (during training after saving a checkpoint; before or after it, with nothing to
save): run the same command again to resume.
"""
import functools
import os
import re
import signal
import sys


class Stopped(BaseException):
  """SIGTERM outside the training loop (which saves a checkpoint first): nothing to save. A BaseException, like
  KeyboardInterrupt, so that no library's `except Exception` swallows it."""


STOPPED = {  # what SIGTERM outside the training loop leaves, by --mode
    "train": "SIGTERM before training started or after it ended: nothing needed saving",
    "sample": "SIGTERM while sampling: nothing written (samples.npz appears only when complete)",
    "fid_samples": "SIGTERM while writing the FID set: its finished shards are kept",
}


RETRY_S = 1.0  # a Stopped that a callback dropped is raised again this long after


def _stop(*_):
  """SIGTERM (and its retries on SIGALRM): raises Stopped. An exception raised inside a callback (JAX's garbage
  collection callback, a __del__) is printed and dropped, so the raise repeats every RETRY_S until main catches it;
  the training loop takes a pending request over (`_stop.requested`)."""
  _stop.requested = True
  signal.setitimer(signal.ITIMER_REAL, RETRY_S)
  if isinstance(sys.exc_info()[1], Stopped):  # on its way out already (cleaning up): let it finish
    return
  parsed = globals().get("FLAGS")  # SIGTERM may come while this module is still importing
  mode = parsed.mode if parsed is not None and parsed.is_parsed() else "train"
  raise Stopped(f"{STOPPED.get(mode, STOPPED['train'])}; run the same command again to go on")


_stop.requested = False
signal.signal(signal.SIGTERM, _stop)  # first, so that SIGTERM at any moment exits 75; the loop installs its own
signal.signal(signal.SIGALRM, _stop)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

EXIT_ERROR, EXIT_NON_FINITE, EXIT_PREEMPTED = 1, 3, 75

config_flags.DEFINE_config_file("config", None, "Config file, optionally with an argument: FILE.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "fid_samples", "config"],
                  "train: train (resuming if possible); sample: samples.npz + samples.png; fid_samples: an "
                  "evaluation set (config.sample.fid_samples images) in the ADM .npz layout; config: print every "
                  "field of the config (with the --config.FIELD=VALUE overrides) with its value and what it means.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def check_config_file(argv: list[str]) -> None:
  """The --config file loaded once on its own, so that one that does not import, raises, or returns something
  other than a config is one line naming it."""
  value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    return  # parse_flags says so
  from jdit import config
  try:
    config.from_file(path, *([arg] if arg else []))
  except SyntaxError as e:
    reason = f"line {e.lineno}: {e.msg}"
  except Exception as e:  # the file's own code failed: say what it raised, without its traceback
    reason = str(e).removeprefix(f"{path}: ") if isinstance(e, ValueError) else \
        f"get_config() raised {type(e).__name__}: {e}"
  else:
    return
  print(f"error: --config={value}: {reason}", file=sys.stderr)
  sys.exit(EXIT_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a missing config file or an unknown --config.FIELD as one line and exit status 1."""
  try:
    check_config_file(argv)
    rest = FLAGS(argv)
    "seed" in FLAGS.config  # a config file that failed to load raises only when the config is first read
    return rest
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except OSError as e:  # the config file
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    reason = "no such file" if not os.path.isfile(path.split(":")[0]) else str(e).strip().splitlines()[-1].strip()
    print(f"error: --config={path}: {reason} (a config file such as configs/digits.py[:ARG])", file=sys.stderr)
  except (AttributeError, KeyError) as e:  # a locked config refuses a field it does not have
    field = str(e).strip("\"'")
    given = [a.split("=")[0] for a in argv if re.match(rf"--config\.([\w.]+\.)?{re.escape(field)}(=|$)", a)]
    print(f"error: {given[0] if given else field}: unknown config field '{field}'", file=sys.stderr)
  except ValueError as e:  # get_config(ARG) refused its argument
    print(f"error: --config: {e}", file=sys.stderr)
  sys.exit(EXIT_ERROR)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS["verbosity"].present == 0:
    logging.set_verbosity(logging.WARNING)  # Orbax and clu log every step at INFO; progress lines are ours
  if FLAGS.mode == "config":
    from jdit import config_listing
    print(config_listing.listing(FLAGS.config))
    return 0
  if not FLAGS.workdir:
    print(f"error: --workdir is required for --mode={FLAGS.mode} (checkpoints, samples)", file=sys.stderr)
    return EXIT_ERROR
  import jax
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from jdit import fid_samples, sample, train
  given = {name.removeprefix("model."): value
           for name, value in config_flags.get_override_values(FLAGS["config"]).items() if name.startswith("model.")}
  run = {"train": train.train_and_evaluate, "sample": functools.partial(sample.sample_and_save, given=given),
         "fid_samples": functools.partial(fid_samples.write_fid_samples, given=given)}[FLAGS.mode]
  try:
    run(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    return EXIT_PREEMPTED
  except train.NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NON_FINITE
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_ERROR
  return 0


if __name__ == "__main__":
  try:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
  except Stopped as e:
    signal.setitimer(signal.ITIMER_REAL, 0)
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
