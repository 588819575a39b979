"""DiT-XL/2 on ImageNet 256x256 latents, as the paper trains it (see configs/dit.py for the recipe).

    python -m jdit.main --config=configs/dit_xl.py --workdir=gs://BUCKET/dit_xl2 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
"""
from jdit import config


def get_config():
  c = config.paper("XL/2")
  c.lock()
  return c
