"""Scores digit samples with a classifier trained on the real digits and their labels.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits               # train (~10 min)
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python tools/eval_digits.py --samples=workdir/digits/samples.npz
prints the fraction of samples the classifier labels as the class they were generated for, and the samples'
Frechet distance to the real digits in a 16-component PCA space of them: the sample -> evaluate path offline,
with no download (not FID, which needs the Inception weights: docs/evaluation.md).
"""
import argparse
import sys

import numpy as np

from jdit.eval.digits import class_accuracy, frechet_to_real


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
  print(f"{len(data['labels'])} samples: {100 * accuracy:.1f}% classified as the requested digit; Frechet distance "
        f"to the real digits in their PCA space {frechet_to_real(data['images']):.4f} (a digits-only measure, not "
        "FID; the real digits resampled score ~0.01)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
