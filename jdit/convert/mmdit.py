"""SD3 / SD3.5 transformer weights -> MMDiT (the "mmdit" family).

Two layouts: diffusers' SD3Transformer2DModel (transformer/ of a pipeline, or its .safetensors) and Stability's
original single files (model.diffusion_model.joint_blocks.*: fused qkv, x_block / context_block, and the final
layer's and last context block's adaLN in (shift, scale) order, which diffusers' converter swaps to (scale,
shift)). The architecture is read off the tensors; `input_size` (diffusers' sample_size, which sets the sin-cos
table's base size) comes from config.json or defaults to SD3's 128 and is checked against the stored table.
"""
import re

import numpy as np

from jdit.state_dict import CheckpointError, check_params, merged_path, required, to_flax_tree
from jdit.models import family
from jdit.nn import posemb
from jdit.models import mmdit as mmdit_lib

ORIGINAL_PREFIX = "model.diffusion_model."
RENAMES = (  # diffusers module paths -> jdit's (the rest maps by merged_path)
    ("pos_embed.proj.", "pos_embed_proj."),
    ("time_text_embed.timestep_embedder.linear_1.", "timestep_embedder.mlp_in."),
    ("time_text_embed.timestep_embedder.linear_2.", "timestep_embedder.mlp_out."),
    ("time_text_embed.text_embedder.linear_1.", "text_embedder_linear_1."),
    ("time_text_embed.text_embedder.linear_2.", "text_embedder_linear_2."),
    ("norm1.linear.", "norm1_linear."), ("norm1_context.linear.", "norm1_context_linear."),
    ("norm_out.linear.", "norm_out_linear."), ("net.0.proj.", "net_0_proj."), ("net.2.", "net_2."),
)


def matches(weights: dict) -> bool:
  """SD3 tensors in either layout (Flux's have a context_embedder too, but no patch embedding)."""
  return ("context_embedder.weight" in weights and "pos_embed.proj.weight" in weights) \
      or any(k.startswith(("joint_blocks.", ORIGINAL_PREFIX + "joint_blocks.")) for k in weights)


def _swap_halves(a: np.ndarray) -> np.ndarray:
  """(shift, scale) <-> (scale, shift) along the first axis."""
  first, second = np.split(a, 2)
  return np.concatenate([second, first])


def from_original(weights: dict) -> dict:
  """Stability's single-file keys -> diffusers' keys (what diffusers' SD3 converter does)."""
  weights = {k[len(ORIGINAL_PREFIX):]: v for k, v in weights.items() if k.startswith(ORIGINAL_PREFIX)} \
      if any(k.startswith(ORIGINAL_PREFIX) for k in weights) else dict(weights)
  depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("joint_blocks."))
  out = {"pos_embed.pos_embed": required(weights, "pos_embed")}
  simple = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "context_embedder": "context_embedder",
            "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
            "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
  for theirs, ours in simple.items():
    for leaf in ("weight", "bias"):
      out[f"{ours}.{leaf}"] = required(weights, f"{theirs}.{leaf}")
  for leaf in ("weight", "bias"):
    out[f"norm_out.linear.{leaf}"] = _swap_halves(required(weights, f"final_layer.adaLN_modulation.1.{leaf}"))
  for i in range(depth):
    src, dst, last = f"joint_blocks.{i}.", f"transformer_blocks.{i}.", i == depth - 1
    streams = [("x_block.attn", "attn", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")),
               ("context_block.attn", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                None if last else "to_add_out", ("norm_added_q", "norm_added_k"))]
    if f"{src}x_block.attn2.qkv.weight" in weights:
      streams.append(("x_block.attn2", "attn2", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")))
    for theirs, module, qkv, proj, norms in streams:
      for leaf in ("weight", "bias"):
        for name, part in zip(qkv, np.split(required(weights, f"{src}{theirs}.qkv.{leaf}"), 3)):
          out[f"{dst}{module}.{name}.{leaf}"] = part
        if proj:
          out[f"{dst}{module}.{proj}.{leaf}"] = required(weights, f"{src}{theirs}.proj.{leaf}")
      for name, ln in zip(norms, ("ln_q", "ln_k")):
        if f"{src}{theirs}.{ln}.weight" in weights:
          out[f"{dst}{module}.{name}.weight"] = required(weights, f"{src}{theirs}.{ln}.weight")
    for leaf in ("weight", "bias"):
      out[f"{dst}norm1.linear.{leaf}"] = required(weights, f"{src}x_block.adaLN_modulation.1.{leaf}")
      context = required(weights, f"{src}context_block.adaLN_modulation.1.{leaf}")
      out[f"{dst}norm1_context.linear.{leaf}"] = _swap_halves(context) if last else context
      for stream, ff in (("x_block", "ff"),) + ((("context_block", "ff_context"),) if not last else ()):
        out[f"{dst}{ff}.net.0.proj.{leaf}"] = required(weights, f"{src}{stream}.mlp.fc1.{leaf}")
        out[f"{dst}{ff}.net.2.{leaf}"] = required(weights, f"{src}{stream}.mlp.fc2.{leaf}")
  return out


def kohya_modules(model) -> dict:
  """kohya / sd-scripts LoRA module names (lora_unet_ + Stability's module path, "_"-joined) -> the diffusers
  modules each one's output rows feed, [(module, rows)] (fused q/k/v split in row order; "swap": rows in
  Stability's (shift, scale) order, diffusers' (scale, shift))."""
  dim = model.hidden_size
  out = {"lora_unet_context_embedder": [("context_embedder", dim)],  # (the patch embedding is a convolution)
         "lora_unet_final_layer_linear": [("proj_out", model.patch_size ** 2 * model.out_channels)],
         "lora_unet_final_layer_adaLN_modulation_1": [("norm_out.linear", 2 * dim, "swap")]}
  for theirs, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
    for layer, linear in (("0", "linear_1"), ("2", "linear_2")):
      out[f"lora_unet_{theirs}_mlp_{layer}"] = [(f"time_text_embed.{ours}.{linear}", dim)]
  for i in range(model.depth):
    src, dst, last = f"lora_unet_joint_blocks_{i}_", f"transformer_blocks.{i}.", i == model.depth - 1
    attentions = [("x_block_attn", "attn", ("to_q", "to_k", "to_v"), "to_out.0")]
    attentions.append(("context_block_attn", "attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                       None if last else "to_add_out"))
    if i in model.dual_attention_layers:
      attentions.append(("x_block_attn2", "attn2", ("to_q", "to_k", "to_v"), "to_out.0"))
    for theirs, module, qkv, proj in attentions:
      out[f"{src}{theirs}_qkv"] = [(f"{dst}{module}.{n}", dim) for n in qkv]
      if proj:
        out[f"{src}{theirs}_proj"] = [(f"{dst}{module}.{proj}", dim)]
    for stream, ff in (("x_block", "ff"),) + ((("context_block", "ff_context"),) if not last else ()):
      out[f"{src}{stream}_mlp_fc1"] = [(f"{dst}{ff}.net.0.proj", 4 * dim)]
      out[f"{src}{stream}_mlp_fc2"] = [(f"{dst}{ff}.net.2", dim)]
    out[f"{src}x_block_adaLN_modulation_1"] = [(f"{dst}norm1.linear", (9 if i in model.dual_attention_layers
                                                                        else 6) * dim)]
    out[f"{src}context_block_adaLN_modulation_1"] = [(f"{dst}norm1_context.linear", 2 * dim, "swap") if last
                                                     else (f"{dst}norm1_context.linear", 6 * dim)]
  return out


def infer_config(weights: dict, hints: dict) -> dict:
  """MMDiT fields from diffusers-layout tensors (and config.json hints for what they do not store)."""
  proj = required(weights, "pos_embed.proj.weight")  # (D, C, p, p)
  hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
  depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("transformer_blocks."))
  head_dim = weights["transformer_blocks.0.attn.norm_q.weight"].shape[0] \
      if "transformer_blocks.0.attn.norm_q.weight" in weights else hints.get("attention_head_dim", 64)
  context = required(weights, "context_embedder.weight")  # (D, joint_attention_dim)
  fields = dict(patch_size=patch, in_channels=in_channels, num_heads=hidden // head_dim, head_dim=head_dim,
                depth=depth, joint_attention_dim=context.shape[1],
                pooled_projection_dim=required(weights, "time_text_embed.text_embedder.linear_1.weight").shape[1],
                out_channels=required(weights, "proj_out.weight").shape[0] // patch ** 2,
                dual_attention_layers=tuple(sorted({int(k.split(".")[1]) for k in weights
                                                    if re.match(r"transformer_blocks\.\d+\.attn2\.", k)})),
                qk_norm="transformer_blocks.0.attn.norm_q.weight" in weights,
                input_size=hints.get("sample_size", 128))
  if context.shape[0] != hidden:
    raise CheckpointError(f"context_embedder.weight: caption_projection_dim {context.shape[0]} must equal the "
                          f"hidden size {hidden}")
  if "pos_embed.pos_embed" in weights:
    fields["pos_embed_max_size"] = int(round(np.sqrt(weights["pos_embed.pos_embed"].shape[1])))
  elif "pos_embed_max_size" in hints:
    fields["pos_embed_max_size"] = hints["pos_embed_max_size"]
  return fields


def _rename(key: str) -> str:
  for theirs, ours in RENAMES:
    key = key.replace(theirs, ours)
  return key


def _check_table(stored: np.ndarray, model) -> None:
  """The stored sin-cos table must be the one the model computes (else input_size / sample_size is wrong)."""
  size = model.pos_embed_max_size
  table = posemb.cropped_sincos_2d(model.hidden_size, size, size, size, model.input_hw[0] // model.patch_size)
  if stored.reshape(table.shape).shape != table.shape or np.abs(stored.reshape(table.shape) - table).max() > 1e-4:
    raise CheckpointError(f"pos_embed.pos_embed: the stored sin-cos table differs from the one for "
                          f"input_size={model.input_hw[0]}; pass input_size= (diffusers' sample_size)")


def from_weights(weights: dict, hints: dict, **overrides) -> tuple:
  """(model, params) from SD3 transformer tensors in either layout; `overrides` set any MMDiT field."""
  if any(k.startswith(("joint_blocks.", ORIGINAL_PREFIX + "joint_blocks.")) for k in weights):
    weights = from_original(weights)
  fields = {**infer_config(weights, hints), **overrides}
  unknown = sorted(set(overrides) - set(mmdit_lib.MMDiT.__dataclass_fields__))
  if unknown:
    raise ValueError(f"unknown MMDiT field(s): {', '.join(unknown)}")
  model = mmdit_lib.MMDiT(**fields)
  stored = weights.get("pos_embed.pos_embed")
  if stored is not None and model.pos_embed == "sincos":
    _check_table(np.asarray(stored, np.float32), model)
  tensors = {_rename(k): np.asarray(v, np.float32) for k, v in weights.items() if k != "pos_embed.pos_embed"}
  params = to_flax_tree(tensors, merged_path)  # per-block: checked before the runs are stacked
  check_params(params, family.abstract_params(model.clone(scan_blocks=False)), model.describe())
  return model, mmdit_lib.stack_runs(params, model)


def torch_reference(model: mmdit_lib.MMDiT):
  """(diffusers' SD3Transformer2DModel shaped as `model`, forward(x, t, (context, pooled))) for tools/bench.py."""
  from diffusers import SD3Transformer2DModel
  net = SD3Transformer2DModel(
      sample_size=model.input_hw[0], patch_size=model.patch_size, in_channels=model.in_channels,
      num_layers=model.depth, attention_head_dim=model.head_dim, num_attention_heads=model.num_heads,
      joint_attention_dim=model.joint_attention_dim, caption_projection_dim=model.hidden_size,
      pooled_projection_dim=model.pooled_projection_dim, out_channels=model.out_channels,
      pos_embed_max_size=model.pos_embed_max_size, dual_attention_layers=tuple(model.dual_attention_layers),
      qk_norm="rms_norm" if model.qk_norm else None)
  return net, lambda x, t, cond: net(x, cond[0], cond[1], t).sample
