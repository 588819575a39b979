"""Encodes the captions of a captioned dataset once with frozen text encoders into a text-embedding cache.

    python tools/prepare_image_folder.py --src=/data/captioned --out=/data/captioned_records
    python tools/encode_text.py --data_dir=/data/captioned_records --out=/data/captioned_text \\
        --pipeline=/models/stable-diffusion-3-medium-diffusers           # SD3: CLIP-L, CLIP-G and T5-XXL
    python tools/encode_text.py --data_dir=... --out=... --pipeline=/models/FLUX.1-dev  # Flux: CLIP-L pooled, T5
    python tools/encode_text.py --data_dir=... --out=... \\
        --encoder=clip_l=/models/clip-l,tokenizer=/models/clip-l --encoder=t5=/models/t5,max_length=128,mask=1
An --encoder is NAME=WEIGHTS[,tokenizer=DIR][,max_length=N][,layer=last|penultimate][,mask=0|1][,pooled_only=0|1]
[,dtype=...]: weights a transformers directory or single file, the tokenizer directory (default: WEIGHTS when a
directory), the hidden state cached as the sequence (default: penultimate for CLIP, last for T5, as SD3), whether
the encoder sees the padding mask (SD3: no), and whether only its pooled vector conditions (Flux's CLIP-L). Parameters are split over the local devices (fsdp), so T5-XXL fits.
Resumable (finished shards are skipped); on several hosts each encodes its own shards.
"""
import argparse
import sys

import jax

FLAG = lambda v: v.lower() in ("1", "true", "yes")
OPTIONS = {"tokenizer": str, "max_length": int, "layer": str, "mask": FLAG, "pooled_only": FLAG, "dtype": str}


def parse_encoder(text: str) -> tuple[str, str, dict]:
  """NAME=WEIGHTS[,key=value...] -> (name, weights, options); ValueError naming the bad part."""
  head, *rest = text.split(",")
  if "=" not in head:
    raise ValueError(f"--encoder={text!r}: expected NAME=WEIGHTS[,tokenizer=DIR,max_length=N,layer=...,mask=0|1]")
  name, weights = head.split("=", 1)
  options = {}
  for part in rest:
    key, _, value = part.partition("=")
    if key not in OPTIONS or not value:
      raise ValueError(f"--encoder={text!r}: unknown option {part!r}; options: {', '.join(OPTIONS)}")
    try:
      options[key] = OPTIONS[key](value)
    except ValueError as e:
      raise ValueError(f"--encoder={text!r}: {key}={value!r} is not valid ({e})") from e
    if key == "max_length" and options[key] < 1:
      raise ValueError(f"--encoder={text!r}: max_length={value} must be at least 1 (leave it out for the "
                       "encoder's own length)")
  return name, weights, options


def encoder_list(args) -> list[tuple[str, str, dict]]:
  encoders = [parse_encoder(e) for e in args.encoder]
  if args.pipeline:
    from jdit import pipelines
    if not pipelines.is_pipeline(args.pipeline):
      raise ValueError(f"--pipeline={args.pipeline}: not a diffusers pipeline directory (model_index.json and "
                       "transformer/)")
    encoders += [(name, d["weights"], {"tokenizer": d["tokenizer"], "max_length": d["max_length"],
                                       "layer": d["layer"], "pooled_only": d["pooled_only"]})
                 for name, d in pipelines.encoder_descriptions(args.pipeline, field="--pipeline").items()]
  if not encoders:
    raise ValueError("give --pipeline or at least one --encoder")
  return encoders


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data_dir", required=True, help="captioned records (tools/prepare_image_folder.py)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--out", required=True)
  parser.add_argument("--encoder", action="append", default=[], help="NAME=WEIGHTS[,options] (repeatable)")
  parser.add_argument("--pipeline", default="", help="an SD3/SD3.5 or Flux.1 diffusers pipeline: its text encoders")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"),
                      help="storage dtype of the cached embeddings")
  parser.add_argument("--num_shards", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--host", type=int, default=None)
  parser.add_argument("--num_hosts", type=int, default=None)
  args = parser.parse_args(argv)

  from jdit import sharding
  from jdit.convert import CheckpointError
  from jdit.data.folder import open_folder
  from jdit.data import text_cache as cache
  from jdit.text.encode import TextEncoderSpec
  try:
    source = open_folder(args.data_dir, args.split)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.local_devices())
    specs = []
    for name, weights, options in encoder_list(args):
      tokenizer = options.pop("tokenizer", weights)
      overrides = {"dtype": options.pop("dtype")} if "dtype" in options else {}
      print(f"loading encoder {name} from {weights}")
      specs.append(TextEncoderSpec.load(name, weights, tokenizer, options.get("max_length"), options.get("layer"),
                                        options.get("mask", False), mesh, options.get("pooled_only", False),
                                        **overrides))
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  host = jax.process_index() if args.host is None else args.host
  num_hosts = jax.process_count() if args.num_hosts is None else args.num_hosts
  try:
    meta = cache.encode_captions(source, specs, args.out, split=args.split, num_shards=args.num_shards,
                                 batch_size=args.batch_size, dtype=args.dtype, host=host, num_hosts=num_hosts)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if meta is None:
    print(f"this host's shards are done; {args.out}/{cache.TEXT_META} is written once every host has finished")
  else:
    widths = ", ".join(f"{n} {e['max_length']}x{e['width']}" for n, e in meta["encoders"].items())
    print(f"done: {meta['count']} captions encoded ({widths}) into {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
