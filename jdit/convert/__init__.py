"""Weight import: PyTorch DiT checkpoints (official and diffusers) and jdit checkpoints."""
import os

import jax.numpy as jnp
import jax

from jdit import checkpoint
from jdit.convert import dit as dit_convert
from jdit.convert.state_dict import CheckpointError, find_diffusers_weights, read_json, read_weight_file, select_weights
from jdit.models import dit as dit_lib

__all__ = ["CheckpointError", "load_dit_checkpoint", "read_dit_weights"]


def read_dit_weights(path: str, which: str = "ema") -> tuple[dict, dict]:
  """(official-layout tensors, config hints) from an official .pt, a diffusers dir or any weight file."""
  hints = {}
  if os.path.isdir(path):
    weight_file = find_diffusers_weights(path)
    hints = read_json(os.path.join(os.path.dirname(weight_file), "config.json")) or {}
  else:
    weight_file = path
  weights = select_weights(read_weight_file(weight_file), which, weight_file)
  if dit_convert.is_diffusers_layout(weights):
    weights = dit_convert.diffusers_to_official(weights)
  return weights, hints


def load_dit_checkpoint(path: str, which: str = "ema", **overrides) -> tuple[dit_lib.DiT, dict]:
  """(model, params) from an official DiT checkpoint (.pt: a state dict, or a training checkpoint whose
  `which` entry, 'ema' or 'model', is used), a diffusers DiTTransformer2DModel (directory, .safetensors or
  .bin, with or without config.json) or a jdit checkpoint directory.

  The configuration is inferred from the tensors; `overrides` set any DiT field (num_heads, dtype,
  timestep_freq_shift=1 for diffusers' timestep convention, ...). `model.apply({'params': params}, x, t, y)`.
  """
  if os.path.isdir(path) and checkpoint.is_jdit_checkpoint(path):
    return checkpoint.load_pretrained(path, **overrides)
  weights, hints = read_dit_weights(path, which)
  config = {**dit_convert.infer_config(weights, hints), **overrides}
  if "num_heads" not in config:
    raise CheckpointError(f"{path}: cannot infer num_heads for hidden_size={config['hidden_size']}, "
                          f"depth={config['depth']} (no named variant matches); pass num_heads=...")
  try:
    model = dit_lib.dit_from_config(config)
    model.check_config()
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{path}: {e}") from e
  params = dit_convert.official_to_params(weights, model)
  return model, jax.tree.map(jnp.asarray, params)
