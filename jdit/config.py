"""The common config base: every field defined once, with a comment. configs/*.py override what differs."""
import ml_collections
from ml_collections import config_dict

from jdit import sharding
from jdit.diffusion import objective
from jdit.models import family


def base(model_family: str = "dit") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameters, noise and timesteps derive from it (rng folded with the step)

  c.model = family.default_config(model_family)  # the family's fields: see default_config() in models/<family>.py
  c.diffusion = objective.default_config()
  for section, values in family.recipe(model_family).items():  # the family's own recipe (MM-DiT: SD3's flow)
    c[section].update(values)

  c.data = ml_collections.ConfigDict(dict(
      source="digits",            # digits | tfds | folder | latents | captioned (latents + text embeddings)
      name="",                    # tfds dataset name (source=tfds)
      data_dir="",                # tfds data_dir, the converted image folder (folder) or the latent cache (latents)
      split="train",
      image_size=8,               # images are ADM-center-cropped to this size (latents: the size they were
                                  # extracted at, checked against the cache)
      channels=1,                 # 1 | 3 (latents: 3, the VAE's RGB input)
      random_flip=False,          # random horizontal flip (latents: pick the cached flip with probability 1/2)
      seed=0,                     # shuffling, flips and latent draws
      num_workers=0,              # grain worker processes (0: in the main process)
      read_threads=0,             # threads reading elements ahead in each process (0: in the calling thread,
                                  # fastest for in-memory data; > 0 for image decoding without worker processes)
      latent_sampling="sample",   # latents: a fresh posterior draw each read (sample) or the mean; the cache's
                                  # jdit_latents.json holds its VAE's scaling_factor and shift_factor
      text_dir="",                # captioned: the text-embedding cache of data_dir's dataset (tools/encode_text.py)
      caption_dropout_prob=0.1,   # captioned: probability of the empty prompt instead of the caption (guidance)
      buckets="",                 # aspect-ratio buckets of (H, W) in pixels: "sdxl", "pixart-256|512|1024",
                                  # "HxW/STEP" (area H*W, sides multiples of STEP) or "HxW,HxW,..."; "" squares
      bucket_max_crop=0.2,        # buckets: images that would lose more than this fraction are dropped (counted)
      bucket_repeat=1,            # buckets: steps in a row drawn from one bucket
  ))
  c.vae = ml_collections.ConfigDict(dict(
      path="",                    # latent models: VAE weights (diffusers dir, .safetensors, .ckpt or HF repo id)
      name="sd",                  # sd | sdxl: defaults (scaling factor) for weights whose config.json lacks them
      decode_tile=0,              # > 0: tiled decoding (equal to untiled) in tiles of this many latent pixels
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
  c.axis_rules = sharding.AXIS_RULES  # logical axis -> mesh axes (jdit/sharding.py)

  c.log_every = 100               # console / TensorBoard scalars
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.sample_every = 20000          # sample grid (PNG + TensorBoard image); 0 disables
  c.resume = ""                   # another run's workdir to continue from when workdir has no checkpoint
  c.init_from = ""                # weights only: a jdit checkpoint or the family's PyTorch weights (official DiT
                                  # .pt, diffusers DiT, guided-diffusion U-Net .pt)

  c.sample = ml_collections.ConfigDict(dict(
      num_samples=64,             # --mode=sample: images written to samples.npz
      classes=(),                 # labels to sample, cycled; empty: all classes in turn
      per_device_batch=32,
      seed=0,
      fid=False,                  # True: guidance 1.5 of the official FID evaluation (sample_ddp.py), not 4.0
      resolution=(),              # (H, W) of the images in pixels; empty: the trained size (RoPE models extrapolate)
      aspect_ratio="",            # "16:9" (W:H): the data.buckets shape nearest it, else the trained area at it
      fid_samples=50_000,         # --mode=fid_samples: images in the evaluation set, classes balanced
      fid_shard_size=1_000,       # images per resumable shard
  ))
  # Text models: the prompts of --mode=sample, one image each: a tuple of strings or a text file with one prompt
  # per line (--config.sample.prompts=prompts.txt); a str or a tuple, hence a field of type object.
  c.sample.prompts = config_dict.FieldReference((), field_type=object)
  c.sample.t5 = True              # SD3 pipelines (init_from): False replaces T5's tokens by zeros, as SD3 allows
  c.eval = ml_collections.ConfigDict(dict(  # ADM's evaluation (jdit.eval) of class and unconditional models
      reference="",               # an ADM reference batch (.npz: arr_0, optionally mu/sigma/mu_s/sigma_s):
                                  # --mode=fid_samples ends with the five numbers against it (SAMPLES.eval.json)
      inception="",               # pytorch-fid's pt_inception-2015-12-05-6726825d.pth, needed with reference
      fid_every=0,                # > 0: every N training steps, the FID of fid_num_samples EMA samples against
                                  # reference (TensorBoard scalar 'fid'); 0 disables
      fid_num_samples=5_000,      # class-balanced, seeded by sample.seed; guidance as --mode=fid_samples
      batch_size=200,             # Inception batch (split over the local devices)
  ))
  return c


DIGITS_MODELS = {  # config.model of the digits demo per family: ~0.33M parameters each; 3.4M / 8.8M MACs per image
    "dit": dict(variant="Tiny/2", depth=4, hidden_size=64, num_heads=4, input_size=8, in_channels=1,
                num_classes=10),
    "unet": dict(variant="tiny", input_size=8, in_channels=1, num_classes=10, class_dropout_prob=0.1),
}


def digits(model_family: str = "dit") -> ml_collections.ConfigDict:
  """The embedded default: a small class-conditional model on scikit-learn's 8x8 digits, in pixel space, on CPU
  (unlocked; configs/digits.py, configs/unet_digits.py). Only the model differs between the families."""
  c = base(model_family)
  c.model.update(DIGITS_MODELS[model_family])
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
  c.data.update(dict(source="latents", data_dir="", image_size=256, channels=3, random_flip=True, num_workers=8))
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


def text_to_image(variant: str = "sd3.5-medium") -> ml_collections.ConfigDict:
  """An MM-DiT preset trained on captioned 1024x1024 images as SD3: cached SD3-VAE latents (16 channels) and
  cached CLIP-L + CLIP-G + T5-XXL embeddings (data.source="captioned"), rectified flow with logit-normal times
  and shift 3, no flips (captions name left and right) (unlocked)."""
  c = base("mmdit")
  c.model.update(dict(variant=variant, input_size=128, in_channels=16, out_channels=16, joint_attention_dim=4096,
                      pooled_projection_dim=2048, text_length=333))
  c.data.update(dict(source="captioned", image_size=1024, channels=3, random_flip=False, num_workers=8,
                     caption_dropout_prob=0.1))
  c.vae.update(dict(name="sd3"))
  c.optimizer.update(dict(learning_rate=1e-4, weight_decay=0.0))
  c.batch_size = 256
  c.num_train_steps = 400_000
  c.ema_decay = 0.9999
  return c


def digit_scenes() -> ml_collections.ConfigDict:
  """The bundled text-to-image setting: a small MM-DiT and its own small text encoder trained together on digit
  scenes (8x16 canvases, two colored digits, captions), rectified flow, sampling the held-out pairs (unlocked;
  configs/digit_scenes.py). 4,000 steps draw the held-out prompts fully right (make demo-t2i; README)."""
  from jdit.data import digit_scenes as scenes
  c = base("mmdit")
  c.model.update(dict(variant="tiny", depth=4, num_heads=4, head_dim=16, input_size=(8, 16), in_channels=3,
                      out_channels=3, joint_attention_dim=64, pooled_projection_dim=64, text_length=scenes.TOKENS,
                      text_vocab_size=len(scenes.VOCABULARY), text_eos_id=len(scenes.VOCABULARY) - 1))
  c.data.update(dict(source="digit_scenes", image_size=8, channels=3, random_flip=False, caption_dropout_prob=0.1))
  c.diffusion.update(dict(flow_schedule="uniform", shift=1.0, sampling_steps=20, guidance_scale=3.0))
  c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=100, grad_clip=1.0))
  c.batch_size = 64
  c.num_train_steps = 4000
  c.ema_decay = 0.995
  c.log_every = 100
  c.checkpoint_every = 1000
  c.sample_every = 1000
  c.sample.update(dict(prompts=scenes.default_prompts(), per_device_batch=16))
  return c


def adm(variant: str = "adm256") -> ml_collections.ConfigDict:
  """The ADM U-Net (guided-diffusion's ImageNet presets) on ImageNet pixels at the preset's resolution: the
  official settings (learned sigma with the hybrid loss, linear schedule, cosine for adm64; sampling with 250
  respaced DDPM steps and x0 clipped to [-1, 1], as image_sample.py; no classifier-free guidance: ADM has no null
  class) with DiT's optimizer recipe (AdamW lr 1e-4, batch 256, EMA 0.9999) (unlocked)."""
  c = base("unet")
  c.model.variant = variant
  size = family.create(c.model).input_hw[0]  # the preset's resolution (an unknown variant is a one-line error)
  c.data.update(dict(source="tfds", name="imagenet2012", image_size=size, channels=3, random_flip=True,
                     num_workers=8))
  c.diffusion.update(dict(noise_schedule="cosine" if variant == "adm64" else "linear", sampler="ddpm",
                          sampling_steps=250, clip_denoised=True, guidance_scale=1.0))
  c.optimizer.update(dict(learning_rate=1e-4, weight_decay=0.0))
  c.batch_size = 256
  c.num_train_steps = 400_000
  c.ema_decay = 0.9999
  c.sample.per_device_batch = 8
  return c
