"""Flux.1 transformer weights -> Flux (the "flux" family).

Two layouts: diffusers' FluxTransformer2DModel (transformer/ of a pipeline: sharded safetensors with an index, or
one file) and Black Forest Labs' single files (flux1-dev.safetensors: double_blocks.N.img_attn.qkv fused q/k/v,
single_blocks.N.linear1 fused q/k/v and MLP input, linear2, the final layer's adaLN in (shift, scale) order,
which diffusers' converter swaps to (scale, shift); optionally under model.diffusion_model.). The architecture is
read off the tensors; the RoPE axis dims, which they do not store, come from config.json or Flux.1's (16, 56, 56).
"""
import numpy as np

from jdit.convert.mmdit import RENAMES as MMDIT_RENAMES, _swap_halves
from jdit.models import family
from jdit.models import flux as flux_lib
from jdit.state_dict import CheckpointError, check_params, merged_path, required, to_flax_tree

PREFIX = "model.diffusion_model."
RENAMES = MMDIT_RENAMES + (  # diffusers module paths -> jdit's (the rest maps by merged_path)
    ("time_text_embed.guidance_embedder.linear_1.", "guidance_embedder.mlp_in."),
    ("time_text_embed.guidance_embedder.linear_2.", "guidance_embedder.mlp_out."),
    ("norm.linear.", "norm_linear."),
)
FLUX1_AXES = (16, 56, 56)  # Flux.1's RoPE axis dims (head_dim 128)


def is_bfl(weights: dict) -> bool:
  return any(k.startswith(("double_blocks.", PREFIX + "double_blocks.")) for k in weights)


def matches(weights: dict) -> bool:
  return is_bfl(weights) or ("x_embedder.weight" in weights and "context_embedder.weight" in weights)


def _count(weights: dict, prefix: str) -> int:
  """Blocks under `prefix` (their largest index + 1; 0 when none)."""
  return 1 + max((int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix)), default=-1)


def _linear(out: dict, weights: dict, theirs: str, ours: str) -> None:
  for leaf in ("weight", "bias"):
    out[f"{ours}.{leaf}"] = required(weights, f"{theirs}.{leaf}")


def _split(out: dict, weights: dict, theirs: str, ours: tuple, sizes: tuple) -> None:
  """A fused linear (rows q | k | v | ...) into the separate linears `ours`."""
  for leaf in ("weight", "bias"):
    parts = np.split(required(weights, f"{theirs}.{leaf}"), np.cumsum(sizes)[:-1])
    for name, part in zip(ours, parts):
      out[f"{name}.{leaf}"] = part


def from_bfl(weights: dict) -> dict:
  """Black Forest Labs' single-file keys -> diffusers' keys (what diffusers' Flux single-file converter does)."""
  if any(k.startswith(PREFIX) for k in weights):
    weights = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
  dim = required(weights, "img_in.weight").shape[0]
  out = {}
  for theirs, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                       ("guidance_in", "guidance_embedder")):
    if theirs == "guidance_in" and "guidance_in.in_layer.weight" not in weights:
      continue  # schnell: no guidance embedding
    _linear(out, weights, f"{theirs}.in_layer", f"time_text_embed.{ours}.linear_1")
    _linear(out, weights, f"{theirs}.out_layer", f"time_text_embed.{ours}.linear_2")
  _linear(out, weights, "txt_in", "context_embedder")
  _linear(out, weights, "img_in", "x_embedder")
  for i in range(_count(weights, "double_blocks.")):
    src, dst = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    _linear(out, weights, f"{src}img_mod.lin", f"{dst}norm1.linear")
    _linear(out, weights, f"{src}txt_mod.lin", f"{dst}norm1_context.linear")
    for stream, names, proj, norms in (("img", ("to_q", "to_k", "to_v"), "to_out.0", ("norm_q", "norm_k")),
                                       ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                                        ("norm_added_q", "norm_added_k"))):
      _split(out, weights, f"{src}{stream}_attn.qkv", tuple(f"{dst}attn.{n}" for n in names), (dim,) * 3)
      _linear(out, weights, f"{src}{stream}_attn.proj", f"{dst}attn.{proj}")
      for name, norm in zip(norms, ("query_norm", "key_norm")):
        out[f"{dst}attn.{name}.weight"] = required(weights, f"{src}{stream}_attn.norm.{norm}.scale")
      ff = "ff" if stream == "img" else "ff_context"
      _linear(out, weights, f"{src}{stream}_mlp.0", f"{dst}{ff}.net.0.proj")
      _linear(out, weights, f"{src}{stream}_mlp.2", f"{dst}{ff}.net.2")
  for i in range(_count(weights, "single_blocks.")):
    src, dst = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    _linear(out, weights, f"{src}modulation.lin", f"{dst}norm.linear")
    mlp = required(weights, f"{src}linear1.weight").shape[0] - 3 * dim
    _split(out, weights, f"{src}linear1", tuple(f"{dst}{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                       "proj_mlp")), (dim, dim, dim, mlp))
    for name, norm in (("norm_q", "query_norm"), ("norm_k", "key_norm")):
      out[f"{dst}attn.{name}.weight"] = required(weights, f"{src}norm.{norm}.scale")
    _linear(out, weights, f"{src}linear2", f"{dst}proj_out")
  _linear(out, weights, "final_layer.linear", "proj_out")
  for leaf in ("weight", "bias"):
    out[f"norm_out.linear.{leaf}"] = _swap_halves(required(weights, f"final_layer.adaLN_modulation.1.{leaf}"))
  return out


def kohya_modules(model) -> dict:
  """kohya / sd-scripts LoRA module names (lora_unet_ + Black Forest Labs' module path, "_"-joined) -> the
  diffusers modules each one's output rows feed, [(module, rows)], fused q/k/v and linear1 split in row order
  ("swap": the final adaLN's rows in (shift, scale) order, diffusers' (scale, shift))."""
  dim, mlp = model.hidden_size, int(model.hidden_size * model.mlp_ratio)
  out = {"lora_unet_img_in": [("x_embedder", dim)], "lora_unet_txt_in": [("context_embedder", dim)],
         "lora_unet_final_layer_linear": [("proj_out", 4 * model.out_channels)],
         "lora_unet_final_layer_adaLN_modulation_1": [("norm_out.linear", 2 * dim, "swap")]}
  for theirs, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                       ("guidance_in", "guidance_embedder")):
    for layer, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
      out[f"lora_unet_{theirs}_{layer}"] = [(f"time_text_embed.{ours}.{linear}", dim)]
  for i in range(model.depth):
    src, dst = f"lora_unet_double_blocks_{i}_", f"transformer_blocks.{i}."
    for stream, names, proj, ff, mod in (
        ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1.linear"),
        ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context.linear")):
      out[f"{src}{stream}_attn_qkv"] = [(f"{dst}attn.{n}", dim) for n in names]
      out[f"{src}{stream}_attn_proj"] = [(f"{dst}attn.{proj}", dim)]
      out[f"{src}{stream}_mlp_0"] = [(f"{dst}{ff}.net.0.proj", 4 * dim)]
      out[f"{src}{stream}_mlp_2"] = [(f"{dst}{ff}.net.2", dim)]
      out[f"{src}{stream}_mod_lin"] = [(f"{dst}{mod}", 6 * dim)]
  for i in range(model.single_depth):
    src, dst = f"lora_unet_single_blocks_{i}_", f"single_transformer_blocks.{i}."
    out[f"{src}linear1"] = [(f"{dst}attn.to_q", dim), (f"{dst}attn.to_k", dim), (f"{dst}attn.to_v", dim),
                            (f"{dst}proj_mlp", mlp)]
    out[f"{src}linear2"] = [(f"{dst}proj_out", dim)]
    out[f"{src}modulation_lin"] = [(f"{dst}norm.linear", 3 * dim)]
  return out


def infer_config(weights: dict, hints: dict) -> dict:
  """Flux fields from diffusers-layout tensors (and config.json hints for the RoPE axes they do not store)."""
  embed = required(weights, "x_embedder.weight")  # (D, C p p)
  dim, head_dim = embed.shape[0], required(weights, "transformer_blocks.0.attn.norm_q.weight").shape[0]
  guidance = "time_text_embed.guidance_embedder.linear_1.weight" in weights
  fields = dict(in_channels=embed.shape[1] // 4, out_channels=required(weights, "proj_out.weight").shape[0] // 4,
                num_heads=dim // head_dim, head_dim=head_dim, depth=_count(weights, "transformer_blocks."),
                single_depth=_count(weights, "single_transformer_blocks."),
                joint_attention_dim=required(weights, "context_embedder.weight").shape[1],
                pooled_projection_dim=required(weights, "time_text_embed.text_embedder.linear_1.weight").shape[1],
                guidance_embeds=guidance, text_length=512 if guidance else 256)
  if "single_transformer_blocks.0.proj_mlp.weight" in weights:
    fields["mlp_ratio"] = weights["single_transformer_blocks.0.proj_mlp.weight"].shape[0] / dim
  if "axes_dims_rope" in hints:
    fields["axes_dims_rope"] = tuple(hints["axes_dims_rope"])
  elif head_dim == sum(FLUX1_AXES):
    fields["axes_dims_rope"] = FLUX1_AXES
  return fields


def _rename(key: str) -> str:
  for theirs, ours in RENAMES:
    key = key.replace(theirs, ours)
  return key


def from_weights(weights: dict, hints: dict, **overrides) -> tuple:
  """(model, params) from Flux transformer tensors in either layout; `overrides` set any Flux field."""
  if is_bfl(weights):
    weights = from_bfl(weights)
  unknown = sorted(set(overrides) - set(flux_lib.Flux.__dataclass_fields__))
  if unknown:
    raise ValueError(f"unknown Flux field(s): {', '.join(unknown)}")
  fields = {**infer_config(weights, hints), **overrides}
  if "axes_dims_rope" not in fields:
    raise CheckpointError(f"the RoPE axis dims are not stored in the tensors (head_dim {fields['head_dim']}, not "
                          f"Flux.1's {sum(FLUX1_AXES)}): pass axes_dims_rope=")
  model = flux_lib.Flux(**fields)
  model.check_config()
  params = to_flax_tree({_rename(k): np.asarray(v, np.float32) for k, v in weights.items()}, merged_path)
  check_params(params, family.abstract_params(model.clone(scan_blocks=False)), model.describe())
  return model, flux_lib.stack_runs(params, model)


def torch_reference(model: flux_lib.Flux):
  """(diffusers' FluxTransformer2DModel shaped as `model`, forward(x, t, cond)) for tools/bench.py: NCHW latents
  packed as FluxPipeline packs them, t = sigma * 1000, cond = (context, pooled)."""
  import torch
  from diffusers import FluxPipeline, FluxTransformer2DModel
  net = FluxTransformer2DModel(
      patch_size=1, in_channels=4 * model.in_channels, out_channels=4 * model.out_channels, num_layers=model.depth,
      num_single_layers=model.single_depth, attention_head_dim=model.head_dim, num_attention_heads=model.num_heads,
      joint_attention_dim=model.joint_attention_dim, pooled_projection_dim=model.pooled_projection_dim,
      guidance_embeds=model.guidance_embeds, axes_dims_rope=tuple(model.axes_dims_rope))

  def forward(x, t, cond):
    batch, channels, height, width = x.shape
    ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
    guidance = torch.full((batch,), model.embedded_guidance) if model.guidance_embeds else None
    out = net(FluxPipeline._pack_latents(x, batch, channels, height, width), cond[0], cond[1], t / 1000,
              ids, torch.zeros(cond[0].shape[1], 3), guidance).sample
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)

  return net, forward
