"""Benchmarks attention backends: one attention layer's forward and backward pass per backend and token count,
with its memory: the device's peak where it reports one, else XLA's compiled estimate (arguments + outputs +
temporaries); a backend whose estimate exceeds --max_memory_gib is compiled but not run.

    python tools/bench_attention.py --tokens=1024,4096,16384 --heads=16 --head_dim=64 --batch=1 --steps=1
Prints a line per (tokens, backend); --json prints JSON lines.
"""
import argparse
import json
import sys

from jdit.benchmarks.attention import bench_attention
from jdit.nn.attention import ATTENTION_BACKENDS


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1024, 4096, 16384])
  parser.add_argument("--backends", type=lambda s: s.split(","), default=["einsum", "blockwise"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=64)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--steps", type=int, default=5, help="timed repeats")
  parser.add_argument("--max_memory_gib", type=float, default=16.0)
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args(argv)
  unknown = [b for b in args.backends if b not in ATTENTION_BACKENDS]
  if unknown:
    print(f"error: --backends: unknown {', '.join(unknown)}; expected some of {', '.join(ATTENTION_BACKENDS)}",
          file=sys.stderr)
    return 2
  for row in bench_attention(args):
    print(json.dumps(row) if args.json else " | ".join(f"{k} {v}" for k, v in row.items()), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
