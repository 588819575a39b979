"""Converts PyTorch weights of any model family (official DiT .pt, diffusers DiT, guided-diffusion U-Net .pt) into a
jdit (Orbax) checkpoint.

    python tools/convert_checkpoint.py --src=DiT-XL-2-256x256.pt --out=checkpoints/dit_xl2_256
    python tools/convert_checkpoint.py --src=path/to/diffusers/DiT-XL-2-256/transformer --out=DIR
    python tools/convert_checkpoint.py --src=256x256_diffusion.pt --out=DIR --override=num_head_channels=64
The family is recognized from the tensors; --override=FIELD=VALUE (repeatable) sets model fields they do not
determine. The output restores with `jdit.convert.load_checkpoint(DIR)` or `jdit.checkpoint.load_pretrained(DIR)`.
"""
import argparse
import ast
import os
import sys

from jdit import checkpoint, flops
from jdit.convert import CheckpointError, load_checkpoint


def parse_override(text: str) -> tuple[str, object]:
  """"FIELD=VALUE" -> (FIELD, the Python literal VALUE, or the string)."""
  field, sep, value = text.partition("=")
  if not sep or not field:
    raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
  try:
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return field, value


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="official .pt, diffusers directory, .safetensors or .bin")
  parser.add_argument("--out", required=True, help="new jdit checkpoint directory (must not exist or be empty)")
  parser.add_argument("--which", default="ema", choices=("ema", "model"),
                      help="entry of an official training checkpoint to convert")
  parser.add_argument("--override", type=parse_override, action="append", default=[], metavar="FIELD=VALUE",
                      help="a model field, e.g. num_heads=16, timestep_freq_shift=1.0, num_head_channels=64")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if os.path.exists(args.out) and os.listdir(args.out):
    print(f"error: --out={args.out} exists and is not empty; choose a new directory", file=sys.stderr)
    return 2
  try:
    model, params = load_checkpoint(args.src, which=args.which, **dict(args.override))
  except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:  # ValueError, TypeError: an --override
    print(f"error: {e}", file=sys.stderr)                                   # field the model does not have
    return 2
  print(f"loaded {args.src}: {model.describe()}, {flops.count_params(params):,} parameters")
  path = checkpoint.save_pretrained(args.out, model, params)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
