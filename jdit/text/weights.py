"""PyTorch text-encoder weights -> (encoder, Flax params), for CLIP and T5, from the layouts people have on disk.

    transformers   text_model.* + text_projection.weight (CLIPTextModel[WithProjection], CLIPModel's text tower,
                   SD3's text_encoders/clip_{l,g}.safetensors); shared.weight + encoder.* (T5EncoderModel,
                   T5ForConditionalGeneration, SD3's t5xxl_*.safetensors)
    OpenCLIP       token_embedding, positional_embedding, transformer.resblocks.* with fused in_proj, ln_final,
                   text_projection (D, P); also under Stable Diffusion checkpoint prefixes
                   (cond_stage_model.model., conditioner.embedders.1.model.)
The architecture comes from config.json where there is one, else from the tensors (CLIP heads: width / 64;
activation: quick_gelu for the 768-wide OpenAI tower, gelu for OpenCLIP).
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.state_dict import CheckpointError, check_params, read_json, read_weight_file, required
from jdit.text.clip import CLIP_PRESETS, CLIPTextEncoder
from jdit.text.t5 import T5_PRESETS, T5Encoder

WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "model.fp16.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model.fp16.bin")
CLIP_CONFIG_FIELDS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
                      "intermediate_size": "intermediate_size", "num_hidden_layers": "num_layers",
                      "num_attention_heads": "num_heads", "max_position_embeddings": "max_positions",
                      "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps", "eos_token_id": "eos_token_id"}
T5_CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                    "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj",
                    "layer_norm_epsilon")


# ----------------------------------------------------------------------------------------------
#                                       Finding the files
# ----------------------------------------------------------------------------------------------

def weight_file(path: str) -> tuple[str, dict | None]:
  """(weight file, config.json contents or None) of a file or a transformers directory."""
  if os.path.isfile(path):
    return path, read_json(os.path.join(os.path.dirname(path), "config.json"))
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: no such file or directory")
  for name in WEIGHT_NAMES:
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name), read_json(os.path.join(path, "config.json"))
  encoders = sorted(d for d in os.listdir(path) if d.startswith("text_encoder"))
  if encoders:
    raise CheckpointError(f"{path}: a pipeline directory; pass one of its text encoders: "
                          f"{', '.join(os.path.join(path, d) for d in encoders)}")
  raise CheckpointError(f"{path}: no text-encoder weights found (looked for {', '.join(WEIGHT_NAMES)})")


def _prefix(weights: dict, suffix: str) -> str | None:
  """The prefix of the shortest key ending with `suffix`, or None."""
  keys = sorted((k for k in weights if k == suffix or k.endswith("." + suffix)), key=len)
  return keys[0][:-len(suffix)] if keys else None


# ----------------------------------------------------------------------------------------------
#                                             CLIP
# ----------------------------------------------------------------------------------------------

def _clip_layer(get, prefix: str, openclip: bool) -> dict:
  """One layer's PyTorch tensors -> the CLIPLayer parameter tree."""
  linear = lambda name: {"kernel": get(f"{prefix}{name}.weight").T, "bias": get(f"{prefix}{name}.bias")}
  norm = lambda name: {"scale": get(f"{prefix}{name}.weight"), "bias": get(f"{prefix}{name}.bias")}
  if not openclip:
    return {"layer_norm1": norm("layer_norm1"), "layer_norm2": norm("layer_norm2"),
            "self_attn": {n: linear(f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "fc1": linear("mlp.fc1"), "fc2": linear("mlp.fc2")}
  qkv_w, qkv_b = get(f"{prefix}attn.in_proj_weight"), get(f"{prefix}attn.in_proj_bias")  # (3D, D), (3D,)
  attn = {n: {"kernel": w.T, "bias": b} for n, w, b in zip(("q_proj", "k_proj", "v_proj"),
                                                          np.split(qkv_w, 3), np.split(qkv_b, 3))}
  attn["out_proj"] = linear("attn.out_proj")
  return {"layer_norm1": norm("ln_1"), "layer_norm2": norm("ln_2"), "self_attn": attn,
          "fc1": linear("mlp.c_fc"), "fc2": linear("mlp.c_proj")}


def _clip_params(weights: dict) -> tuple[dict, dict]:
  """(architecture fields from the tensors, per-layer parameter tree) of a CLIP text tower in either layout."""
  hf = _prefix(weights, "embeddings.token_embedding.weight")
  openclip = hf is None
  root = _prefix(weights, "token_embedding.weight") if openclip else hf
  get = lambda key: required(weights, key)
  if openclip:
    layer_prefix, final, projection_key = f"{root}transformer.resblocks.", f"{root}ln_final", f"{root}text_projection"
    positions = get(f"{root}positional_embedding")
  else:
    layer_prefix, final = f"{root}encoder.layers.", f"{root}final_layer_norm"
    outer = root.removesuffix("text_model.")
    projection_key = f"{outer}text_projection.weight"
    positions = get(f"{root}embeddings.position_embedding.weight")
  count = 1 + max(int(k[len(layer_prefix):].split(".")[0]) for k in weights if k.startswith(layer_prefix))
  tokens = get(f"{root}token_embedding.weight" if openclip else f"{root}embeddings.token_embedding.weight")
  params = {"token_embedding": {"embedding": tokens}, "position_embedding": positions,
            "final_layer_norm": {"scale": get(f"{final}.weight"), "bias": get(f"{final}.bias")}}
  for i in range(count):
    params[f"layers_{i}"] = _clip_layer(get, f"{layer_prefix}{i}.", openclip)
  projection = 0
  if projection_key in weights:
    matrix = get(projection_key)  # OpenCLIP: (D, P) used as x @ W; transformers: a Linear's (P, D)
    params["text_projection"] = {"kernel": matrix if openclip else matrix.T}
    projection = params["text_projection"]["kernel"].shape[1]
  width = tokens.shape[1]
  arch = dict(vocab_size=tokens.shape[0], hidden_size=width, max_positions=positions.shape[0], num_layers=count,
              intermediate_size=params["layers_0"]["fc1"]["kernel"].shape[1], num_heads=width // 64,
              projection_dim=projection, hidden_act="quick_gelu" if width == 768 else "gelu")
  return arch, params


# ----------------------------------------------------------------------------------------------
#                                              T5
# ----------------------------------------------------------------------------------------------

def _t5_params(weights: dict) -> tuple[dict, dict]:
  get = lambda key: required(weights, key)
  shared_key = "shared.weight" if "shared.weight" in weights else "encoder.embed_tokens.weight"
  shared = get(shared_key)
  block = "encoder.block."
  count = 1 + max(int(k[len(block):].split(".")[0]) for k in weights if k.startswith(block))
  table = get(f"{block}0.layer.0.SelfAttention.relative_attention_bias.weight")  # (buckets, H)
  params = {"shared": {"embedding": shared}, "relative_attention_bias": table,
            "final_layer_norm": {"scale": get("encoder.final_layer_norm.weight")}}
  gated = f"{block}0.layer.1.DenseReluDense.wi_0.weight" in weights
  for i in range(count):
    p = f"{block}{i}.layer."
    layer = {n: {"kernel": get(f"{p}0.SelfAttention.{n}.weight").T} for n in ("q", "k", "v", "o")}
    for n in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
      layer[n] = {"kernel": get(f"{p}1.DenseReluDense.{n}.weight").T}
    layer["attention_norm"] = {"scale": get(f"{p}0.layer_norm.weight")}
    layer["ffn_norm"] = {"scale": get(f"{p}1.layer_norm.weight")}
    params[f"layers_{i}"] = layer
  heads = table.shape[1]
  arch = dict(vocab_size=shared.shape[0], d_model=shared.shape[1], num_layers=count, num_heads=heads,
              d_kv=params["layers_0"]["q"]["kernel"].shape[1] // heads, relative_attention_num_buckets=table.shape[0],
              d_ff=params["layers_0"]["wo"]["kernel"].shape[0], feed_forward_proj="gated-gelu" if gated else "relu")
  return arch, params


# ----------------------------------------------------------------------------------------------
#                                         Entry points
# ----------------------------------------------------------------------------------------------

def layer_layout(params: dict, scan_layers: bool) -> dict:
  """Per-layer "layers_{i}" subtrees -> the scanned layout {"layers": {"layer": stacked}} when scan_layers."""
  params = dict(params)
  if scan_layers and "layers_0" in params:
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    params["layers"] = {"layer": jax.tree.map(lambda *leaves: np.stack(leaves), *[params.pop(k) for k in names])}
  return params


def create_text_encoder(name: str, **overrides):
  """A released architecture by preset name (clip-l, clip-h, clip-g, t5-xxl, t5-xl, t5-base), fields overridden
  (e.g. dtype="bfloat16"); random weights come from encoder.init, real ones from load_text_encoder."""
  if name in CLIP_PRESETS:
    return CLIPTextEncoder(**{**CLIP_PRESETS[name], **overrides})
  if name in T5_PRESETS:
    return T5Encoder(**{**T5_PRESETS[name], **overrides})
  raise ValueError(f"text encoder must be one of {', '.join([*CLIP_PRESETS, *T5_PRESETS])}, got {name!r}")


def _config_fields(config: dict | None, kind: str) -> dict:
  """Encoder fields from a transformers config.json (CLIPTextConfig, CLIPConfig's text_config, T5Config)."""
  if not config:
    return {}
  if kind == "clip":
    config = config.get("text_config", config)
    return {ours: config[theirs] for theirs, ours in CLIP_CONFIG_FIELDS.items() if theirs in config}
  if config.get("model_type") not in (None, "t5"):
    raise CheckpointError(f"config.json model_type={config['model_type']!r}: only T5 (v1.1 and original) "
                          "encoders are supported")
  return {k: config[k] for k in T5_CONFIG_FIELDS if k in config}


def encoder_from_weights(weights: dict, config: dict | None = None, **overrides):
  """(encoder, params) from a flat state dict and an optional transformers config; overrides set encoder fields
  (dtype, scan_layers, remat, or architecture fields the tensors cannot tell)."""
  if _prefix(weights, "token_embedding.weight") is not None:
    kind, cls, (arch, params) = "clip", CLIPTextEncoder, _clip_params(weights)
  elif "shared.weight" in weights or "encoder.embed_tokens.weight" in weights:
    kind, cls, (arch, params) = "t5", T5Encoder, _t5_params(weights)
  else:
    raise CheckpointError("neither a CLIP text tower (token_embedding.weight) nor a T5 encoder (shared.weight) "
                          f"found among {len(weights)} tensors (e.g. {', '.join(sorted(weights)[:3])})")
  fields = {**arch, **_config_fields(config, kind)}
  known = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)} (fields: {', '.join(sorted(known))})")
  encoder = cls(**{**fields, **overrides})
  params = layer_layout(params, encoder.scan_layers)
  ids = jnp.zeros((1, min(8, getattr(encoder, "max_positions", 8))), jnp.int32)
  expected = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), ids))["params"]
  check_params(params, nn.unbox(expected), f"{cls.__name__}({encoder.num_layers} layers, width {encoder.width})")
  return encoder, params


def load_text_encoder(path: str, **overrides):
  """(encoder, params) of a CLIP or T5 text encoder: a transformers directory (config.json + model.safetensors,
  sharded, or pytorch_model.bin read with weights_only=True), a diffusers pipeline's text_encoder* subfolder, or
  one weight file (SD3's text_encoders/clip_g.safetensors, OpenCLIP open_clip_pytorch_model.bin, ...).
  Overrides set encoder fields, e.g. dtype="bfloat16", scan_layers=False."""
  file, config = weight_file(path)
  weights = read_weight_file(file)
  if any(isinstance(v, dict) for v in weights.values()):
    weights = weights.get("state_dict", weights)
  try:
    return encoder_from_weights(weights, config, **overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{file}: {e}") from e
