"""Scores digit-scenes samples against their prompts: both digits (a classifier trained on the real digits) and
both colors (the nearest of the seven colors) must be right.

    python tools/eval_digit_scenes.py --samples=workdir/digit_scenes/samples.npz
prints the fraction of samples fully right, and the digit and color accuracies per cell.
"""
import argparse
import sys

import numpy as np

from jdit.eval.digits import scene_scores

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--samples", required=True, help="samples.npz of a text model (images and prompts)")
  args = parser.parse_args(argv)
  data = np.load(args.samples)
  if "prompts" not in data or data["images"].shape[1:] != (8, 16, 3):
    print(f"error: --samples={args.samples} must hold prompts and 8x16 RGB images (digit scenes), got "
          f"{data['images'].shape[1:]}", file=sys.stderr)
    return 2
  try:
    result = scene_scores(data["images"], data["prompts"])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(data['images'])} samples: {100 * result['all']:.1f}% fully right (digits "
        f"{100 * result['left_digit']:.1f}% / {100 * result['right_digit']:.1f}%, colors "
        f"{100 * result['left_color']:.1f}% / {100 * result['right_color']:.1f}%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
