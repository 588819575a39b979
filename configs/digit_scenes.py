"""The bundled text-to-image demo: a small MM-DiT and its own text encoder trained together on digit scenes
(two colored digits per 8x16 canvas, captioned "red three and blue seven"), sampling the held-out pairs.

    python -m jdit.main --config=configs/digit_scenes.py --workdir=workdir/digit_scenes
    python -m jdit.main --config=configs/digit_scenes.py --workdir=workdir/digit_scenes --mode=sample
    python tools/eval_digit_scenes.py --samples=workdir/digit_scenes/samples.npz
"""
from jdit import config


def get_config():
  c = config.digit_scenes()
  c.lock()
  return c
