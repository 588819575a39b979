"""LoRA adapter files: what one holds, merging adapters into a full checkpoint, and extracting an adapter from two
checkpoints (jdit.lora).

    python tools/lora.py info adapter.safetensors
    python tools/lora.py merge --base=/models/FLUX.1-dev --lora=style.safetensors:0.8 --lora=face.safetensors \\
        --out=checkpoints/flux_merged
    python tools/lora.py extract --base=/models/FLUX.1-dev --tuned=workdir/flux_finetune --rank=16 \\
        --out=finetune_r16.safetensors
    python tools/lora.py export workdir/digits_lora --out=upside_down.safetensors   # a LoRA run's EMA adapters
Files are diffusers / PEFT safetensors (MM-DiT, Flux) or jdit's own module paths (DiT, U-Net); --base and --tuned
are anything jdit.convert.load_checkpoint reads (jdit checkpoints, PyTorch weights, pipeline directories); the
merged checkpoint restores with load_checkpoint(DIR). extract takes the truncated SVD of each targeted kernel's
difference (--targets: regular expressions; the family's defaults otherwise), alpha = rank.
"""
import argparse
import json
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  info = commands.add_parser("info", help="an adapter file's targets, rank, alpha and size")
  info.add_argument("path")
  merge = commands.add_parser("merge", help="merge adapters into a base and write a jdit checkpoint")
  merge.add_argument("--base", required=True)
  merge.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]", help="repeatable, in order")
  merge.add_argument("--out", required=True, help="new jdit checkpoint directory (must not exist or be empty)")
  extract = commands.add_parser("extract", help="a rank-r adapter from the difference of two checkpoints")
  extract.add_argument("--base", required=True)
  extract.add_argument("--tuned", required=True)
  extract.add_argument("--rank", type=int, required=True)
  extract.add_argument("--targets", action="append", default=[], help="a parameter-path pattern (repeatable)")
  extract.add_argument("--out", required=True, help="the adapter .safetensors to write")
  export = commands.add_parser("export", help="the newest EMA adapters of a LoRA training run")
  export.add_argument("workdir", help="the run's workdir (or its checkpoints/ directory)")
  export.add_argument("--out", required=True, help="the adapter .safetensors to write")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  from jdit import checkpoint, lora
  from jdit.convert import CheckpointError, load_checkpoint
  try:
    if args.command == "info":
      print(json.dumps(lora.describe_file(args.path), indent=1))
      return 0
    if args.command == "export":
      from jdit import lora_base
      found = checkpoint.locate(args.workdir)
      if found is None:
        raise FileNotFoundError(f"{args.workdir}: no jdit checkpoint ({checkpoint.JDIT_FORMS})")
      record = lora_base.export(found[0], args.out)
      print(f"wrote {args.out}: rank {record['rank']}, alpha {record['alpha']:g}, base {record['base']}")
      return 0
    if args.command == "merge":
      if os.path.exists(args.out) and os.listdir(args.out):
        raise ValueError(f"--out={args.out} exists and is not empty; choose a new directory")
      loras = lora.parse_loras(",".join(args.lora))
      model, params = load_checkpoint(args.base)
      print(f"wrote {checkpoint.save_pretrained(args.out, model, lora.stack(model, params, loras))}")
      return 0
    model, base = load_checkpoint(args.base)
    _, tuned = load_checkpoint(args.tuned, model.FAMILY, **{k: getattr(model, k) for k in ("scan_blocks",)
                                                           if hasattr(model, k)})
    adapters, spec = lora.extract(model, base, tuned, args.rank, tuple(args.targets))
    lora.save_lora(model, adapters, args.out, spec)
    print(f"wrote {args.out}: {json.dumps(lora.describe_file(args.out))}")
    return 0
  except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
