"""DINOv2 (Oquab et al. 2023) in flax.linen, exactly as transformers' Dinov2Model and Dinov2WithRegistersModel:
the frozen representation REPA aligns a diffusion transformer's tokens to, and the feature space of FD_DINOv2.

    model, params = load_dinov2("/models/dinov2-base")           # a transformers directory or weight file
    out = model.apply({"params": params}, dinov2_preprocess(images, 224))   # NHWC pixels, ImageNet-normalized
    out["last_hidden_state"]   # (B, 1 + registers + patches, D) after the final LayerNorm
    out["pooled"]              # (B, D): its CLS token
At another input size the position embeddings are interpolated bicubically as transformers does (PyTorch's
bicubic, align_corners=False; with registers, antialiased).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jdit.nn.layers import normal, partitioned, zeros
from jdit.text import transformer
from jdit.text.clip import CLIPAttention
from jdit.text.transformer import LayerNorm, linear, residual

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet, as BitImageProcessor normalizes for DINOv2
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a (PyTorch: -0.75; its antialiased path, as PIL: -0.5)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """(out_size, in_size) float64 weights of PyTorch's 1-D bicubic resampling (align_corners=False): plain, with
  the neighbours clamped at the border, or antialiased (the kernel widened by the downscale factor, normalized)."""
  scale = in_size / out_size
  out = np.zeros((out_size, in_size))
  for i in range(out_size):
    if antialias:
      support = 2.0 * max(scale, 1.0)
      center = scale * (i + 0.5)
      first, last = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
      taps = np.arange(first, last)
      weights = _cubic((taps - center + 0.5) / max(scale, 1.0), -0.5)
      out[i, taps] = weights / weights.sum()
    else:
      source = scale * (i + 0.5) - 0.5
      base, t = int(np.floor(source)), source - np.floor(source)
      for offset, weight in zip((-1, 0, 1, 2), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
        out[i, min(max(base + offset, 0), in_size - 1)] += weight
  return out


def interpolate_positions(table: jnp.ndarray, height: int, width: int, antialias: bool) -> jnp.ndarray:
  """A square (S*S, D) patch position table resampled to (height*width, D), in float32."""
  side = int(round(table.shape[0] ** 0.5))
  rows, cols = (jnp.asarray(bicubic_matrix(side, n, antialias), jnp.float32) for n in (height, width))
  grid = table.reshape(side, side, -1)
  return jnp.einsum("hi,wj,ijd->hwd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST).reshape(
      height * width, -1)


class Dinov2Layer(nn.Module):
  """x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)); the MLP is fc1-GELU-fc2 or SwiGLU (ViT-g)."""
  num_heads: int
  mlp_ratio: float
  swiglu: bool
  hidden_act: str
  eps: float
  dtype: str

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    scale = lambda name: self.param(name, partitioned(nn.initializers.ones_init(), ("embed",)), (dim,), jnp.float32)
    h = CLIPAttention(self.num_heads, self.dtype, name="attention")(LayerNorm(self.eps, name="norm1")(x), bias)
    x = residual(x, h * scale("layer_scale1"))
    h = LayerNorm(self.eps, name="norm2")(x)
    width = int(dim * self.mlp_ratio)
    if self.swiglu:  # two thirds of the width, rounded up to a multiple of 8
      width = (int(width * 2 / 3) + 7) // 8 * 8
      gate, up = (linear(width, ("embed", "mlp"), self.dtype, name, True)(h) for name in ("gate_proj", "up_proj"))
      h = linear(dim, ("mlp", "embed"), self.dtype, "down_proj", True)(jax.nn.silu(gate) * up)
    else:
      h = transformer.activation(self.hidden_act)(linear(width, ("embed", "mlp"), self.dtype, "fc1", True)(h))
      h = linear(dim, ("mlp", "embed"), self.dtype, "fc2", True)(h)
    return residual(x, h * scale("layer_scale2"))


class DINOv2(nn.Module):
  """(B, H, W, 3) normalized pixels (sides multiples of patch_size) -> {"last_hidden_state", "pooled"}."""
  image_size: int = 518  # the position table's native size (its patches: (image_size / patch_size)^2)
  patch_size: int = 14
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-6
  num_register_tokens: int = 0  # Dinov2WithRegistersModel: tokens after CLS, without position embeddings
  use_swiglu_ffn: bool = False
  hidden_act: str = "gelu"
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> dict:
    batch, height, width, _ = pixels.shape
    p, dim = self.patch_size, self.hidden_size
    if height % p or width % p:
      raise ValueError(f"pixels must have sides that are multiples of the patch size {p}, got {height}x{width}")
    x = nn.Conv(dim, (p, p), strides=p, precision=jax.lax.Precision.HIGHEST, name="patch_embeddings")(pixels)
    grid_h, grid_w = height // p, width // p
    x = x.reshape(batch, grid_h * grid_w, dim)  # (B, T, D)
    cls = self.param("cls_token", partitioned(normal(0.02), ("embed",)), (dim,), jnp.float32)
    native = self.image_size // p
    table = self.param("position_embeddings", partitioned(normal(0.02), (None, "embed")), (1 + native ** 2, dim),
                       jnp.float32)
    patches = table[1:]
    if (grid_h, grid_w) != (native, native):
      patches = interpolate_positions(patches, grid_h, grid_w, antialias=self.num_register_tokens > 0)
    tokens = [jnp.broadcast_to(cls + table[0], (batch, 1, dim))]
    if self.num_register_tokens:
      registers = self.param("register_tokens", partitioned(zeros, (None, "embed")),
                             (self.num_register_tokens, dim), jnp.float32)
      tokens.append(jnp.broadcast_to(registers, (batch, *registers.shape)))
    x = jnp.concatenate([*tokens, x + patches], axis=1).astype(jnp.dtype(self.dtype))  # (B, 1 + R + T, D)
    fields = (self.num_heads, self.mlp_ratio, self.use_swiglu_ffn, self.hidden_act, self.layer_norm_eps,
              jnp.dtype(self.dtype))
    x, _ = transformer.layer_stack(Dinov2Layer, fields, self.num_layers, False, "none", x, jnp.zeros((), jnp.float32))
    x = LayerNorm(self.layer_norm_eps, name="layernorm")(x.astype(jnp.float32))
    return {"last_hidden_state": x, "pooled": x[:, 0]}


def dinov2_preprocess(images, size: int = 224) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, size, size, 3): bicubic-resized to size x size (FD_DINOv2's protocol, as
  dgm-eval), / 255, ImageNet-normalized."""
  resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), np.float32)
             for image in np.asarray(images)]
  return (np.stack(resized) / 255.0 - MEAN) / STD


def params_from_state_dict(weights: dict) -> tuple[dict, dict]:
  """(architecture fields, parameter tree) of transformers' Dinov2Model / Dinov2WithRegistersModel tensors (the
  checkpoint names: attention.attention.query, mlp.fc1 or mlp.weights_in / weights_out)."""
  from jdit.state_dict import CheckpointError, required
  from jdit.text.weights import _prefix
  root = _prefix(weights, "embeddings.patch_embeddings.projection.weight")
  if root is None:
    raise CheckpointError(f"no DINOv2 model (embeddings.patch_embeddings.projection.weight) among {len(weights)} "
                          "tensors")
  get = lambda key: required(weights, root + key)
  linear_of = lambda key: {"kernel": get(f"{key}.weight").T, "bias": get(f"{key}.bias")}
  norm_of = lambda key: {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}
  projection = get("embeddings.patch_embeddings.projection.weight")  # (D, 3, p, p)
  params = {"patch_embeddings": {"kernel": projection.transpose(2, 3, 1, 0),
                                 "bias": get("embeddings.patch_embeddings.projection.bias")},
            "cls_token": get("embeddings.cls_token").reshape(-1),
            "position_embeddings": get("embeddings.position_embeddings")[0], "layernorm": norm_of("layernorm")}
  registers = root + "embeddings.register_tokens"
  if registers in weights:
    params["register_tokens"] = weights[registers][0]
  count = 1 + max(int(k[len(root) + len("encoder.layer."):].split(".")[0]) for k in weights
                  if k.startswith(root + "encoder.layer."))
  swiglu = root + "encoder.layer.0.mlp.weights_in.weight" in weights
  for i in range(count):
    layer = f"encoder.layer.{i}."
    attention = {ours: linear_of(f"{layer}attention.attention.{theirs}")
                 for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))}
    attention["out_proj"] = linear_of(f"{layer}attention.output.dense")
    params[f"layers_{i}"] = {"attention": attention, "norm1": norm_of(f"{layer}norm1"),
                             "norm2": norm_of(f"{layer}norm2"),
                             "layer_scale1": get(f"{layer}layer_scale1.lambda1"),
                             "layer_scale2": get(f"{layer}layer_scale2.lambda1")}
    if swiglu:  # weights_in holds the gate and up projections, in that order
      gate, up = np.split(linear_of(f"{layer}mlp.weights_in")["kernel"], 2, axis=1)
      gate_bias, up_bias = np.split(get(f"{layer}mlp.weights_in.bias"), 2)
      params[f"layers_{i}"].update(gate_proj={"kernel": gate, "bias": gate_bias},
                                   up_proj={"kernel": up, "bias": up_bias},
                                   down_proj=linear_of(f"{layer}mlp.weights_out"))
    else:
      params[f"layers_{i}"].update(fc1=linear_of(f"{layer}mlp.fc1"), fc2=linear_of(f"{layer}mlp.fc2"))
  dim, patch = projection.shape[0], projection.shape[2]
  arch = dict(hidden_size=dim, patch_size=patch, num_layers=count, use_swiglu_ffn=swiglu,
              image_size=patch * int(round((params["position_embeddings"].shape[0] - 1) ** 0.5)),
              num_register_tokens=len(params.get("register_tokens", ())), num_heads=max(dim // 64, 1))
  return arch, params


CONFIG_FIELDS = {"num_attention_heads": "num_heads", "mlp_ratio": "mlp_ratio", "layer_norm_eps": "layer_norm_eps",
                 "hidden_act": "hidden_act"}  # config.json fields the tensors do not determine


def encoder_width(path: str) -> int:
  """The feature width of the DINOv2 at `path` (its config.json, else its patch embedding), without building it."""
  from jdit.text.weights import weight_file
  file, config = weight_file(path)
  if config and "hidden_size" in config:
    return int(config["hidden_size"])
  return load_dinov2(path)[0].hidden_size


def load_dinov2(path: str, **overrides) -> tuple[DINOv2, dict]:
  """(model, params) from a transformers Dinov2Model / Dinov2WithRegistersModel directory or weight file
  (config.json, when present, gives the head count, MLP ratio, norm epsilon and activation; `overrides` set
  fields). One-line CheckpointError naming the file and the key."""
  from jdit.eval.clip import load_image_tower

  def build(weights: dict, config: dict | None):
    arch, params = params_from_state_dict(weights)
    arch.update({ours: config[theirs] for theirs, ours in CONFIG_FIELDS.items() if theirs in (config or {})})
    return DINOv2(**{**arch, **overrides}), params

  return load_image_tower(path, build)
