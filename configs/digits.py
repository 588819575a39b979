"""The embedded default: a small class-conditional model on scikit-learn's bundled 8x8 digits, in pixel space, on
CPU. The argument picks the family; everything else is the same for both, so the two train on the same data for
the same number of images (configs/unet_digits.py is `digits.py:unet`).

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits                 # ~7 min on 2 cores
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python tools/eval_digits.py --samples=workdir/digits/samples.npz
"""
from jdit import config

MODELS = {  # ~0.33M parameters each; 3.4M (DiT) and 8.8M (U-Net) multiply-adds per image
    "dit": dict(variant="Tiny/2", depth=4, hidden_size=64, num_heads=4),  # 16 tokens of 2x2 pixels
    "unet": dict(variant="tiny", class_dropout_prob=0.1),  # 2 levels of width 32; a null class for guidance
}


def get_config(model_family: str = "dit"):
  if model_family not in MODELS:
    raise ValueError(f"expected one of {', '.join(MODELS)} (the model family), got {model_family!r}")
  c = config.base(model_family)
  c.model.update(dict(MODELS[model_family], input_size=8, in_channels=1, num_classes=10))  # 8x8 gray, 10 digits
  c.data.update(dict(source="digits", image_size=8, channels=1,
                     random_flip=False))  # a flipped digit is another glyph
  c.diffusion.update(dict(sampler="ddim", sampling_steps=50,  # DDPM-250's quality at a fifth of the steps
                          guidance_scale=2.0))  # the official 4.0 over-sharpens 8x8 digits
  c.optimizer.update(dict(learning_rate=2e-3,  # a tiny model learns fast; 1e-4 needs 10x the steps
                          warmup_steps=100, grad_clip=1.0))  # stable from the first steps at that rate
  c.batch_size = 64  # 1,797 images: an epoch every 28 steps
  c.num_train_steps = 4000  # 100% of guided samples recognized as the requested digit (make demo)
  c.ema_decay = 0.995  # a 0.9999 EMA would still be mostly the zero-output initialization after 4,000 steps
  c.checkpoint_every = 1000
  c.sample_every = 1000  # a grid per checkpoint
  c.sample.update(dict(num_samples=100, per_device_batch=100))  # 10 of each digit, one batch
  c.lock()
  return c
