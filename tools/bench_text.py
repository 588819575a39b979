"""Benchmarks a text encoder's forward pass: prompts/s, compile time, memory, MFU, and optionally transformers'
PyTorch model of the same architecture side by side (same run, same machine).

    python tools/bench_text.py --encoder=t5-xxl --batch=64 --length=256 --dtype=bfloat16     # on a GPU / TPU
    python tools/bench_text.py --encoder=clip-l --batch=16 --torch                            # vs transformers
--layers=N keeps the preset's width with fewer layers (quick CPU runs of the large encoders). Random weights:
throughput does not depend on them. MFU = 2 x the traced multiply-adds x prompts/s / device peak.
"""
import argparse
import sys

from jdit.benchmarks.common import print_row
from jdit.benchmarks.text import bench_text_encoder, bench_text_torch
from jdit.text import CLIP_PRESETS, T5_PRESETS


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--encoder", default="clip-l", choices=(*CLIP_PRESETS, *T5_PRESETS))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=0, help="tokens per prompt (0: 77 for CLIP, 256 for T5)")
  parser.add_argument("--layers", type=int, default=0, help="fewer layers than the preset (0: the preset's)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch", action="store_true", help="also time transformers' model on this machine (fp32)")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  args.length = args.length or (77 if args.encoder in CLIP_PRESETS else 256)
  if args.encoder in CLIP_PRESETS and args.length > 77:
    print(f"error: --length={args.length}: CLIP encoders take at most 77 tokens", file=sys.stderr)
    return 2
  row = bench_text_encoder(args)
  if args.torch:
    row.update(bench_text_torch(args))
    row["jdit_vs_torch"] = round(row["prompts_per_s"] / row["torch_prompts_per_s"], 3)
  print_row(row, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
