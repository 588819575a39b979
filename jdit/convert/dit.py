"""PyTorch DiT weights -> jdit parameters, for official facebookresearch/DiT and diffusers checkpoints.

Both layouts are first brought to the official key names (diffusers' per-block copies of the condition
embedders must be identical and are taken once), then mapped to the Flax tree. The model configuration is
inferred from the tensor shapes; heads follow the variant table unless given.
"""
import re

import numpy as np

from jdit.state_dict import CheckpointError, check_params
from jdit.models import dit as dit_lib, family, fields

_DIFFUSERS_RENAMES = (
    (r"pos_embed\.proj\.", "x_embedder.proj."),
    (r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
    (r"transformer_blocks\.0\.norm1\.emb\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
    (r"transformer_blocks\.0\.norm1\.emb\.class_embedder\.", "y_embedder."),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.", r"blocks.\1.adaLN_modulation.1."),
    (r"transformer_blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.attn.proj."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.fc1."),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.fc2."),
    (r"proj_out_1\.", "final_layer.adaLN_modulation.1."),
    (r"proj_out_2\.", "final_layer.linear."),
)
_BLOCK_EMB = re.compile(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.*)")
_QKV = re.compile(r"transformer_blocks\.(\d+)\.attn1\.to_([qkv])\.(weight|bias)")


def is_diffusers_layout(weights: dict) -> bool:
  return any(k.startswith("transformer_blocks.") for k in weights)


def diffusers_to_official(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames diffusers DiTTransformer2DModel keys to the official layout (fusing q, k, v)."""
  out, qkv = {}, {}
  for key, value in weights.items():
    if key == "pos_embed.pos_embed":
      out["pos_embed"] = value
      continue
    emb = _BLOCK_EMB.fullmatch(key)
    if emb and emb.group(1) != "0":
      reference = weights.get(f"transformer_blocks.0.norm1.emb.{emb.group(2)}")
      if reference is None or not np.array_equal(reference, value):
        raise CheckpointError(f"{key}: differs from block 0's condition embedder; a DiT shares one "
                              "timestep/label embedder across blocks")
      continue
    match = _QKV.fullmatch(key)
    if match:
      qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = value
      continue
    new = key
    for pattern, replacement in _DIFFUSERS_RENAMES:
      new = re.sub(f"^{pattern}", replacement, new)
    out[new] = value
  for (block, kind), parts in qkv.items():
    if set(parts) != {"q", "k", "v"}:
      raise CheckpointError(f"transformer_blocks.{block}.attn1: missing to_q/to_k/to_v {kind}")
    out[f"blocks.{block}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def _require(weights: dict, key: str) -> np.ndarray:
  if key not in weights:
    raise CheckpointError(f"missing key {key!r}: not a DiT checkpoint")
  return weights[key]


def infer_config(weights: dict[str, np.ndarray], hints: dict | None = None) -> dict:
  """DiT fields implied by official-layout tensors; `hints` (e.g. a diffusers config.json) fill the rest."""
  hints = hints or {}
  hidden, channels, patch, _ = _require(weights, "x_embedder.proj.weight").shape
  depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
  if depth == 0:
    raise CheckpointError("no 'blocks.N.*' keys: not a DiT checkpoint")
  out = _require(weights, "final_layer.linear.weight").shape[0] // patch ** 2
  if out not in (channels, 2 * channels):
    raise CheckpointError(f"final_layer.linear.weight: {out} output channels for {channels} input channels; "
                          "expected equal (no learned sigma) or double (learned sigma)")
  config = dict(hidden_size=hidden, in_channels=channels, patch_size=patch, depth=depth,
                learn_sigma=out == 2 * channels)
  config["mlp_ratio"] = _require(weights, "blocks.0.mlp.fc1.weight").shape[0] / hidden
  table = weights.get("y_embedder.embedding_table.weight")
  config["num_classes"] = 0 if table is None else table.shape[0] - 1  # the last row is the null class
  if table is None:
    config["class_dropout_prob"] = 0.0
  if "pos_embed" in weights:
    side = int(round(np.sqrt(weights["pos_embed"].shape[1])))
    config["input_size"] = side * patch
  elif "sample_size" in hints:
    config["input_size"] = hints["sample_size"]
  heads = hints.get("num_attention_heads") or dit_lib.heads_for(depth, hidden)
  if heads:
    config["num_heads"] = heads
  return config


def _linear(weights: dict, key: str) -> dict:
  return {"kernel": _require(weights, f"{key}.weight").T, "bias": _require(weights, f"{key}.bias")}


def _reshaped(weights: dict, key: str, shape: tuple, model: dit_lib.DiT) -> np.ndarray:
  """A (transposed, for 2D weights) tensor reshaped to `shape`, or an error naming the key."""
  value = _require(weights, key)
  if value.size != np.prod(shape):
    raise CheckpointError(f"{key}: shape {value.shape} does not fit {model.describe()}")
  return (value.T if value.ndim == 2 else value).reshape(shape)


def official_to_params(weights: dict[str, np.ndarray], model: dit_lib.DiT) -> dict:
  """Official-layout tensors -> the Flax parameter tree of `model` (shapes checked, keys named on error)."""
  heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
  conv = _require(weights, "x_embedder.proj.weight")  # (D, C, p, p) -> (p, p, C, D)
  params = {
      "x_embedder": {"kernel": conv.transpose(2, 3, 1, 0), "bias": _require(weights, "x_embedder.proj.bias")},
      "t_embedder": {"mlp_in": _linear(weights, "t_embedder.mlp.0"), "mlp_out": _linear(weights, "t_embedder.mlp.2")},
      "final_layer": {"adaLN_modulation": _linear(weights, "final_layer.adaLN_modulation.1"),
                      "linear": _linear(weights, "final_layer.linear")},
  }
  if model.num_classes:
    params["y_embedder"] = {"embedding_table": {"embedding": _require(weights, "y_embedder.embedding_table.weight")}}
  dim = model.hidden_size
  for i in range(model.depth):
    b = f"blocks.{i}"
    params[f"blocks_{i}"] = {
        "adaLN_modulation": _linear(weights, f"{b}.adaLN_modulation.1"),
        "attn": {  # qkv rows are ordered (3, H, Dh); proj columns (H, Dh)
            "qkv": {"kernel": _reshaped(weights, f"{b}.attn.qkv.weight", (dim, 3, heads, head_dim), model),
                    "bias": _reshaped(weights, f"{b}.attn.qkv.bias", (3, heads, head_dim), model)},
            "proj": {"kernel": _reshaped(weights, f"{b}.attn.proj.weight", (heads, head_dim, dim), model),
                     "bias": _require(weights, f"{b}.attn.proj.bias")},
        },
        "mlp": {"fc1": _linear(weights, f"{b}.mlp.fc1"), "fc2": _linear(weights, f"{b}.mlp.fc2")},
    }
  params = dit_lib.block_layout(params, model.scan_blocks)
  check_params(params, family.abstract_params(model), model.describe())
  return params


def matches(weights: dict) -> bool:
  """True for DiT tensors in the official or the diffusers layout."""
  return ("x_embedder.proj.weight" in weights or "pos_embed.proj.weight" in weights) \
      and "context_embedder.weight" not in weights  # SD3's MM-DiT has a pos_embed.proj too


def from_weights(weights: dict, hints: dict, **overrides) -> tuple[dit_lib.DiT, dict]:
  """(model, params) from official- or diffusers-layout tensors; `hints` (a diffusers config.json) and
  `overrides` (any DiT field) complete what the shapes do not say."""
  if is_diffusers_layout(weights):
    weights = diffusers_to_official(weights)
  config = {**infer_config(weights, hints), **overrides}
  if "num_heads" not in config:
    raise CheckpointError(f"cannot infer num_heads for hidden_size={config['hidden_size']}, "
                          f"depth={config['depth']} (no named variant matches); pass num_heads=...")
  try:
    model = fields.from_json(dit_lib.DiT, config)
    model.check_config()
  except (ValueError, TypeError) as e:
    raise CheckpointError(str(e)) from e
  return model, official_to_params(weights, model)


def torch_reference(model: dit_lib.DiT):
  """(diffusers' DiTTransformer2DModel shaped as `model`, forward(x, t, cond)) for tools/bench.py."""
  from diffusers import DiTTransformer2DModel
  net = DiTTransformer2DModel(num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size //
                              model.num_heads, in_channels=model.in_channels, out_channels=model.out_channels,
                              num_layers=model.depth, sample_size=model.input_hw[0], patch_size=model.patch_size,
                              num_embeds_ada_norm=model.num_classes)  # + a null class (class_dropout_prob 0.1)
  return net, lambda x, t, cond: net(x, t, *cond).sample
