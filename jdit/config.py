"""The common config base: every field of a run defined once, with a comment (a model family's own fields are
declared on its flax module: jdit/models/fields.py). The recipes are configs/*.py, each a get_config(arg) that
overrides what differs from this base, with a comment on why.

    config.base("dit")                           # the base of a DiT run
    config.from_file("configs/digits.py")        # a recipe by path, as --config=configs/digits.py loads it
    config.recipe("dit", "B/2")                  # configs/dit.py:B/2 of this checkout
    config.of_run("workdir/digits")              # the config a run last trained with (its config.json)
"""
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from jdit import sharding
from jdit.data import records
from jdit.diffusion import objective
from jdit.models import family


def base(model_family: str = "dit") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameters, noise and timesteps derive from it (rng folded with the step)

  c.model = family.default_config(model_family)  # the family module's fields (jdit/models/<family>.py)
  c.diffusion = objective.default_config()
  for section, values in family.recipe(model_family).items():  # the family's own recipe (MM-DiT: SD3's flow)
    c[section].update(values)

  c.data = ml_collections.ConfigDict(dict(
      source="digits",            # digits | tfds | folder | latents | captioned (latents + text embeddings)
      name="",                    # tfds dataset name (source=tfds)
      data_dir="",                # tfds data_dir, the converted image folder (folder) or the latent cache (latents)
      split="train",              # the dataset split (digit_scenes: train | held_out)
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
      images_dir="",              # latents: the converted image folder the cache was extracted from; REPA reads
                                  # each latent's clean image there (by the source index its record keeps)
      caption_dropout_prob=0.1,   # captioned: probability of the empty prompt instead of the caption (guidance)
      buckets="",                 # aspect-ratio buckets of (H, W) in pixels: "sdxl", "pixart-256|512|1024",
                                  # "HxW/STEP" (area H*W, sides multiples of STEP) or "HxW,HxW,..."; "" squares
      bucket_max_crop=0.2,        # buckets: images that would lose more than this fraction are dropped (counted)
      bucket_repeat=1,            # buckets: steps in a row drawn from one bucket
      rotate=0,                   # 0 | 90 | 180 | 270: every image turned by this many degrees counterclockwise
                                  # (any source; 90 and 270 need square images)
  ))
  c.vae = ml_collections.ConfigDict(dict(
      path="",                    # latent models: VAE weights (diffusers dir, .safetensors, .ckpt or HF repo id)
      name="sd",                  # sd | sdxl | sd3 | flux: defaults (scaling, shift) for weights whose config.json
                                  # lacks them
      decode_tile=0,              # > 0: tiled decoding (equal to untiled) in tiles of this many latent pixels
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",               # adamw | lion | adafactor (jdit/optim.py)
      learning_rate=1e-4,         # the peak rate (after warmup)
      warmup_steps=0,             # linear warmup from 0
      schedule="constant",        # constant | cosine | linear: decay after warmup to final_learning_rate at the
      final_learning_rate=0.0,    # last step (num_train_steps)
      weight_decay=0.0,           # decoupled weight decay (AdamW, Lion; Adafactor's weight_decay_rate)
      b1=0.9, b2=0.999, eps=1e-8,  # Adam moments and epsilon (Lion: its two betas, e.g. 0.9 and 0.99)
      grad_clip=0.0,              # global-norm clipping; 0 disables
  ))
  c.batch_size = 256              # global batch of one update, over all hosts and devices
  c.grad_accum_steps = 1          # k > 1: the batch runs as k micro-batches in turn (one's activations in memory)
  c.num_train_steps = 400_000     # optimizer steps of the run (a rerun resumes until it reaches them)
  c.ema_decay = 0.9999            # EMA of the parameters, what sampling uses

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
  c.axis_rules = sharding.AXIS_RULES  # logical axis -> mesh axes (jdit/sharding.py)

  c.log_every = 100               # console / TensorBoard scalars
  c.checkpoint_every = 5000       # steps between checkpoints (and one at the end, and on SIGTERM)
  c.keep_checkpoints = 3          # the newest checkpoints kept
  c.sample_every = 20000          # sample grid (PNG + TensorBoard image); 0 disables
  c.resume = ""                   # another run's workdir to continue from when workdir has no checkpoint
  c.init_from = ""                # weights only: a jdit checkpoint (a run's workdir, its checkpoints/ or one
                                  # step, checkpoints/N) or the family's PyTorch weights (official DiT .pt,
                                  # diffusers DiT, guided-diffusion U-Net .pt, SD3 and Flux files and pipelines)

  c.lora = ml_collections.ConfigDict(dict(  # low-rank adapters on the frozen init_from base (jdit/lora.py)
      rank=0,                     # > 0: train rank-r adapters, not the model; the base stays frozen
      alpha=0.0,                  # the adapters' output scale is alpha / rank; 0: alpha = rank
      targets=(),                 # regular expressions over layer paths; empty: the family's LORA_TARGETS
      init="kaiming",             # A's initialization: kaiming (PEFT's default) | gaussian; B starts at zero
      dropout=0.0,                # dropout on the adapters' input while training
      base_dtype="float32",       # the frozen base's storage: float32 | bfloat16 (half the memory)
  ))

  c.sample = ml_collections.ConfigDict(dict(
      num_samples=64,             # --mode=sample: images written to samples.npz
      classes=(),                 # labels to sample, cycled; empty: all classes in turn
      per_device_batch=32,        # sampling batch per device
      seed=0,                     # the initial noise
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
  c.sample.loras = ""             # LoRA adapter files merged into the weights before sampling, in order:
                                  # "PATH:SCALE,PATH:SCALE" (diffusers / PEFT or jdit files; jdit/lora.py)
  c.repa = ml_collections.ConfigDict(dict(  # REPA (jdit/repa.py): align a block's tokens with DINOv2 features
      encoder="",                 # a transformers Dinov2Model directory (dinov2-base in REPA); "" disables REPA
      depth=8,                    # the block whose output tokens are aligned (1-based; REPA: 8 of SiT-XL's 28)
      projector_dim=2048,         # hidden width of the 3-layer MLP projector
      weight=0.5,                 # lambda: loss = diffusion loss + weight * alignment (negative cosine)
  ))
  c.eval = ml_collections.ConfigDict(dict(  # ADM's evaluation (jdit.eval) of class and unconditional models
      reference="",               # an ADM reference batch (.npz: arr_0, optionally mu/sigma/mu_s/sigma_s):
                                  # --mode=fid_samples ends with the five numbers against it (SAMPLES.eval.json)
      inception="",               # pytorch-fid's pt_inception-2015-12-05-6726825d.pth, needed with reference
      fid_every=0,                # > 0: every N training steps, the FID of fid_num_samples EMA samples against
                                  # reference (TensorBoard scalar 'fid'); 0 disables
      fid_num_samples=5_000,      # class-balanced, seeded by sample.seed; guidance as --mode=fid_samples
      batch_size=200,             # Inception batch (split over the local devices)
      val_every=0,                # > 0: every N training steps, the validation loss (jdit/validation.py): the
                                  # objective's loss on a fixed held-out set at fixed timesteps and noise
                                  # (TensorBoard 'val/loss' and 'val/loss_tSTEP'); 0 disables
      val_split="validation",     # the held-out split (sources with one split, as digits, read that one)
      val_data_dir="",            # where it is, if not data.data_dir (latent caches: the held-out split's cache)
      val_num_samples=256,        # its first N readable examples (a multiple of the data-parallel size)
      val_timesteps=8,            # K evenly spaced timesteps
      val_seed=0,                 # the fixed noise
  ))
  return c


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def from_file(path: str, *args) -> ml_collections.ConfigDict:
  """get_config(*args) of the config file at `path`, loaded as --config=PATH[:ARG] loads it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such config file")
  name = "jdit_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path}: defines no get_config(), the function a config file provides")
  loaded = module.get_config(*args)
  if not isinstance(loaded, ml_collections.ConfigDict):
    raise ValueError(f"{path}: get_config() returned {type(loaded).__name__}, not an ml_collections ConfigDict")
  return loaded


def recipe(name: str, *args) -> ml_collections.ConfigDict:
  """configs/<name>.py's get_config(*args), from the checkout jdit runs from (configs/ is not part of a wheel:
  clone the repository and `pip install -e .`)."""
  path = os.path.join(CONFIGS, f"{name}.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no recipe {name!r} in {CONFIGS}: recipes are configs/*.py of a checkout of jdit "
                            "(git clone, then pip install -e .)")
  return from_file(path, *args)


RUN_CONFIG = "config.json"  # in a run's workdir: the config it last trained with


def save_run(config, workdir: str) -> None:
  """Writes WORKDIR/config.json, the whole config (overrides applied), whole or not at all."""
  records.write_json(workdir, RUN_CONFIG, config.to_dict())


def of_run(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in workdir (from its config.json; tuples read back as lists)."""
  stored = records.read_json(workdir, RUN_CONFIG)
  if stored is None:
    raise FileNotFoundError(f"--workdir={workdir}: no {RUN_CONFIG} (written when training starts): not a run's "
                            "workdir")
  return ml_collections.ConfigDict(stored)
