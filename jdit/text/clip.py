"""The CLIP text transformer in flax.linen, exactly as transformers' CLIPTextModel / CLIPTextModelWithProjection.

    encoder = CLIPTextEncoder(**CLIP_PRESETS["clip-l"])
    out = encoder.apply({"params": params}, input_ids)   # (B, L) int -> dict:
        last_hidden_state (B, L, D)         after the final LayerNorm
        penultimate_hidden_state (B, L, D)  entering the last layer (transformers' hidden_states[-2])
        pooled (B, P or D)                  the end-of-text feature, through text_projection when present
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jdit.nn.layers import normal, partitioned
from jdit.text import transformer
from jdit.text.transformer import ACT, LayerNorm, linear, residual, split_heads

# Released text towers (transformers' configs); projection_dim 0: no text_projection.
CLIP_PRESETS = {
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, hidden_act="quick_gelu",
                   projection_dim=768),  # OpenAI CLIP ViT-L/14 (SD1.x, SDXL, SD3 text_encoder)
    "clip-h": dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, hidden_act="gelu",
                   projection_dim=1024),  # OpenCLIP ViT-H/14 (SD2.x)
    "clip-g": dict(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, hidden_act="gelu",
                   projection_dim=1280),  # OpenCLIP ViT-bigG/14 (SDXL, SD3 text_encoder_2)
}


class CLIPLayer(nn.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  intermediate_size: int
  hidden_act: str
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    h = LayerNorm(self.eps, name="layer_norm1")(x)  # (B, L, D)
    h = CLIPAttention(self.num_heads, self.dtype, name="self_attn")(h, bias)
    x = residual(x, h)
    h = LayerNorm(self.eps, name="layer_norm2")(x)
    h = linear(self.intermediate_size, ("embed", "mlp"), self.dtype, "fc1", True)(h)  # (B, L, M)
    h = transformer.activation(self.hidden_act)(h)
    h = linear(dim, ("mlp", "embed"), self.dtype, "fc2", True)(h)  # (B, L, D)
    return residual(x, h)


class CLIPAttention(nn.Module):
  """Multi-head attention with separate biased q/k/v/out projections, scores scaled by 1/sqrt(Dh)."""
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    q, k, v = (split_heads(linear(dim, ("embed", "heads"), self.dtype, name, True)(x), self.num_heads, self.dtype)
               for name in ("q_proj", "k_proj", "v_proj"))  # (B, L, H, Dh) each
    out = transformer.attend(q, k, v, bias, transformer.scaled_dot(q.shape[-1]))  # (B, L, D)
    return linear(dim, ("heads", "embed"), self.dtype, "out_proj", True)(out)


class CLIPTextEncoder(nn.Module):
  """CLIP's causal text transformer with the pooled end-of-text feature and an optional text_projection."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_positions: int = 77
  hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI) | gelu (OpenCLIP)
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407  # 2 (legacy transformers configs): pool at argmax(ids); else at the first eos token
  projection_dim: int = 768  # 0: no text_projection (CLIPTextModel); pooled is then the pooler output
  dtype: str = "float32"  # compute dtype; parameters are float32, norms and softmax float32
  scan_layers: bool = True
  remat: str = "none"

  KIND = "clip"

  @property
  def width(self) -> int:
    return self.hidden_size

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, attention_mask: jnp.ndarray | None = None) -> dict:
    dtype = jnp.dtype(self.dtype)
    if input_ids.ndim != 2 or input_ids.shape[1] > self.max_positions:
      raise ValueError(f"input_ids must be (B, L) with L <= max_positions={self.max_positions}, "
                       f"got shape {input_ids.shape}")
    length = input_ids.shape[1]
    tokens = nn.Embed(self.vocab_size, self.hidden_size, param_dtype=jnp.float32, name="token_embedding",
                      embedding_init=partitioned(normal(0.02), ("vocab", "embed")))
    positions = self.param("position_embedding", partitioned(normal(0.01), (None, "embed")),
                           (self.max_positions, self.hidden_size), jnp.float32)
    x = tokens(input_ids) + positions[None, :length]  # (B, L, D) float32
    x = nn.with_logical_constraint(x.astype(dtype), ACT)
    bias = transformer.causal_bias(length) + transformer.padding_bias(attention_mask)  # (B or 1, 1, L, L)
    fields = (self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, dtype)
    x, previous = transformer.layer_stack(CLIPLayer, fields, self.num_layers, self.scan_layers, self.remat, x,
                                          bias)
    last = LayerNorm(self.layer_norm_eps, name="final_layer_norm")(x).astype(jnp.float32)  # (B, L, D)
    if self.eos_token_id == 2:
      eos = jnp.argmax(input_ids, axis=-1)  # the highest id: end-of-text in the original vocabulary
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # the first end-of-text token
    pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]  # (B, D)
    if self.projection_dim:
      pooled = linear(self.projection_dim, ("embed", "mlp"), jnp.float32, "text_projection", False)(pooled)
    return {"last_hidden_state": last, "penultimate_hidden_state": previous.astype(jnp.float32), "pooled": pooled}
