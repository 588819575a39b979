"""Pieces shared by the text encoders: activations, affine LayerNorm, attention with an additive bias, and the
layer stack (nn.scan or unrolled) that also returns the hidden state entering the last layer.

Parameters are float32 with logical axis names (embed, mlp, heads, kv, vocab, layers) as in jdit.nn.layers;
`dtype` is the compute dtype; norms and softmax run in float32.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.nn import lora, matmul
from jdit.nn.layers import REMAT_POLICIES, EinsumDense, layer_norm, normal, partitioned, zeros

ACT = ("act_batch", "act_len", "act_embed")
ACTIVATIONS: dict[str, Callable] = {  # transformers' ACT2FN names
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # T5 v1.1 (tanh approximation)
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,  # original T5
}
MASKED = float(jnp.finfo(jnp.float32).min)  # additive bias of a masked score, as transformers


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with scale and bias (embed axis), computed in float32."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("embed",)), (dim,), jnp.float32)
    bias = self.param("bias", partitioned(zeros, ("embed",)), (dim,), jnp.float32)
    return (layer_norm(x, self.eps).astype(jnp.float32) * scale + bias).astype(x.dtype)


def linear(features: int, axes: tuple, dtype: Any, name: str, use_bias: bool, std: float = 0.02) -> EinsumDense:
  """(..., in) -> (..., features) with a named float32 kernel (in, features) and optional bias."""
  return EinsumDense("...i,io->...o", (None, features), axes, (features,) if use_bias else None, axes[1:],
                     normal(std), dtype, name=name)


def residual(x: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
  """x + h in x's dtype (a layer's output is float32 on CPU, matmul.activation_dtype), constrained to ACT."""
  return nn.with_logical_constraint(x + h.astype(x.dtype), ACT)


def split_heads(x: jnp.ndarray, heads: int, dtype: Any) -> jnp.ndarray:
  """(B, L, H*Dh) -> (B, L, H, Dh) in the compute dtype, constrained to the attention activation axes."""
  x = x.reshape(*x.shape[:2], heads, x.shape[-1] // heads).astype(dtype)
  return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_heads", "act_kv"))


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, bias: jnp.ndarray, scale: float) -> jnp.ndarray:
  """softmax(q k^T * scale + bias) v over (B, L, H, Dh) inputs; bias broadcasts to (B, H, L, L). Scores and
  softmax in float32; returns (B, L, H*Dh) in v's dtype."""
  scores = matmul.einsum("bqhd,bkhd->bhqk", q, k, q.dtype, jnp.float32) * scale + bias  # (B, H, L, L)
  weights = jax.nn.softmax(scores, axis=-1)
  out = matmul.einsum("bhqk,bkhd->bqhd", weights, v, v.dtype)  # (B, L, H, Dh)
  return out.reshape(*out.shape[:2], -1)


def padding_bias(attention_mask: jnp.ndarray | None) -> jnp.ndarray:
  """(B, L) 1/0 key mask -> additive (B, 1, 1, L) bias (0 where kept); no mask -> 0."""
  if attention_mask is None:
    return jnp.zeros((), jnp.float32)
  return jnp.where(attention_mask.astype(bool), 0.0, MASKED)[:, None, None, :]


def causal_bias(length: int) -> jnp.ndarray:
  """(1, 1, L, L) additive bias hiding later tokens."""
  keep = jnp.tril(jnp.ones((length, length), bool))
  return jnp.where(keep, 0.0, MASKED)[None, None]


def scaled_dot(head_dim: int) -> float:
  return 1.0 / math.sqrt(head_dim)


class _CarryLayer(nn.Module):
  """Wraps a layer into nn.scan's (carry, out) form with carry (x, input of the previous layer)."""
  layer: type
  fields: tuple

  @nn.compact
  def __call__(self, carry: tuple, bias: jnp.ndarray) -> tuple[tuple, None]:
    x, _ = carry
    return (self.layer(*self.fields, name="layer")(x, bias), x), None


def layer_stack(layer: type, fields: tuple, num_layers: int, scan: bool, remat: str, x: jnp.ndarray,
                bias: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Runs `num_layers` layers `layer(*fields)(x, bias)` -> (output of the last layer, its input).

  scan: one nn.scan (parameters stacked under "layers/layer" with a leading axis named "layers"); else
  "layers_{i}". Must be called inside a compact module."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
  if remat != "none":
    layer = nn.remat(layer, policy=REMAT_POLICIES[remat])
  if scan:
    stack = nn.scan(_CarryLayer, variable_axes=lora.SCAN_AXES, split_rngs=lora.SCAN_RNGS,
                    in_axes=(nn.broadcast,), length=num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, previous), _ = stack(layer, fields, name="layers")((x, x), bias)
    return x, previous
  previous = x
  for i in range(num_layers):
    previous, x = x, layer(*fields, name=f"layers_{i}")(x, bias)
  return x, previous
