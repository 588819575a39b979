"""Converts a PyTorch DiT checkpoint (official .pt or diffusers) into a jdit (Orbax) checkpoint.

    python tools/convert_checkpoint.py --src=DiT-XL-2-256x256.pt --out=checkpoints/dit_xl2_256
    python tools/convert_checkpoint.py --src=path/to/diffusers/DiT-XL-2-256/transformer --out=DIR
The output restores with `jdit.convert.load_dit_checkpoint(DIR)` or `jdit.checkpoint.load_pretrained(DIR)`.
"""
import argparse
import os
import sys

from jdit import checkpoint, flops
from jdit.convert import CheckpointError, load_dit_checkpoint
from jdit.convert.dit import model_summary


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", required=True, help="official .pt, diffusers directory, .safetensors or .bin")
  parser.add_argument("--out", required=True, help="new jdit checkpoint directory (must not exist or be empty)")
  parser.add_argument("--which", default="ema", choices=("ema", "model"),
                      help="entry of an official training checkpoint to convert")
  parser.add_argument("--num_heads", type=int, help="override the number of attention heads")
  parser.add_argument("--timestep_freq_shift", type=float,
                      help="timestep embedding convention: 0 official (default), 1 diffusers")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if os.path.exists(args.out) and os.listdir(args.out):
    print(f"error: --out={args.out} exists and is not empty; choose a new directory", file=sys.stderr)
    return 2
  overrides = {k: v for k, v in (("num_heads", args.num_heads),
                                 ("timestep_freq_shift", args.timestep_freq_shift)) if v is not None}
  try:
    model, params = load_dit_checkpoint(args.src, which=args.which, **overrides)
  except (CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"loaded {args.src}: {model_summary(model)}, {flops.count_params(params):,} parameters")
  path = checkpoint.save_pretrained(args.out, model, params)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
