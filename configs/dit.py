"""DiT on ImageNet 256x256 latents exactly as the paper trains it; the variant is the config argument (S|B|L|XL /
2|4|8). The recipe is configs/dit_xl.py's.

    python -m jdit.main --config=configs/dit.py:B/2 --workdir=gs://BUCKET/dit_b2 \
        --config.data.data_dir=/data/imagenet256_latents
"""
import os

from jdit import config


def get_config(variant: str = "XL/2"):
  return config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_xl.py"), variant)
