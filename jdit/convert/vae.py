"""Stable Diffusion VAE weights -> jdit's AutoencoderKL parameters.

Sources: diffusers AutoencoderKL (a directory with config.json, a pipeline directory's vae/ subfolder, or a
single .safetensors / .bin), original latent-diffusion / Stable Diffusion checkpoints (`first_stage_model.*` keys
in a .ckpt or .safetensors, or a bare VAE file with `encoder.down.N` keys), and, when online, a Hugging Face
repo id such as stabilityai/sd-vae-ft-ema. Original keys are renamed to diffusers' first.
"""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.state_dict import (CheckpointError, check_params, find_diffusers_weights, merged_path, read_json,
                                     read_weight_file, select_weights, to_flax_tree)
from jdit.models import vae as vae_lib

_LDM_PREFIX = "first_stage_model."
_LDM_RENAMES = (  # original latent-diffusion names -> diffusers names (decoder up blocks handled separately)
    (r"encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0."),
    (r"(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1."),
    (r"(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"(encoder|decoder)\.mid\.attn_1\.([qkv])\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
)
_LDM_UP = re.compile(r"decoder\.up\.(\d+)\.(block\.(\d+)|upsample\.conv)\.(.*)")


def is_ldm_layout(weights: dict) -> bool:
  return any(k.startswith((_LDM_PREFIX + "encoder.", "encoder.down.")) for k in weights)


def ldm_to_diffusers(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Original (first_stage_model.*) keys -> diffusers AutoencoderKL keys; 1x1-conv attention -> linear."""
  if any(k.startswith(_LDM_PREFIX) for k in weights):
    weights = {k[len(_LDM_PREFIX):]: v for k, v in weights.items() if k.startswith(_LDM_PREFIX)}
  num_up = 1 + max(int(m.group(1)) for m in map(_LDM_UP.match, weights) if m)
  out = {}
  for key, value in weights.items():
    up = _LDM_UP.match(key)
    if up:  # the original decoder indexes its up blocks from the lowest resolution
      block = num_up - 1 - int(up.group(1))
      inner = f"resnets.{up.group(3)}" if up.group(3) is not None else "upsamplers.0.conv"
      key = f"decoder.up_blocks.{block}.{inner}.{up.group(4)}"
    for pattern, replacement in _LDM_RENAMES:
      key = re.sub(pattern, replacement, key)
    if ".attentions.0.to_" in key and value.ndim == 4:
      value = value[:, :, 0, 0]
    out[key.replace(".nin_shortcut.", ".conv_shortcut.")] = value
  return out


def _flax_path(key: str) -> tuple[list[str], str]:
  """"encoder.down_blocks.0.resnets.1.conv1.weight" -> (["encoder", "down_blocks_0_resnets_1", "conv1"], "weight")."""
  path, leaf = merged_path(key)
  if len(path) > 2 and path[1].startswith(("down_blocks_", "up_blocks_")):
    merged = 3 if path[2].startswith(("downsamplers_", "upsamplers_")) else 2  # block, resnet | sampler, conv
    path = path[:1] + ["_".join(path[1:1 + merged])] + path[1 + merged:]
  return path, leaf


def diffusers_to_params(weights: dict[str, np.ndarray]) -> dict:
  """diffusers AutoencoderKL tensors -> the Flax parameter tree (convs HWIO, linears transposed)."""
  return to_flax_tree(weights, _flax_path)


def infer_vae_config(weights: dict[str, np.ndarray], hints: dict) -> dict:
  """AutoencoderKL fields from diffusers-layout tensors, completed by config.json `hints`."""
  for key in ("encoder.conv_in.weight", "encoder.conv_out.weight"):
    if key not in weights:
      raise CheckpointError(f"missing key {key!r}: not an AutoencoderKL checkpoint")
  widths, i = [], 0
  while f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in weights:
    widths.append(weights[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
    i += 1
  layers = sum(1 for k in weights if re.fullmatch(r"encoder\.down_blocks\.0\.resnets\.\d+\.conv1\.weight", k))
  config = dict(block_out_channels=tuple(widths), layers_per_block=layers,
                latent_channels=weights["encoder.conv_out.weight"].shape[0] // 2,  # mean and logvar
                use_quant_conv="quant_conv.weight" in weights,  # SD3 / Flux VAEs have neither quant conv
                use_post_quant_conv="post_quant_conv.weight" in weights)
  for field in ("norm_num_groups", "scaling_factor", "shift_factor"):
    if hints.get(field) is not None:  # diffusers writes shift_factor: null for VAEs without a shift
      config[field] = hints[field]
  return config


def _resolve(path: str) -> tuple[str, dict]:
  """(weight file, config.json contents) for a path or, when online, a Hugging Face repo id."""
  if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
    try:
      from huggingface_hub import snapshot_download
      path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "vae/*"])
    except Exception as e:  # offline, unknown repo, or huggingface_hub missing
      raise CheckpointError(f"{path}: not a local path, and fetching it from the Hugging Face Hub failed "
                            f"({type(e).__name__})") from e
  if os.path.isdir(path):
    weight_file = find_diffusers_weights(path, subfolder="vae")
    return weight_file, read_json(os.path.join(os.path.dirname(weight_file), "config.json")) or {}
  return path, {}


def load_vae(path: str, name: str = "sd", **overrides) -> tuple[vae_lib.AutoencoderKL, dict]:
  """(vae, params) from diffusers or original SD VAE weights; `name` picks defaults (scaling factor)."""
  weight_file, hints = _resolve(path)
  weights = select_weights(read_weight_file(weight_file), "ema", weight_file)
  if is_ldm_layout(weights):
    weights = ldm_to_diffusers(weights)
  config = {**vae_lib.VAE_CONFIGS[name], **infer_vae_config(weights, hints), **overrides}
  vae = vae_lib.AutoencoderKL(**config)
  params = diffusers_to_params({k: v for k, v in weights.items() if k.startswith(
      ("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))})
  probe = jnp.zeros((1, 16, 16, 3))
  expected = nn.unbox(jax.eval_shape(vae.init, jax.random.key(0), probe)["params"])
  check_params(params, expected, f"AutoencoderKL{tuple(config['block_out_channels'])}")
  return vae, jax.tree.map(jnp.asarray, params)
