"""Converts an image folder (ImageNet layout: one sub-folder per class) into array_record shards for training.

    python tools/prepare_image_folder.py --src=/data/imagenet/train --out=/data/imagenet_records
A captioned folder (Hugging Face imagefolder: metadata.jsonl lines {"file_name": ..., "text": ...}, or a NAME.txt
caption beside each image) gives captioned records, whose captions tools/encode_text.py encodes.
    python -m jdit.main --config=... --config.data.source=folder --config.data.data_dir=/data/imagenet_records
Each image's (height, width) goes to SPLIT.sizes.npy, so aspect-ratio buckets (--config.data.buckets) are assigned
without decoding. Unreadable files are skipped, counted and reported; shards appear only when complete.
"""
import argparse
import sys

from jdit.data.writers import convert_folder


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", required=True, help="folder of class sub-folders of images, or a captioned folder")
  parser.add_argument("--out", required=True, help="output directory for the shards")
  parser.add_argument("--split", default="train")
  parser.add_argument("--num_shards", type=int, default=8)
  args = parser.parse_args(argv)
  try:
    counts = convert_folder(args.src, args.out, args.split, args.num_shards)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  kind = "with captions" if counts["captioned"] else f"in {counts['classes']} classes"
  print(f"done: {counts['written']} images {kind} written to {args.out}, "
        f"{counts['skipped']} unreadable files skipped, {counts['uncaptioned']} images without a caption left out")
  return 0


if __name__ == "__main__":
  sys.exit(main())
