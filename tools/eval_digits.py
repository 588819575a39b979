"""Scores digit samples with a classifier trained on the real digits and their labels.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits               # train (~10 min)
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python tools/eval_digits.py --samples=workdir/digits/samples.npz
    python tools/eval_digits.py --samples=workdir/digits_lora/samples.npz --rotate=180   # the LoRA demo's
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
  parser.add_argument("--rotate", type=int, default=0, choices=(0, 90, 180, 270),
                      help="degrees the samples are turned by (data.rotate of the run): turned back before scoring")
  args = parser.parse_args(argv)
  try:
    data = np.load(args.samples)
    images, labels = data["images"], data["labels"]
  except (OSError, ValueError, KeyError) as e:  # missing, not an npz, object arrays, a key absent
    print(f"error: --samples={args.samples}: not a samples.npz of --mode=sample with images and labels ({e})",
          file=sys.stderr)
    return 2
  if images.dtype != np.uint8 or images.shape[1:] not in ((8, 8), (8, 8, 1)) or labels.shape != images.shape[:1]:
    print(f"error: --samples={args.samples} holds {images.dtype} images of shape {images.shape[1:]} and "
          f"{labels.shape[0] if labels.ndim else 0} labels, expected uint8 8x8 gray digits with one label each",
          file=sys.stderr)
    return 2
  images = np.rot90(images, -args.rotate // 90, axes=(1, 2))  # turned back upright
  accuracy = class_accuracy(images, labels)
  turned = f" (turned back by {args.rotate} degrees)" if args.rotate else ""
  print(f"{len(labels)} samples{turned}: {100 * accuracy:.1f}% classified as the requested digit; Frechet "
        f"distance to the real digits in their PCA space {frechet_to_real(images):.4f} (a digits-only measure, not "
        "FID; the real digits resampled score ~0.01)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
