"""The modern recipe on ImageNet 256x256 latents: a LightningDiT-style DiT-XL/2 (SwiGLU, RMSNorm, qk-norm, 2D RoPE;
Yao et al. 2025) trained as a rectified flow with logit-normal times, aligned to DINOv2 with REPA (Yu et al.
2024), AdamW with beta2 0.95, warmup, clipping and a validation loss. The variant is the config argument.

    python tools/prepare_image_folder.py --src=/data/imagenet/train --out=/data/imagenet_records
    python tools/extract_latents.py --source=folder --data_dir=/data/imagenet_records --image_size=256 \
        --vae=stabilityai/sd-vae-ft-ema --out=/data/imagenet256_latents
    python -m jdit.main --config=configs/lightning_dit.py --workdir=gs://BUCKET/lightning_xl2 \
        --config.data.data_dir=/data/imagenet256_latents --config.data.images_dir=/data/imagenet_records \
        --config.repa.encoder=/models/dinov2-base
Differences from LightningDiT's own run: SD-VAE latents (32x32x4) and patch 2 instead of its VA-VAE (16x16x32)
and patch 1, no velocity-direction loss term; REPA's encoder reads each latent's source image
(data.images_dir). The validation loss reads a held-out cache: extract the validation images with
--split=validation --out=/data/imagenet256_val_latents and set --config.eval.val_data_dir to it.
"""
import os

from jdit import config


def get_config(variant: str = "XL/2"):
  c = config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dit_xl.py"), variant)
  c.unlock()
  c.model.update(dict(learn_sigma=False,  # a flow predicts a velocity
                      mlp="swiglu", norm="rms", qk_norm=True, pos_embed="rope"))  # LightningDiT's block
  c.diffusion.update(dict(kind="flow", variance="fixed_small",
                          timestep_sampling="logit_normal",  # LightningDiT's lognorm times
                          sampler="euler", sampling_steps=250,  # its FID sampler: 250 Euler steps
                          guidance_scale=1.0, guidance_mode="all"))  # FID without guidance; set it to sample
  c.optimizer.update(dict(learning_rate=2e-4, b2=0.95, warmup_steps=5_000, grad_clip=1.0))  # LightningDiT's AdamW
  c.batch_size = 1024
  c.num_train_steps = 400_000
  c.repa.update(dict(encoder="", depth=8, projector_dim=2048, weight=0.5))  # set repa.encoder: DINOv2-B (REPA)
  c.eval.update(dict(val_every=10_000, val_split="validation", val_num_samples=1024))  # with eval.val_data_dir
  c.lock()
  return c
