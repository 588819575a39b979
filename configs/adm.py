"""The ADM U-Net of guided-diffusion on ImageNet pixels; the preset (adm64, adm128, adm256, adm512) is the argument.

    python -m jdit.main --config=configs/adm.py:adm256 --workdir=gs://BUCKET/adm256 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m jdit.main --config=configs/adm.py:adm256 --workdir=out/adm256 --mode=sample \
        --config.init_from=256x256_diffusion.pt
The official settings (learned sigma with the hybrid loss; sampling with 250 respaced DDPM steps and x0 clipped
to [-1, 1], as image_sample.py; no classifier-free guidance: ADM has no null class, and its classifier guidance is
not part of jdit) with DiT's optimizer recipe (AdamW lr 1e-4, batch 256, EMA 0.9999: jdit/config.py's defaults).
"""
from jdit import config
from jdit.models import family


def get_config(variant: str = "adm256"):
  c = config.base("unet")
  c.model.variant = variant  # class-conditional on 1000 classes with learned sigma, as released
  size = family.create(c.model).input_hw[0]  # the preset's resolution (an unknown preset is a one-line error)
  c.data.update(dict(source="tfds", name="imagenet2012",  # prepared with --file_format=array_record
                     image_size=size, channels=3, random_flip=True, num_workers=8))
  c.diffusion.update(dict(noise_schedule="cosine" if variant == "adm64" else "linear",  # as ADM trained them
                          sampler="ddpm", sampling_steps=250,  # image_sample.py's respacing
                          clip_denoised=True,  # pixels live in [-1, 1]
                          guidance_scale=1.0))  # no null class: no classifier-free guidance
  c.sample.per_device_batch = 8  # 256x256 pixels through a 554M-parameter U-Net
  c.lock()
  return c
