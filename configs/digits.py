"""The embedded default: a small class-conditional DiT on scikit-learn's 8x8 digits, in pixel space, on CPU.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits
    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
"""
from jdit import config


def get_config():
  c = config.base()
  c.model.update(dict(variant="Tiny/2", depth=4, hidden_size=64, num_heads=4, input_size=8, in_channels=1,
                      num_classes=10))
  c.data.update(dict(source="digits", image_size=8, channels=1, random_flip=False))
  c.diffusion.update(dict(sampler="ddim", sampling_steps=50, guidance_scale=2.0))
  c.optimizer.update(dict(learning_rate=2e-3, warmup_steps=100, grad_clip=1.0))
  c.batch_size = 64
  c.num_train_steps = 4000
  c.ema_decay = 0.995  # short run: a 0.9999 EMA would still be mostly the zero-output initialization
  c.log_every = 100
  c.checkpoint_every = 1000
  c.sample_every = 1000
  c.sample.update(dict(num_samples=100, per_device_batch=100))
  c.lock()
  return c
