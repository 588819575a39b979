"""Text-to-image MM-DiT (SD3 / SD3.5 architecture) on a captioned dataset; the preset is the config argument.

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
  c = config.text_to_image(variant)
  c.lock()
  return c
