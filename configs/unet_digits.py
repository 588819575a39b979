"""The digits default with the ADM U-Net instead of the DiT (the "tiny" preset: 2 levels of width 32, attention at
4x4, AdaGN, residual up/downsampling, a null class for guidance); everything but the model is configs/digits.py,
so the two train on the same data for the same number of images.

    python -m jdit.main --config=configs/unet_digits.py --workdir=workdir/unet_digits
    python -m jdit.main --config=configs/unet_digits.py --workdir=workdir/unet_digits --mode=sample
"""
import os

from jdit import config


def get_config():
  return config.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.py"), "unet")
