"""DiT-XL/2 on ImageNet 256x256 as the paper trains it (Peebles & Xie 2023, and facebookresearch/DiT's train.py):
class-conditional, on SD-VAE latents cached once by tools/extract_latents.py.

    python tools/prepare_image_folder.py --src=/data/imagenet/train --out=/data/imagenet_records
    python tools/extract_latents.py --source=folder --data_dir=/data/imagenet_records --image_size=256 \
        --vae=stabilityai/sd-vae-ft-ema --out=/data/imagenet256_latents
    python -m jdit.main --config=configs/dit_xl.py --workdir=gs://BUCKET/dit_xl2 \
        --config.data.data_dir=/data/imagenet256_latents
configs/dit.py:VARIANT is the same recipe for any variant. Every other field is jdit/config.py's default: AdamW
lr 1e-4 without weight decay, global batch 256, EMA 0.9999, 1000-step linear Gaussian diffusion with learned sigma
and the hybrid loss, 250-step DDPM sampling with guidance 4.0 on the first 3 channels (the official sample.py).
"""
from jdit import config


def get_config(variant: str = "XL/2"):
  c = config.base("dit")
  c.model.update(dict(variant=variant,
                      input_size=32, in_channels=4,  # 256x256x3 images -> 32x32x4 SD-VAE latents
                      num_classes=1000, class_dropout_prob=0.1,  # ImageNet, 10% labels dropped for guidance
                      learn_sigma=True))  # the hybrid loss learns the variance (improved DDPM)
  c.data.update(dict(source="latents",  # posterior moments cached once; a fresh draw on every read
                     data_dir="",  # the cache (tools/extract_latents.py): set --config.data.data_dir
                     image_size=256, channels=3,  # what the cache was extracted from (checked against it)
                     random_flip=True,  # the cache holds each image's flip too (ADM's augmentation)
                     num_workers=8))  # 256 latent draws per step: keep the devices fed
  c.vae.update(dict(path="stabilityai/sd-vae-ft-ema",  # the official FID script's decoder (sample_ddp.py)
                    name="sd"))  # scaling factor 0.18215 for weights whose config.json lacks it
  c.lock()
  return c
