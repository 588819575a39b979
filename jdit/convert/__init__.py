"""Weight import: PyTorch checkpoints of every model family, and jdit checkpoints.

    model, params = load_checkpoint(path)                 # the family is recognized from the tensors
    model, params = load_dit_checkpoint("DiT-XL-2-256x256.pt")
    model, params = load_unet_checkpoint("256x256_diffusion.pt", num_head_channels=64)
    model, params = load_mmdit_checkpoint("stable-diffusion-3.5-medium")     # a pipeline's transformer/
    model, params = load_flux_checkpoint("FLUX.1-dev")    # a pipeline directory, or flux1-dev.safetensors
    params = load_into(path, model)                       # weights for a configured model (init_from)
A family's mapping lives in jdit/convert/<family>.py: matches(weights) and from_weights(weights, hints,
**overrides) -> (model, params).
"""
import importlib
import os

import jax
import jax.numpy as jnp

from jdit import checkpoint
from jdit.state_dict import (CheckpointError, check_params, find_diffusers_weights, read_json,
                                     read_weight_file, select_weights)
from jdit.models import family

__all__ = ["CheckpointError", "config_error", "load_checkpoint", "load_dit_checkpoint", "load_flux_checkpoint",
           "load_into", "load_placed", "load_mmdit_checkpoint", "load_unet_checkpoint"]


def converter(name: str):
  """jdit/convert/<name>.py: the weight import (matches, from_weights) and PyTorch reference of a family."""
  family.get(name)  # a known family
  try:
    return importlib.import_module(f"jdit.convert.{name}")
  except ModuleNotFoundError:
    raise CheckpointError(f"the {name!r} family has no PyTorch weight import") from None


def weight_file(path: str) -> str:
  """The file holding the tensors: `path` itself, or the weights of a diffusers (pipeline) directory."""
  return find_diffusers_weights(path) if os.path.isdir(path) else path


def read_weights(path: str, which: str = "ema") -> tuple[dict, dict]:
  """(tensors, config hints) from a weight file or a diffusers directory (hints: its config.json)."""
  file = weight_file(path)
  hints = (read_json(os.path.join(os.path.dirname(file), "config.json")) or {}) if os.path.isdir(path) else {}
  return select_weights(read_weight_file(file), which, file), hints


def load_checkpoint(path: str, model_family: str | None = None, which: str = "ema", **overrides) -> tuple:
  """(model, params) from a jdit checkpoint directory or PyTorch weights of any family (recognized from the
  tensors unless `model_family` is given). `which` picks the 'ema' or 'model' entry of a training checkpoint;
  `overrides` set model fields the tensors do not determine (heads, dtype, ...)."""
  found = checkpoint.locate(path)
  if found:
    try:
      model, params = checkpoint.load_pretrained(*found, **overrides)
    except ValueError as e:  # the overrides do not fit the stored model: an error about this file
      about = str(e).removeprefix(f"{found[0]} ")  # "DIR holds a ... model: ...": name the path given instead
      raise CheckpointError(f"{path} {about}" if about != str(e) else f"{path}: {e}") from None
    if model_family and model.FAMILY != model_family:
      raise CheckpointError(f"{path}: holds a {model.FAMILY!r} model, expected a {model_family!r} model")
    return model, params
  try:
    weights, hints = read_weights(path, which)
  except CheckpointError as e:
    if not os.path.isdir(path):
      raise
    raise CheckpointError(f"{e}; nor is it {checkpoint.JDIT_FORMS}") from None
  source = weight_file(path)  # errors name the file
  if model_family is None:
    found = [name for name in family.FAMILIES if converter(name).matches(weights)]
    if not found:
      raise CheckpointError(f"{source}: not the weights of a model family {family.FAMILIES} "
                            f"(first key: {next(iter(weights))})")
    model_family = found[0]
  try:
    model, params = converter(model_family).from_weights(weights, hints, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{source}: {e}") from None
  return model, jax.tree.map(jnp.asarray, params)


def load_into(path: str, model) -> dict:
  """Parameters for `model` (a configured model) from `path`, in its layout; CheckpointError naming the first
  parameter that does not fit."""
  fields = family.model_config(model)
  model_family = fields.pop("family")
  _, params = load_checkpoint(path, model_family, **fields)
  try:
    check_params(params, family.abstract_params(model), model.describe())
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  return params


def load_placed(path: str, model, shardings=None, field: str = "config.init_from") -> dict:
  """load_into, placed in `shardings` when given; a CheckpointError becomes a ValueError naming `field`."""
  try:
    params = load_into(path, model)
  except CheckpointError as e:
    raise config_error(field, path, e) from None
  return params if shardings is None else jax.device_put(params, shardings)


def config_error(field: str, path: str, error: CheckpointError) -> ValueError:
  """A ValueError naming the config field and its path once (CheckpointErrors start with the file they name)."""
  text = str(error)
  text = text[len(path) + 1:].lstrip() if text.startswith(path + ":") else text
  return ValueError(f"{field}={path}: {text}")


def load_dit_checkpoint(path: str, which: str = "ema", **overrides) -> tuple:
  """(model, params) from an official DiT checkpoint (.pt: a state dict, or a training checkpoint whose
  `which` entry, 'ema' or 'model', is used), a diffusers DiTTransformer2DModel (directory, .safetensors or
  .bin, with or without config.json) or a jdit checkpoint directory.

  The configuration is inferred from the tensors; `overrides` set any DiT field (num_heads, dtype,
  timestep_freq_shift=1 for diffusers' timestep convention, ...). `model.apply({'params': params}, x, t, y)`.
  """
  return load_checkpoint(path, "dit", which, **overrides)


def load_unet_checkpoint(path: str, **overrides) -> tuple:
  """(model, params) from an official guided-diffusion / improved-diffusion UNetModel state dict
  (256x256_diffusion.pt, 64x64_diffusion.pt, ...; read with weights_only=True) or a jdit checkpoint directory.

  Channels, channel_mult, num_res_blocks, attention resolutions, class conditioning and learned sigma are
  inferred from the tensors; heads are not stored in them: pass num_heads or num_head_channels (64 for the
  released 64, 256 and 512 models, num_heads=4 for the 128 model), and use_new_attention_order=True for the
  64x64 model. `model.apply({'params': params}, x_nhwc, t, y)`.
  """
  return load_checkpoint(path, "unet", **overrides)


def load_mmdit_checkpoint(path: str, **overrides) -> tuple:
  """(model, params) of an SD3 / SD3.5 MM-DiT: a diffusers pipeline directory (its transformer/), a
  SD3Transformer2DModel directory or weight file, Stability's original single file (sd3.5_medium.safetensors:
  model.diffusion_model.* keys), or a jdit checkpoint directory. The architecture is read off the tensors
  (input_size, diffusers' sample_size, from config.json, else 128); `overrides` set any MMDiT field (dtype,
  attention_backend, ...). `model.apply({"params": params}, x_nhwc, t, context, pooled)` with t = sigma * 1000.
  """
  return load_checkpoint(path, "mmdit", **overrides)


def load_flux_checkpoint(path: str, **overrides) -> tuple:
  """(model, params) of a Flux.1 transformer (dev, schnell): a diffusers pipeline directory (its transformer/),
  a FluxTransformer2DModel directory (sharded safetensors) or file, Black Forest Labs' single file
  (flux1-dev.safetensors), or a jdit checkpoint directory. The architecture is read off the tensors; `overrides`
  set any Flux field (dtype, attention_backend, input_size, ...).
  `model.apply({"params": params}, x_nhwc, t, context, pooled, guidance)` with t = sigma * 1000 and guidance the
  distilled scale (dev; None for schnell)."""
  return load_checkpoint(path, "flux", **overrides)
