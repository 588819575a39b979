"""Quality against steps for each sampler on the digits default: the Frechet distance of class-balanced samples to
the real digits in a fixed feature space (PCA of the 1,797 real 8x8 digits), the steps each sampler needs to come
within --tolerance of DDPM-250, and its images/s there (time to quality, not only time per step).

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits                 # train (make demo)
    python tools/sampler_quality.py --workdir=workdir/digits [--samples=2000] [--json]   # --family=unet for its run
The config is the run's (WORKDIR/config.json: its objective, guidance scale and mode; else configs/digits.py);
every sampler sees the same labels and noise seed. A Frechet distance of finitely many samples has a floor (the
reference itself, resampled, scores > 0): the table prints it as "real digits".
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from jdit.eval import digits as scores

GRID = {"ddpm": (25, 50, 100, 250), "ddim": (5, 10, 15, 20, 25, 50, 100), "dpmpp_2m": (5, 10, 15, 20, 25, 50),
        "dpmpp_2m_sde": (5, 10, 15, 20, 25, 50, 100),
        "euler": (5, 10, 20, 50, 100), "heun": (5, 10, 20, 50)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a digits run (its latest checkpoint is sampled)")
  parser.add_argument("--family", default="dit", choices=("dit", "unet"), help="configs/digits.py or unet_digits.py")
  parser.add_argument("--samples", type=int, default=2000)
  parser.add_argument("--samplers", default="", help="comma-separated (default: all of the model's kind)")
  parser.add_argument("--steps", default="", help="comma-separated step counts (default: a grid per sampler)")
  parser.add_argument("--baseline", default="ddpm:250", help="SAMPLER:STEPS the others are measured against")
  parser.add_argument("--tolerance", type=float, default=0.10, help="relative: 'equal quality' is FD <= (1 + it) "
                      "x the baseline's")
  parser.add_argument("--per_device_batch", type=int, default=0, help="sampling batch per device (default: the "
                      "config's)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)

  import jax

  from jdit import fid_samples, sample
  from jdit import config as config_lib
  from jdit.diffusion import objective
  if os.path.isfile(os.path.join(args.workdir, config_lib.RUN_CONFIG)):  # the run's own config (its objective)
    config = config_lib.of_run(args.workdir)
  else:
    config = config_lib.recipe("digits", args.family)
  if args.per_device_batch:
    config.sample.per_device_batch = args.per_device_batch
  kind = config.diffusion.kind
  known = objective.SAMPLERS[kind]
  names = args.samplers.split(",") if args.samplers else list(known)
  base_name, _, base_steps = args.baseline.partition(":")
  problem = None
  if any(n not in known for n in names):
    problem = f"--samplers={args.samplers}: expected {kind} samplers among {', '.join(known)}"
  elif base_name not in known or not base_steps.isdigit() or int(base_steps) < 1:
    problem = f"--baseline={args.baseline}: expected SAMPLER:STEPS, a {kind} sampler ({', '.join(known)})"
  elif args.steps and not all(n.isdigit() and int(n) >= 1 for n in args.steps.split(",")):
    problem = f"--steps={args.steps}: expected comma-separated integers >= 1"
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  try:
    setup = sample.prepare(config, args.workdir, log=lambda message: print(message, file=sys.stderr))
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if setup.image_shape[:2] != (8, 8):
    print(f"error: --workdir={args.workdir} holds a {setup.image_shape} model, expected the 8x8 digits",
          file=sys.stderr)
    return 2
  real, _ = scores.real_digits()
  project = scores.digit_features()
  reference = project(real)
  labels = fid_samples.balanced_labels(args.samples, sample.class_count(setup.model), config.sample.seed)
  floor_rows = np.random.default_rng(0).choice(len(real), args.samples)
  rows = [{"sampler": "real digits", "steps": 0, "fd": scores.frechet(project(real[floor_rows]), reference),
           "images_per_s": None}]

  def measure(name: str, steps: int) -> dict:
    config.diffusion.update(dict(sampler=name, sampling_steps=steps))
    sampler = sample.make_sampler(config, setup.model)
    run = lambda: sample.generate(sampler, config.sample.per_device_batch, setup.model, setup.params, labels,
                                  setup.mesh, config.sample.seed)
    jax.block_until_ready(run()[:1])  # compile
    start = time.time()
    images = run()
    rate = len(images) / (time.time() - start)
    fd = scores.frechet(project(images.reshape(len(images), 64) / 255.0), reference)
    print(f"{name} {steps} steps: FD {fd:.4f}, {rate:.0f} images/s", file=sys.stderr, flush=True)
    return {"sampler": name, "steps": steps, "fd": fd, "images_per_s": rate}

  baseline = measure(base_name, int(base_steps))
  rows.append(baseline)
  for name in names:
    for steps in (map(int, args.steps.split(",")) if args.steps else GRID[name]):
      if (name, steps) != (base_name, int(base_steps)):
        rows.append(measure(name, steps))
  bound = baseline["fd"] * (1 + args.tolerance)
  equal = {}
  for row in rows[2:]:
    if row["fd"] <= bound and (row["sampler"] not in equal or row["steps"] < equal[row["sampler"]]["steps"]):
      equal[row["sampler"]] = row
  if args.json:
    print(json.dumps({"rows": rows, "equal_quality": equal, "baseline": args.baseline, "bound": bound}, indent=1))
    return 0
  print(f"{'sampler':<14} {'steps':>5} {'FD':>8} {'images/s':>9}")
  for row in rows:
    rate = f"{row['images_per_s']:.0f}" if row["images_per_s"] else "-"
    print(f"{row['sampler']:<14} {row['steps']:>5} {row['fd']:>8.4f} {rate:>9}")
  print(f"\nfewest steps within {100 * args.tolerance:.0f}% of {args.baseline} (FD <= {bound:.4f}):")
  for name in names:
    row = equal.get(name)
    print(f"  {name:<14} " + (f"{row['steps']} steps, {row['images_per_s']:.0f} images/s" if row else "none"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
