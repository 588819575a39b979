"""Scores digit-scenes samples against their prompts: both digits (a classifier trained on the real digits) and
both colors (the nearest of the seven colors) must be right.

    python tools/eval_digit_scenes.py --samples=workdir/digit_scenes/samples.npz
prints the fraction of samples fully right, and the digit and color accuracies per cell.
"""
import argparse
import sys

import numpy as np
from eval_digits import digits_classifier

from jdit.data import digit_scenes

COLOR_NAMES = list(digit_scenes.COLORS)
COLOR_TABLE = np.asarray([digit_scenes.COLORS[c] for c in COLOR_NAMES], np.float64)  # (7, 3)


def read_cell(cell: np.ndarray) -> tuple[int, str]:
  """(digit, color) of one (8, 8, 3) uint8 cell: the intensity (the brightest channel, 0..16) goes to the digits
  classifier; the ink's intensity-weighted mean color, scaled to a maximum of 1, to the nearest of the colors."""
  rgb = cell.reshape(64, 3).astype(np.float64) / 255.0
  intensity = rgb.max(axis=1)
  ink = (rgb * intensity[:, None]).sum(axis=0) / max(intensity.sum(), 1e-9)
  ink = ink / max(ink.max(), 1e-9)
  color = COLOR_NAMES[int(np.argmin(np.linalg.norm(COLOR_TABLE - ink, axis=1)))]
  return int(digits_classifier().predict(intensity.reshape(1, 64) * 16.0)[0]), color


def score(images: np.ndarray, prompts) -> dict:
  """Fractions of samples with everything right, and per left/right digit and color."""
  hits = {"all": [], "left_digit": [], "right_digit": [], "left_color": [], "right_color": []}
  for image, prompt in zip(images, prompts):
    left, right, left_color, right_color = digit_scenes.parse_caption(str(prompt))
    (got_left, got_left_color), (got_right, got_right_color) = read_cell(image[:, :8]), read_cell(image[:, 8:])
    checks = {"left_digit": got_left == left, "right_digit": got_right == right,
              "left_color": got_left_color == left_color, "right_color": got_right_color == right_color}
    for key, ok in checks.items():
      hits[key].append(ok)
    hits["all"].append(all(checks.values()))
  return {key: float(np.mean(values)) for key, values in hits.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--samples", required=True, help="samples.npz of a text model (images and prompts)")
  args = parser.parse_args(argv)
  data = np.load(args.samples)
  if "prompts" not in data or data["images"].shape[1:] != (8, 16, 3):
    print(f"error: --samples={args.samples} must hold prompts and 8x16 RGB images (digit scenes), got "
          f"{data['images'].shape[1:]}", file=sys.stderr)
    return 2
  try:
    result = score(data["images"], data["prompts"])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(data['images'])} samples: {100 * result['all']:.1f}% fully right (digits "
        f"{100 * result['left_digit']:.1f}% / {100 * result['right_digit']:.1f}%, colors "
        f"{100 * result['left_color']:.1f}% / {100 * result['right_color']:.1f}%)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
