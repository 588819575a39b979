"""Rectified-flow DiT (SiT / SD3 style) on ImageNet 256x256 latents; the variant is the config argument.

    python -m jdit.main --config=configs/dit_flow.py:XL/2 --workdir=gs://BUCKET/sit_xl2 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
Velocity prediction, logit-normal training times, Heun sampling with 50 steps (100 model calls), guidance 1.5
on all channels.
"""
from jdit import config


def get_config(variant: str = "XL/2"):
  c = config.paper_flow(variant)
  c.lock()
  return c
