"""Sampling: restore (EMA) parameters or pretrained weights, run the configured guided sampler, write PNG grids
and .npz files.

    python -m jdit.main --config=configs/digits.py --workdir=workdir/digits --mode=sample
    python -m jdit.main --config=configs/dit_xl.py --workdir=out --mode=sample --config.init_from=DiT-XL-2-256x256.pt
write workdir/samples.npz (images (N, H, W, C) uint8, labels (N,)) and workdir/samples.png. The defaults are the
official sample.py settings (250 DDPM steps, guidance 4.0 on the first 3 channels); `--config.sample.fid=True`
switches to the official FID evaluation's guidance of 1.5. See fid_samples.py for 50,000-image sets.
"""
import json
import os
from typing import Callable, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jdit import checkpoint, config_check, pipelines, sharding
from jdit.diffusion import objective
from jdit.grid import make_grid, save_png  # noqa: F401  (re-exported: notebooks use sample.make_grid)
from jdit.models import family
from jdit.models.conditioning import text_conditioned

COMPUTE_FIELDS = ("dtype", "attention_backend", "remat", "scan_blocks", "embedded_guidance")  # config.model
# fields sampling takes from the config; every other field is read from the weights sampled
MAX_AREA_SCALE = 16  # sampling resolutions up to 16x the area the model was built for (4x each side)
FID_GUIDANCE_SCALE = 1.5  # the official sample_ddp.py FID-50K setting (sample.py shows images at 4.0)


def to_uint8(x) -> np.ndarray:
  """[-1, 1] floats -> uint8, as the official sampler (clamp(127.5 x + 128, 0, 255))."""
  return np.clip(127.5 * np.asarray(x, np.float32) + 128.0, 0, 255).astype(np.uint8)


def class_count(model) -> int:
  """The number of classes the model is conditioned on (0: not class-conditional)."""
  return model.num_classes if "label" in model.condition_keys else 0


def sample_labels(config, model, n: int) -> np.ndarray:
  """config.sample.classes cycled over n samples (all classes in turn when empty; zeros when unconditional)."""
  count = class_count(model)
  classes = list(config.sample.classes) or list(range(max(count, 1)))
  if count and not all(0 <= c < count for c in classes):
    raise ValueError(f"sample.classes must be class indices in [0, {count}), got {classes}")
  return np.array([classes[i % len(classes)] for i in range(n)], np.int32)


def conditioning(model, labels: np.ndarray) -> dict:
  """The model's conditioning dict for these labels (empty for unconditional models)."""
  return model.condition({"label": labels}) if "label" in model.condition_keys else {}


def sampling_config(config) -> ml_collections.ConfigDict:
  """config.diffusion, with the FID evaluation's guidance scale when config.sample.fid is set."""
  cfg = ml_collections.ConfigDict(config.diffusion.to_dict())
  if config.sample.fid:
    cfg.guidance_scale = FID_GUIDANCE_SCALE
  if pipelines.is_pipeline(config.init_from):  # the pipeline's scheduler: diffusers' sigmas and shift
    cfg.update(pipelines.sampling(config.init_from))
  return cfg


def make_sampler(config, model):
  """The configured guided sampler, jitted once: (params, x_T, cond, rng) -> samples."""
  return jax.jit(objective.make_sample_fn(model, sampling_config(config)))


def gather(x) -> np.ndarray:
  """A (possibly multi-host) global array -> the whole array on every host, as numpy."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def make_decoder(vae, init_from: str = "", latent_meta: dict | None = None):
  """Latent models (config.vae `vae` with a path, or a diffusers pipeline as init_from): (decode: model latents ->
  images in [-1, 1], pixels per latent pixel), unscaled by the VAE's own scaling and shift factors, which must be
  those the cached latents were made with (`latent_meta`, the cache's jdit_latents.json, when known); pixel-space
  models: (None, 1)."""
  path, name = vae.path, vae.name
  if not path and pipelines.is_pipeline(init_from):  # a pipeline brings its own VAE
    path, name = os.path.join(init_from, "vae"), pipelines.vae_name(init_from)
  if not path:
    return None, 1
  from jdit.convert.vae import load_vae
  from jdit.models import tiling
  model, params = load_vae(path, name)
  if latent_meta and (latent_meta["scaling_factor"], latent_meta["shift_factor"]) != (model.scaling_factor,
                                                                                    model.shift_factor):
    raise ValueError(f"vae.path={vae.path} scales latents by scaling_factor={model.scaling_factor}, "
                     f"shift_factor={model.shift_factor}, but the latents in data.data_dir were made with "
                     f"{latent_meta['scaling_factor']}, {latent_meta['shift_factor']}: use the VAE that made them")
  if vae.decode_tile:
    tile = vae.decode_tile
    decode = lambda z: tiling.decode_tiled(model, params, model.unscale_latents(gather(z)), tile)
  else:
    decode = jax.jit(lambda z: model.apply({"params": params}, model.unscale_latents(z), method=model.decode))
  return decode, model.downsample_factor


def at_resolution(model, resolution, factor: int):
  """The model sampling (H, W)-pixel images (factor pixels per model input pixel); () keeps its trained size.
  RoPE models are built for this; sin-cos models run too, with positions they never saw."""
  if not resolution:
    return model
  height, width = resolution
  step = factor * model.size_multiple
  if height <= 0 or width <= 0 or height % step or width % step:
    raise ValueError(f"sample.resolution={tuple(resolution)}: height and width must be positive multiples of "
                     f"{step} (VAE factor {factor} x the model's size multiple {model.size_multiple})")
  built = [side * factor for side in model.input_hw]
  if height * width > MAX_AREA_SCALE * built[0] * built[1]:
    raise ValueError(f"sample.resolution={tuple(resolution)}: more than {MAX_AREA_SCALE}x the area of the "
                     f"{built[0]}x{built[1]} images the model was built for; ask for a smaller size")
  return model.clone(input_size=(height // factor, width // factor))


def sampling_resolution(config, model, factor: int) -> tuple:
  """sample.resolution, else the shape of sample.aspect_ratio: the data.buckets shape nearest it, or the trained
  area at that ratio (sides multiples of the VAE factor x the model's size multiple); () for the trained size."""
  if config.sample.resolution or not config.sample.aspect_ratio:
    return tuple(config.sample.resolution)
  from jdit.data import buckets
  ratio = buckets.parse_aspect_ratio(config.sample.aspect_ratio)
  if config.data.buckets:
    return buckets.nearest_shape(buckets.parse_buckets(config.data.buckets), ratio)
  height, width = model.input_hw
  return buckets.shape_at_ratio(height * width * factor * factor, ratio, factor * model.size_multiple)


def restore_for_sampling(config, workdir: str, log=print):
  """(model, params) to sample with: the latest checkpoint of workdir (its own model), else the weights of
  config.init_from (a jdit checkpoint or the configured family's PyTorch weights), whose tensors describe the
  architecture; config.model gives the compute settings (COMPUTE_FIELDS). A LoRA run's workdir gives
  its frozen base with its EMA adapters merged."""
  source = sampling_source(config, workdir)
  if source is None:
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint in {os.path.join(workdir, 'checkpoints')}; "
                            "train first or set --config.init_from")
  if source != config.init_from:
    if checkpoint.lora_record(source) is not None:
      from jdit import lora_base
      return lora_base.merged_run(source, config, log)
    return checkpoint.load_pretrained(source, log=log, **compute_fields(config))
  from jdit import convert
  try:
    return convert.load_checkpoint(source, config.model.family, **compute_fields(config))
  except convert.CheckpointError as e:
    raise convert.config_error("config.init_from", source, e) from None


def sampling_source(config, workdir: str) -> str | None:
  """What sampling restores: workdir's checkpoints directory when it holds a checkpoint, else config.init_from
  (None when neither is there)."""
  directory = os.path.join(workdir, "checkpoints")
  return directory if checkpoint.is_jdit_checkpoint(directory) else (config.init_from or None)


def compute_fields(config) -> dict:
  """The config.model fields that say how to compute, not what: sampling takes them from the config."""
  return {k: config.model[k] for k in COMPUTE_FIELDS if k in config.model}


def check_architecture(model, given: dict, source: str) -> None:
  """Model fields given at sampling (`given`: config.model overrides, e.g. the --config.model.FIELD flags; a
  variant stands for its preset's fields) must be the restored model's, or sampling would silently use another
  architecture than asked for: ValueError naming the first that differs. COMPUTE_FIELDS are applied, not checked."""
  asked = {field: (value, f"config.model.{field}={value!r}") for field, value in given.items() if field != "variant"}
  if "variant" in given:
    preset = family.get(model.FAMILY).PRESETS.get(given["variant"], {})
    asked = {**{f: (v, f"config.model.variant={given['variant']!r} ({f}={v!r})") for f, v in preset.items()}, **asked}
  restored = json.loads(json.dumps(family.model_config(model)))
  for field, (value, flag) in asked.items():
    if field not in COMPUTE_FIELDS and restored.get(field) != json.loads(json.dumps(value)):
      raise ValueError(f"{flag}: {source} holds a {restored['family']!r} model with {field}={restored.get(field)!r}; "
                       "sampling uses the architecture of its weights: drop the override, or train / import a model "
                       "with it")


class Setup(NamedTuple):
  """Everything sampling needs, from `prepare`."""
  model: object  # the model at the sampling resolution
  params: dict  # replicated over the mesh
  mesh: jax.sharding.Mesh
  sampler: Callable  # make_sampler
  decoder: Callable | None  # make_decoder
  image_shape: tuple[int, int, int]  # (H, W, C) of the uint8 images


def check_inputs(config, model) -> None:
  """One-line errors for sampling inputs that do not fit the restored model: classes it does not have, prompts
  for a model that reads none."""
  count, classes = class_count(model), tuple(config.sample.classes)
  if classes and not count:
    raise ValueError(f"sample.classes={classes}: {model.describe()} is not class-conditional; leave it empty")
  if any(c >= count for c in classes):
    raise ValueError(f"sample.classes={classes}: {model.describe()} has classes 0 to {count - 1}")
  if config.sample.prompts and not text_conditioned(model):
    raise ValueError(f"sample.prompts: {model.describe()} is not text-conditioned (it samples sample.classes); "
                     "leave sample.prompts empty")


def prepare(config, workdir: str, log=print, given: dict | None = None) -> Setup:
  """The model, replicated parameters, mesh, sampler and decoder to sample config's images with; `log` gets the
  restored checkpoint step; `given` model fields must match the restored model (check_architecture)."""
  model, params = restore_for_sampling(config, workdir, log)
  check_architecture(model, given or {}, sampling_source(config, workdir))
  check_inputs(config, model)
  if config.sample.get("loras"):
    from jdit import lora
    params = lora.stack(model, params, lora.parse_loras(config.sample.loras), log)
  decoder, factor = make_decoder(config.vae, config.init_from)
  model = at_resolution(model, sampling_resolution(config, model, factor), factor)
  mesh = sharding.make_mesh(dict(config.mesh))
  params = jax.device_put(params, sharding.replicated(mesh))
  height, width = model.input_hw
  image_shape = (height * factor, width * factor, model.in_channels if decoder is None else 3)
  return Setup(model, params, mesh, make_sampler(config, model), decoder, image_shape)


def generate(sampler, per_device_batch: int, model, params, rows, mesh, seed, decoder=None) -> np.ndarray:
  """uint8 samples, one per row of `rows`: class labels (N,) (ignored by unconditional models) or a conditioning
  dict of (N, ...) arrays (text models: context, pooled, null_context, null_pooled). Device batches of
  per_device_batch (config.sample.per_device_batch) are split over the mesh's data-parallel axes (on every host);
  `decoder` (see make_decoder) turns latents into images; `seed` is an int or a key."""
  if isinstance(rows, dict):
    count, conditions = len(next(iter(rows.values()))), rows
  else:
    count, conditions = len(rows), conditioning(model, np.asarray(rows))
  per_call = per_device_batch * sharding.data_parallel_size(mesh)
  shape = (*model.input_hw, model.in_channels)
  base = jax.random.key(seed) if isinstance(seed, int) else seed
  out = []
  for start in range(0, count, per_call):
    size = min(per_call, count - start)
    take = start + np.resize(np.arange(size), per_call)  # fixed batch shape: one compilation
    noise_key, sample_key = jax.random.split(jax.random.fold_in(base, start))
    x_T = np.asarray(jax.random.normal(noise_key, (per_call, *shape)))  # the same on every host
    local = slice(*_process_rows(per_call))
    cond = sharding.global_batch({k: np.asarray(v)[take][local] for k, v in conditions.items()}, mesh)
    x = sampler(params, sharding.global_batch({"x": x_T[local]}, mesh)["x"], cond, sample_key)
    if decoder is not None:
      x = decoder(x)
    out.append(to_uint8(gather(x))[:size])
  return np.concatenate(out)


def _process_rows(batch: int) -> tuple[int, int]:
  """This host's rows of a global batch (hosts hold equal consecutive blocks)."""
  rows = batch // jax.process_count()
  return jax.process_index() * rows, (jax.process_index() + 1) * rows


def write_grid(sampler, config, model, params, mesh, workdir: str, step: int, decoder=None,
               conditions: dict | None = None, captions: list[str] | None = None) -> np.ndarray:
  """A grid at workdir/samples/step_N.png with one labelled row of 10 samples per class (up to 10 classes), or
  per caption of `conditions` (a conditioning dict of one row per caption, named by `captions`)."""
  if conditions is None:
    rows = min(max(class_count(model), 1), 10)
    conditions, labels = np.arange(rows, dtype=np.int32), [str(c) for c in range(rows)]
  else:
    rows, labels = len(captions), captions
  repeat = lambda a: np.repeat(np.asarray(a), 10, axis=0)
  rows_x10 = {k: repeat(v) for k, v in conditions.items()} if isinstance(conditions, dict) else repeat(conditions)
  images = generate(sampler, config.sample.per_device_batch, model, params, rows_x10, mesh, config.sample.seed,
                    decoder)
  grid = make_grid(images, rows, labels)
  save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
  return grid


def sample_and_save(config, workdir: str, given: dict | None = None) -> str:
  """--mode=sample: samples.npz and samples.png in workdir from its latest EMA parameters or config.init_from;
  returns the npz path. Class models: images and labels; text models: one image per prompt of
  config.sample.prompts, in order, and the prompts. `given`: model fields the command line set (prepare)."""
  config_check.validate(config, "sample", workdir)
  setup = prepare(config, workdir, given=given)
  if text_conditioned(setup.model):
    from jdit import prompts as prompts_lib
    prompts = prompts_lib.read_prompts(config.sample.prompts)
    rows, extra = prompts_lib.conditions_for(config, setup.model, prompts), {"prompts": np.array(prompts)}
  else:
    rows = sample_labels(config, setup.model, config.sample.num_samples)
    extra = {"labels": rows}
  images = generate(setup.sampler, config.sample.per_device_batch, setup.model, setup.params, rows, setup.mesh,
                    config.sample.seed, setup.decoder)
  path = os.path.join(workdir, "samples.npz")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    np.savez(path + ".tmp.npz", images=images, **extra)
    os.replace(path + ".tmp.npz", path)
    if "prompts" in extra:  # a column of prompts, one image each
      shown = np.arange(min(len(images), 16))
      grid = make_grid(images[shown], len(shown), [str(p) for p in extra["prompts"][shown]])
    else:
      labels = extra["labels"]
      classes = np.unique(labels)[:10]
      shown = np.concatenate([np.flatnonzero(labels == c)[:10] for c in classes])
      grid = make_grid(images[shown], len(classes), [str(c) for c in classes])
    save_png(grid, os.path.join(workdir, "samples.png"))
    print(f"wrote {len(images)} samples of {images.shape[1]}x{images.shape[2]} to {path} and a grid of them to "
          f"{os.path.join(workdir, 'samples.png')}", flush=True)
  return path
