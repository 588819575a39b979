"""Rectified-flow DiT (SiT / SD3 style) on ImageNet 256x256 latents; the variant is the config argument. The
paper's recipe (configs/dit_xl.py) with the objective and sampler changed.

    python -m jdit.main --config=configs/dit_flow.py:XL/2 --workdir=gs://BUCKET/sit_xl2 \
        --config.data.data_dir=/data/imagenet256_latents
"""
import os

from jdit import config


def get_config(variant: str = "XL/2"):
  c = config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_xl.py"), variant)
  c.unlock()
  c.model.learn_sigma = False  # a flow predicts a velocity: no variance to learn
  c.diffusion.update(dict(kind="flow", variance="fixed_small",
                          timestep_sampling="logit_normal",  # more training where the velocity is hardest (SD3)
                          sampler="heun", sampling_steps=50,  # second order: 100 model calls
                          guidance_scale=1.5,  # SiT's FID setting
                          guidance_mode="all"))  # every channel (no learned-variance half to leave alone)
  c.lock()
  return c
