"""Fine-tuning Flux.1-dev (configs/flux.py:flux-schnell for schnell) on captioned 1024x1024 images on a TPU slice:
parameters and optimizer state split over the slice (fsdp), bf16 compute with full remat per block. Flux's
objective (rectified flow, logit-normal times; sampling: Euler on FluxPipeline's resolution-shifted sigmas, dev's
distilled guidance 3.5 from the embedding) is the family's own recipe (jdit/models/flux.py RECIPE).

    python tools/prepare_image_folder.py --src=/data/captioned --out=/data/captioned_records
    python tools/extract_latents.py --source=folder --data_dir=/data/captioned_records --image_size=1024 \
        --vae=/models/FLUX.1-dev/vae --vae_name=flux --out=/data/flux_latents
    python tools/encode_text.py --data_dir=/data/captioned_records --out=/data/flux_text --pipeline=/models/FLUX.1-dev
    python -m jdit.main --config=configs/flux.py --workdir=gs://bucket/flux --config.init_from=/models/FLUX.1-dev \
        --config.data.data_dir=/data/flux_latents --config.data.text_dir=/data/flux_text \
        --config.vae.path=/models/FLUX.1-dev/vae
"""
from jdit import config


def get_config(variant: str = "flux-dev"):
  c = config.base("flux")
  c.model.update(dict(variant=variant,
                      input_size=128,  # 1024^2 images -> 128x128x16 latents (4,096 tokens after 2x2 packing)
                      dtype="bfloat16",  # parameters stay float32
                      remat="full"))  # 57 blocks at 4,096 + 512 tokens: keep only each block's input
  c.data.update(dict(source="captioned",  # cached latents joined with cached text embeddings (T5 + CLIP-L pooled)
                     image_size=1024, channels=3,
                     random_flip=False,  # captions name left and right
                     num_workers=8,
                     caption_dropout_prob=0.0))  # dev samples with its distilled guidance: no unconditional pass
  c.vae.update(dict(name="flux"))  # 16 channels, scale 0.3611, shift 0.1159 unless its config.json says otherwise
  c.optimizer.update(dict(learning_rate=1e-5,  # fine-tuning a pretrained model (diffusers' Flux scripts: 1e-5..1e-4)
                          warmup_steps=100, grad_clip=1.0, weight_decay=1e-4))
  c.mesh.update(dict(fsdp=8))  # 12B parameters + Adam split over 8 chips (v5p-16: 8 chips); data: the rest
  c.batch_size = 32
  c.num_train_steps = 10_000
  c.ema_decay = 0.999  # a fine-tune: the EMA must move off the pretrained weights within the run
  c.checkpoint_every = 1000
  c.sample_every = 1000
  c.lock()
  return c
