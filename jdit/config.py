"""The common config base: every field defined once, with a comment. configs/*.py override what differs."""
import ml_collections

from jdit.diffusion import objective


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameters, noise and timesteps derive from it (rng folded with the step)

  c.model = ml_collections.ConfigDict(dict(
      variant="XL/2",             # S|B|L|XL|Tiny / 1|2|4|8
      depth=-1, hidden_size=-1, num_heads=-1,  # -1: from the variant
      input_size=32,              # model input: latent size for latent models, image size in pixel space
      in_channels=4,
      num_classes=1000,           # 0: unconditional
      class_dropout_prob=0.1,     # label dropout; > 0 adds the null class used by classifier-free guidance
      learn_sigma=True,
      pos_embed="sincos",         # sincos | rope
      dtype="float32",            # compute dtype: float32 | bfloat16 (parameters stay float32)
      attention_backend="auto",   # auto (per platform) | einsum | xla | cudnn | splash: see models/attention.py
      remat="none",               # none | full | dots: rematerialization per block (dots saves linear-layer outputs)
      qk_norm=False,
      scan_blocks=True,           # nn.scan over the blocks: one compiled block instead of depth copies (XL/2 step
                                  # compiles 2.7x faster; CPU fwd+bwd 2.7x faster); False: per-block params
  ))
  c.diffusion = objective.default_config()

  c.data = ml_collections.ConfigDict(dict(
      source="digits",            # digits | tfds | folder | latents
      name="",                    # tfds dataset name (source=tfds)
      data_dir="",                # tfds data_dir, or the converted image folder (source=folder)
      split="train",
      image_size=8,               # images are ADM-center-cropped to this size
      channels=1,
      random_flip=False,          # random horizontal flip
      seed=0,                     # shuffling and flips
      num_workers=0,              # grain worker processes (0: in the main process)
      latent_scale=1.0,           # multiplies cached latents (0.18215 for the SD VAE)
      latent_sampling="sample",   # sample: a fresh posterior draw each time; mean: the posterior mean
  ))
  c.vae = ml_collections.ConfigDict(dict(
      path="",                    # latent models: VAE weights (diffusers dir, .safetensors, .ckpt or HF repo id)
      name="sd",                  # sd | sdxl: defaults (scaling factor) for the weights at `path`
      decode_tile=0,              # > 0: tiled decoding with tiles of this many latent pixels
      decode_overlap=16,
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      warmup_steps=0,             # linear warmup from 0
      weight_decay=0.0,           # AdamW decoupled weight decay
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=0.0,              # global-norm clipping; 0 disables
  ))
  c.batch_size = 256              # global batch over all hosts and devices
  c.num_train_steps = 400_000
  c.ema_decay = 0.9999

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
  c.axis_rules = (                # logical axis -> mesh axes
      ("act_batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("vocab", None),
      ("kv", None),
      ("layers", None),           # the stacked block axis of scan_blocks models
  )

  c.log_every = 100               # console / TensorBoard scalars
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.sample_every = 20000          # sample grid (PNG + TensorBoard image); 0 disables
  c.resume = ""                   # another run's workdir to continue from when workdir has no checkpoint
  c.init_from = ""                # weights only: jdit checkpoint, official DiT .pt or diffusers DiT

  c.sample = ml_collections.ConfigDict(dict(
      num_samples=64,             # --mode=sample: images written to samples.npz
      classes=(),                 # labels to sample, cycled; empty: all classes in turn
      per_device_batch=32,
      seed=0,
      fid=False,                  # True: guidance 1.5 of the official FID evaluation (sample_ddp.py), not 4.0
      resolution=(),              # (H, W) of the images in pixels; empty: the trained size (RoPE models extrapolate)
      fid_samples=50_000,         # --mode=fid_samples: images in the evaluation set, classes balanced
      fid_shard_size=1_000,       # images per resumable shard
  ))
  return c


def digits() -> ml_collections.ConfigDict:
  """The embedded default: a small class-conditional DiT on scikit-learn's 8x8 digits, in pixel space, on CPU
  (unlocked; configs/digits.py)."""
  c = base()
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
  return c


def paper(variant: str = "XL/2") -> ml_collections.ConfigDict:
  """DiT on ImageNet 256x256 SD-VAE latents exactly as the paper trains it (unlocked)."""
  c = base()
  c.model.update(dict(variant=variant, input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1,
                      learn_sigma=True))
  c.data.update(dict(source="latents", data_dir="", image_size=256, channels=3, random_flip=True,
                     latent_scale=0.18215, num_workers=8))
  c.vae.update(dict(path="stabilityai/sd-vae-ft-ema", name="sd"))
  c.optimizer.update(dict(learning_rate=1e-4, weight_decay=0.0))
  c.batch_size = 256
  c.num_train_steps = 400_000
  c.ema_decay = 0.9999
  return c


def paper_flow(variant: str = "XL/2") -> ml_collections.ConfigDict:
  """The paper setup trained as a rectified flow (SiT / SD3 style) instead (unlocked)."""
  c = paper(variant)
  c.model.learn_sigma = False
  c.diffusion.update(dict(kind="flow", variance="fixed_small", timestep_sampling="logit_normal", sampler="heun",
                          sampling_steps=50, guidance_scale=1.5, guidance_mode="all"))
  return c
