"""Scores digit samples with a classifier trained on the real digits and their labels.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits               # train (~10 min)
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python tools/eval_digits.py --samples=workdir/digits/samples.npz
prints the fraction of samples the classifier labels as the class they were generated for.
"""
import argparse
import functools
import sys

import numpy as np


@functools.lru_cache(maxsize=1)
def digits_classifier():
  """Logistic regression on all 1,797 real 8x8 digits (pixel values 0..16); ~97% held-out accuracy."""
  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  digits = load_digits()
  return LogisticRegression(max_iter=5000).fit(digits.data, digits.target)


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> float:
  """images (N, 8, 8[, 1]) uint8 0..255 -> fraction predicted as `labels`."""
  features = images.reshape(len(images), 64).astype(np.float64) * (16.0 / 255.0)
  return float((digits_classifier().predict(features) == labels).mean())


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
