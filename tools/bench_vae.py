"""Benchmarks one VAE decode of a random latent with an untrained VAE (--vae: a VAE config, or "small", widths
32-128), tiled (jdit.models.tiling) or not, and reports the device's peak memory where it reports one, else how
much the process grew (resident set high-water mark) over the first call: run one --tile per process to compare.

    python tools/bench_vae.py --vae=small --resolution=1280 --tile=64      # --tile=0: untiled
"""
import argparse
import sys

from jdit.benchmarks.common import print_row
from jdit.benchmarks.vae import bench_vae_decode
from jdit.models.vae import VAE_CONFIGS


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--vae", default="small", choices=("small", *VAE_CONFIGS))
  parser.add_argument("--resolution", type=int, default=256, help="image size: latents are resolution / 8")
  parser.add_argument("--tile", type=int, default=64, help="latent pixels per tile, 0 = untiled")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  try:
    row = bench_vae_decode(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print_row(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
