"""Scores digit samples with a classifier trained on the real digits and their labels.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits               # train (~10 min)
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python tools/eval_digits.py --samples=workdir/digits/samples.npz
prints the fraction of samples the classifier labels as the class they were generated for.
"""
import argparse
import sys

import numpy as np

from jdit.eval.digits import class_accuracy


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--samples", required=True, help="samples.npz written by --mode=sample")
  args = parser.parse_args(argv)
  data = np.load(args.samples)
  if data["images"].shape[1:3] != (8, 8):
    print(f"error: --samples={args.samples} holds {data['images'].shape[1:3]} images, expected 8x8 digits",
          file=sys.stderr)
    return 2
  accuracy = class_accuracy(data["images"], data["labels"])
  print(f"{len(data['labels'])} samples: {100 * accuracy:.1f}% classified as the requested digit")
  return 0


if __name__ == "__main__":
  sys.exit(main())
