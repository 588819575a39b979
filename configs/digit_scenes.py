"""The bundled text-to-image demo: a small MM-DiT (or Flux: configs/digit_scenes.py:flux) and its own text encoder
trained together on digit scenes (two colored digits per 8x16 canvas, captioned "red three and blue seven"),
sampling the digit pairs held out of training. 4,000 steps (~8 minutes on 2 CPU cores) draw the held-out prompts
fully right (make demo-t2i).

    python -m jdit.main --config=configs/digit_scenes.py --workdir=workdir/digit_scenes
    python -m jdit.main --config=configs/digit_scenes.py --workdir=workdir/digit_scenes --mode=sample
    python tools/eval_digit_scenes.py --samples=workdir/digit_scenes/samples.npz
"""
from jdit import config
from jdit.data import digit_scenes

ARCHITECTURES = {  # config.model of each family's small model, width 64
    "mmdit": dict(depth=4, num_heads=4, head_dim=16),  # 4 joint blocks
    "flux": dict(depth=2, single_depth=4, num_heads=4, head_dim=16,  # 2 double- and 4 single-stream blocks
                 axes_dims_rope=(4, 6, 6),  # RoPE dims of (index, row, column)
                 guidance_embeds=False),  # no distilled guidance: classifier-free guidance from caption dropout
}


def get_config(family: str = "mmdit"):
  if family not in ARCHITECTURES:
    raise ValueError(f"configs/digit_scenes.py:{family}: expected one of {', '.join(ARCHITECTURES)}")
  c = config.base(family)
  c.model.update(dict(variant="tiny", **ARCHITECTURES[family],
                      input_size=(8, 16), in_channels=3, out_channels=3,  # RGB pixels, no VAE
                      joint_attention_dim=64, pooled_projection_dim=64,
                      text_length=digit_scenes.TOKENS,  # [BOS] + 5 words + [EOS]
                      text_vocab_size=len(digit_scenes.VOCABULARY),  # its own text encoder on word ids
                      text_eos_id=len(digit_scenes.VOCABULARY) - 1))
  c.data.update(dict(source="digit_scenes", image_size=8, channels=3,
                     random_flip=False,  # captions name left and right
                     caption_dropout_prob=0.1))  # the empty caption 10% of the time, for guidance
  c.diffusion.update(dict(flow_schedule="uniform", shift=1.0,  # the released shifts are for 1024^2 latents
                          sampling_steps=20, guidance_scale=3.0))
  c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=100, grad_clip=1.0))  # a tiny model learns fast
  c.batch_size = 64
  c.num_train_steps = 4000
  c.ema_decay = 0.995  # a short run: a 0.9999 EMA would still be the initialization
  c.checkpoint_every = 1000
  c.sample_every = 1000
  c.sample.update(dict(prompts=digit_scenes.default_prompts(),  # one per held-out pair
                       per_device_batch=16))
  c.lock()
  return c
