"""Text-to-image MM-DiT (SD3 / SD3.5 architecture) on a captioned dataset at 1024x1024, as SD3 trains; the preset
is the config argument. SD3's objective (rectified flow, logit-normal times, shift 3, Euler 28 steps, guidance 7)
is the MM-DiT family's own recipe (jdit/models/mmdit.py RECIPE), applied by config.base.

    python tools/prepare_image_folder.py --src=/data/captioned --out=/data/captioned_records
    python tools/extract_latents.py --source=folder --data_dir=/data/captioned_records --image_size=1024 \
        --vae=/models/sd3.5-medium/vae --vae_name=sd3 --out=/data/captioned_latents
    python tools/encode_text.py --data_dir=/data/captioned_records --out=/data/captioned_text \
        --pipeline=/models/sd3.5-medium
    python -m jdit.main --config=configs/mmdit.py:sd3.5-medium --workdir=DIR \
        --config.data.data_dir=/data/captioned_latents --config.data.text_dir=/data/captioned_text \
        --config.vae.path=/models/sd3.5-medium/vae
"""
from jdit import config


def get_config(variant: str = "sd3.5-medium"):
  c = config.base("mmdit")
  c.model.update(dict(variant=variant,
                      input_size=128, in_channels=16, out_channels=16,  # 1024^2 images -> 128x128x16 latents
                      joint_attention_dim=4096,  # CLIP-L + CLIP-G side by side, padded to T5-XXL's width
                      pooled_projection_dim=2048,  # CLIP-L 768 + CLIP-G 1280 pooled
                      text_length=333))  # 77 CLIP + 256 T5 tokens
  c.data.update(dict(source="captioned",  # cached latents joined with cached text embeddings
                     image_size=1024, channels=3,
                     random_flip=False,  # captions name left and right
                     num_workers=8,
                     caption_dropout_prob=0.1))  # the empty prompt 10% of the time, for guidance
  c.vae.update(dict(name="sd3"))  # 16 channels, shift 0.0609, scale 1.5305 unless its config.json says otherwise
  c.lock()
  return c
