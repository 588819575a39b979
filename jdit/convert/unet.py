"""guided-diffusion / improved-diffusion UNetModel state dicts -> jdit U-Net parameters.

The structure (model_channels, channel_mult, num_res_blocks, attention resolutions, resampling blocks, AdaGN,
class conditioning, learned sigma) is read off the tensors. Heads, the attention order, dropout and the input
size leave no trace in them: they come from the overrides, else from the ADM preset with this exact structure
(the released ImageNet models), else a one-line error asks for the heads.
"""
import numpy as np

from jdit.state_dict import CheckpointError, check_params, to_flax_tree
from jdit.models import family, unet as unet_lib

_NOT_STORED = ("num_heads", "num_head_channels", "num_heads_upsample", "use_new_attention_order", "dropout",
               "input_size")


def matches(weights: dict) -> bool:
  return "input_blocks.0.0.weight" in weights and "time_embed.0.weight" in weights


def _require(weights: dict, key: str) -> np.ndarray:
  if key not in weights:
    raise CheckpointError(f"missing key {key!r}: not a guided-diffusion UNetModel checkpoint")
  return weights[key]


def _block_indices(weights: dict, prefix: str) -> list[int]:
  return sorted({int(k.split(".")[1]) for k in weights if k.startswith(prefix + ".")})


def _structure(weights: dict, levels: int, res_blocks: int) -> dict:
  """The UNet fields implied by the tensors if the model has `levels` levels of `res_blocks` blocks."""
  mc = _require(weights, "time_embed.0.weight").shape[1]
  first = lambda level: 1 + level * (res_blocks + 1)  # input block index of a level's first residual block
  widths = [_require(weights, f"input_blocks.{first(level)}.0.out_layers.3.weight").shape[0]
            for level in range(levels)]
  down = f"input_blocks.{res_blocks + 1}.0"  # the first downsampling block (when levels > 1)
  in_channels = _require(weights, "input_blocks.0.0.weight").shape[1]
  out_channels = _require(weights, "out.2.weight").shape[0]
  if out_channels not in (in_channels, 2 * in_channels):
    raise CheckpointError(f"out.2.weight: {out_channels} output channels for {in_channels} input channels; "
                          "expected equal (no learned sigma) or double (learned sigma)")
  emb_width = _require(weights, "input_blocks.1.0.emb_layers.1.weight").shape[0]
  table = weights.get("label_emb.weight")
  return dict(
      model_channels=mc, in_channels=in_channels, num_res_blocks=res_blocks, learn_sigma=out_channels != in_channels,
      channel_mult=tuple(int(w // mc) if w % mc == 0 else w / mc for w in widths),
      attention_resolutions=tuple(2 ** level for level in range(levels)
                                  if f"input_blocks.{first(level)}.1.qkv.weight" in weights),
      use_scale_shift_norm=emb_width == 2 * widths[0], resblock_updown=f"{down}.in_layers.0.weight" in weights,
      conv_resample=levels == 1 or f"{down}.op.weight" in weights or f"{down}.in_layers.0.weight" in weights,
      num_classes=0 if table is None else table.shape[0], class_dropout_prob=0.0)


def infer_config(weights: dict) -> dict:
  """UNet fields implied by the tensors: the (levels, blocks per level) whose parameter tree fits them."""
  for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"):
    _require(weights, key)
  outputs = len(_block_indices(weights, "output_blocks"))  # levels x (num_res_blocks + 1)
  if not outputs:
    raise CheckpointError("no 'output_blocks.N.*' keys: not a guided-diffusion UNetModel checkpoint")
  params = to_params(weights)
  for levels in range(1, outputs + 1):
    if outputs % levels:
      continue
    try:
      fields = _structure(weights, levels, outputs // levels - 1)
      # heads do not change the parameter shapes; the smallest input the levels allow
      model = unet_lib.UNet(**fields, num_head_channels=32, input_size=2 ** (levels - 1))
      check_params(params, family.abstract_params(model), model.describe())
      return fields
    except (CheckpointError, ValueError, KeyError):
      continue
  raise CheckpointError("the input_blocks / output_blocks tensors fit no UNetModel structure")


def to_params(weights: dict[str, np.ndarray]) -> dict:
  """UNetModel tensors -> the Flax parameter tree (convs HWIO, 1x1 conv1d and linear weights transposed)."""
  rename = lambda key: key.replace("label_emb.weight", "label_emb.embedding_table.weight")
  return to_flax_tree({rename(k): v for k, v in weights.items()}, embeddings=("embedding_table",))


def _preset_fields(config: dict) -> dict:
  """The fields the tensors do not store, from the ADM preset of the same structure (empty if none)."""
  keys = ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "in_channels")
  for preset in unet_lib.PRESETS.values():
    if all(preset[k] == config[k] for k in keys):
      return {k: preset[k] for k in _NOT_STORED if k in preset}
  return {}


def from_weights(weights: dict, hints: dict, **overrides) -> tuple[unet_lib.UNet, dict]:
  """(model, params) from UNetModel tensors; `overrides` set any UNet field (heads: see the module docstring)."""
  del hints  # guided-diffusion stores no config next to its weights
  inferred = infer_config(weights)
  config = {**inferred, **_preset_fields(inferred), **overrides}
  if "num_heads" not in config and "num_head_channels" not in config:
    raise CheckpointError("the number of attention heads is not stored in UNetModel weights and no ADM preset has "
                          "this structure: pass num_heads=... or num_head_channels=...")
  try:
    model = unet_lib.UNet(**config)
    model.check_config()
  except (ValueError, TypeError) as e:
    raise CheckpointError(str(e)) from e
  params = to_params(weights)
  check_params(params, family.abstract_params(model), model.describe())
  return model, params


def torch_reference(model: unet_lib.UNet):
  """(guided-diffusion's UNetModel shaped as `model`, forward(x, t, cond)) for tools/bench.py."""
  from guided_diffusion.unet import UNetModel
  net = UNetModel(image_size=model.input_hw[0], in_channels=model.in_channels, model_channels=model.model_channels,
                  out_channels=model.out_channels, num_res_blocks=model.num_res_blocks,
                  attention_resolutions=model.attention_resolutions, dropout=model.dropout,
                  channel_mult=model.channel_mult, num_classes=model.num_classes + 1,  # + the null class
                  num_heads=model.num_heads, num_head_channels=model.num_head_channels,
                  num_heads_upsample=model.num_heads_upsample, use_scale_shift_norm=model.use_scale_shift_norm,
                  resblock_updown=model.resblock_updown, use_new_attention_order=model.use_new_attention_order)
  return net, lambda x, t, cond: net(x, t, *cond)
