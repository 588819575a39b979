"""DiT on ImageNet 256x256 latents exactly as the paper trains it; the variant is the config argument.

    python -m jdit.main --config=configs/dit.py:B/2 --workdir=gs://BUCKET/dit_b2 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
AdamW lr 1e-4, no weight decay, global batch 256, EMA 0.9999, label dropout 0.1, 1000-step linear diffusion with
learned sigma, SD VAE latents (32x32x4) scaled by 0.18215, random horizontal flip, ADM center crop.
"""
from jdit import config


def get_config(variant: str = "XL/2"):
  c = config.paper(variant)
  c.lock()
  return c
