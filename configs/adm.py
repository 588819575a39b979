"""The ADM U-Net of guided-diffusion on ImageNet pixels; the preset (adm64, adm128, adm256, adm512) is the argument.

    python -m jdit.main --config=configs/adm.py:adm256 --workdir=gs://BUCKET/adm256 \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m jdit.main --config=configs/adm.py:adm256 --workdir=out/adm256 --mode=sample \\
        --config.init_from=256x256_diffusion.pt
Sampling defaults are the official ones: 250 respaced DDPM steps, learned variance, no guidance (ADM has no null
class; its classifier guidance is not part of jdit).
"""
from jdit import config


def get_config(variant: str = "adm256"):
  c = config.adm(variant)
  c.lock()
  return c
