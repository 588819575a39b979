"""Encodes an image dataset once into cached SD-VAE latents (moments of each image and of its flip) for training.

    python tools/extract_latents.py --source=folder --data_dir=/data/imagenet_records --image_size=256 \
        --vae=stabilityai/sd-vae-ft-ema --out=/data/imagenet256_latents
    python -m jdit.main --config=configs/dit_xl.py --workdir=DIR --config.data.data_dir=/data/imagenet256_latents
Resumable (finished shards are skipped); on several hosts each encodes its own shards (--num_hosts/--host, or
jax.process_index() under jax.distributed). Writes the VAE's scaling and shift factors (training scales latents
with them) and per-channel latent statistics to jdit_latents.json. --buckets=SPEC encodes each image at its
aspect-ratio bucket's shape (train with the same --config.data.buckets=SPEC).
"""
import argparse
import sys

import jax
import ml_collections


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", default="folder", choices=("folder", "tfds", "digits"))
  parser.add_argument("--data_dir", default="", help="converted image folder, or the tfds data_dir")
  parser.add_argument("--name", default="", help="tfds dataset name")
  parser.add_argument("--split", default="train")
  parser.add_argument("--image_size", type=int, default=256, help="ADM center crop size")
  parser.add_argument("--buckets", default="", help="aspect-ratio buckets (a data.buckets spec: sdxl, pixart-512, "
                      "HxW/STEP, HxW,HxW,...): each image encoded at its bucket's shape instead of a square crop")
  parser.add_argument("--bucket_max_crop", type=float, default=0.2,
                      help="with --buckets: drop images that would lose more than this fraction")
  parser.add_argument("--vae", required=True, help="VAE weights: diffusers dir, .safetensors, .ckpt or HF repo id")
  parser.add_argument("--vae_name", default="sd", choices=("sd", "sdxl", "sd3", "flux"),
                      help="defaults (scaling factor) for weights whose config.json does not give them")
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_shards", type=int, default=16)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--host", type=int, default=None)
  parser.add_argument("--num_hosts", type=int, default=None)
  args = parser.parse_args(argv)

  from jdit.convert import CheckpointError
  from jdit.convert.vae import load_vae
  from jdit.data import records, sources, writers
  try:
    data = ml_collections.ConfigDict(dict(source=args.source, data_dir=args.data_dir, name=args.name,
                                          split=args.split))
    source = sources.open_source(data)
    if args.buckets:
      from jdit.data.buckets import parse_buckets
      parse_buckets(args.buckets, "--buckets")
    vae, params = load_vae(args.vae, args.vae_name)
    if args.image_size < 1 or args.image_size % vae.downsample_factor:
      raise ValueError(f"--image_size={args.image_size}: expected a positive multiple of the VAE's "
                       f"{vae.downsample_factor}-pixel latent cells")
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  encode = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))
  host = jax.process_index() if args.host is None else args.host
  num_hosts = jax.process_count() if args.num_hosts is None else args.num_hosts
  try:
    meta = writers.extract_latents(source, encode, args.out, image_size=args.image_size,
                                   scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor,
                                   split=args.split, num_shards=args.num_shards, batch_size=args.batch_size,
                                   host=host, num_hosts=num_hosts, buckets=args.buckets,
                                   bucket_max_crop=args.bucket_max_crop,
                                   identity={k: getattr(args, k) for k in ("vae", "vae_name", "source", "data_dir",
                                                                            "name")})
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if meta is None:
    print(f"this host's shards are done; {args.out}/{records.LATENT_META} is written once every host has finished")
  else:
    shapes = meta["latent_shape"] or meta["latent_shapes"]
    print(f"done: latents {shapes}, {meta['dropped_images']} dropped by --buckets, channel mean "
          f"{meta['channel_mean']}, std {meta['channel_std']}, {meta['skipped_images']} unreadable images skipped")
  return 0


if __name__ == "__main__":
  sys.exit(main())
