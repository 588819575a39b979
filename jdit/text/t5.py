"""The T5 encoder in flax.linen, exactly as transformers' T5EncoderModel (v1.1 gated-GELU and original ReLU FFNs).

    encoder = T5Encoder(**T5_PRESETS["t5-xxl"], dtype="bfloat16")
    out = encoder.apply({"params": params}, input_ids, attention_mask)   # (B, L) ints, (B, L) 1/0 -> dict:
        last_hidden_state (B, L, D)         after the final RMSNorm
        penultimate_hidden_state (B, L, D)  entering the last layer (transformers' hidden_states[-2])
RMSNorm without bias, attention without biases and without 1/sqrt(d) scaling, and one bidirectional
relative-position bias table (transformers keeps it in layer 0) added to the scores of every layer.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdit.nn.layers import RMSNorm, normal, partitioned
from jdit.text import transformer
from jdit.text.transformer import ACT, linear, residual, split_heads

# Released encoders (transformers' configs).
T5_PRESETS = {
    "t5-xxl": dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),  # t5-v1_1-xxl (SD3, Flux)
    "t5-xl": dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),  # t5-v1_1-xl
    "t5-base": dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12),  # t5-v1_1-base
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(L, L) bucket of key j relative to query i, bidirectional, as transformers' _relative_position_bucket
  (float32 logarithms, truncated, so that boundary positions fall in the same bucket)."""
  relative = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int64) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
  return buckets + np.where(distance < max_exact, distance, np.minimum(large, half - 1))


class T5Layer(nn.Module):
  """x + attn(norm(x)) with the shared position bias, then x + ffn(norm(x))."""
  num_heads: int
  d_kv: int
  d_ff: int
  gated: bool
  hidden_act: str
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    dim, inner = x.shape[-1], self.num_heads * self.d_kv
    h = RMSNorm(self.eps, "embed", name="attention_norm")(x)  # (B, L, D)
    q, k, v = (split_heads(linear(inner, ("embed", "heads"), self.dtype, name, False, dim ** -0.5)(h),
                           self.num_heads, self.dtype) for name in ("q", "k", "v"))  # (B, L, H, Dk) each
    h = transformer.attend(q, k, v, bias, 1.0)  # (B, L, H*Dk)
    x = residual(x, linear(dim, ("heads", "embed"), self.dtype, "o", False)(h))
    h = RMSNorm(self.eps, "embed", name="ffn_norm")(x)
    act = transformer.activation(self.hidden_act)
    if self.gated:
      h = act(linear(self.d_ff, ("embed", "mlp"), self.dtype, "wi_0", False)(h)) \
          * linear(self.d_ff, ("embed", "mlp"), self.dtype, "wi_1", False)(h)  # (B, L, F)
    else:
      h = act(linear(self.d_ff, ("embed", "mlp"), self.dtype, "wi", False)(h))
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return residual(x, linear(dim, ("mlp", "embed"), self.dtype, "wo", False)(h))


class T5Encoder(nn.Module):
  """The T5 encoder stack: shared token embedding, relative-position bias, pre-norm layers, final RMSNorm."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "gated-gelu"  # gated-gelu (v1.1, gelu_new) | relu (original T5) | gated-<act>
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype; parameters are float32, norms and softmax float32
  scan_layers: bool = True
  remat: str = "none"

  KIND = "t5"

  @property
  def width(self) -> int:
    return self.d_model

  @property
  def gated_act(self) -> tuple[bool, str]:
    gated = self.feed_forward_proj.startswith("gated-")
    act = self.feed_forward_proj.removeprefix("gated-")
    return gated, "gelu_new" if act == "gelu" else act  # transformers maps gated-gelu to gelu_new

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None) -> dict:
    dtype = jnp.dtype(self.dtype)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be (B, L), got shape {input_ids.shape}")
    length = input_ids.shape[1]
    shared = nn.Embed(self.vocab_size, self.d_model, param_dtype=jnp.float32, name="shared",
                      embedding_init=partitioned(normal(1.0), ("vocab", "embed")))
    x = nn.with_logical_constraint(shared(input_ids).astype(dtype), ACT)  # (B, L, D)
    table = self.param("relative_attention_bias", partitioned(normal(1.0), (None, "heads")),
                       (self.relative_attention_num_buckets, self.num_heads), jnp.float32)
    buckets = relative_position_buckets(length, self.relative_attention_num_buckets,
                                        self.relative_attention_max_distance)  # (L, L)
    bias = jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, H, L, L)
    bias = bias + transformer.padding_bias(attention_mask)  # (B or 1, H, L, L)
    gated, act = self.gated_act
    fields = (self.num_heads, self.d_kv, self.d_ff, gated, act, self.layer_norm_epsilon, dtype)
    x, previous = transformer.layer_stack(T5Layer, fields, self.num_layers, self.scan_layers, self.remat, x, bias)
    last = RMSNorm(self.layer_norm_epsilon, "embed", name="final_layer_norm")(x)
    return {"last_hidden_state": last.astype(jnp.float32), "penultimate_hidden_state": previous.astype(jnp.float32)}
