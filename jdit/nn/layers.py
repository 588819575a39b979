"""DiT building blocks: adaLN helpers, embedders, attention (with a backend switch) and the MLP.

Parameters are float32 and carry logical axis names (see `AXES` below); `dtype` is the compute dtype.
Normalizations and softmax run in float32 whatever the compute dtype.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jdit.nn import attention, lora, matmul, posemb

# Logical axis names used on parameters and activations; training maps them to mesh axes by rules.
#   parameters:  embed (hidden size), mlp (MLP hidden / adaLN outputs), heads, kv (head dim),
#                vocab (class table rows), freq (timestep frequencies), patch (patch pixels x channels)
#   activations: act_batch, act_len (tokens), act_embed, act_heads, act_kv, act_mlp

xavier_uniform = nn.initializers.xavier_uniform
zeros = nn.initializers.zeros_init()
REMAT_POLICIES = {  # rematerialization of each block (nn.remat policy)
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_only_these_names("dense"),  # linear-layer outputs, not attention
}


def check_compute_options(remat: str, attention_backend: str) -> None:
  """ValueError naming the field when remat or attention_backend (fields of every family) is unknown."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
  if attention_backend not in attention.ATTENTION_BACKENDS:
    raise ValueError(f"attention_backend must be one of {attention.ATTENTION_BACKENDS}, got {attention_backend!r}")


def normal(stddev: float) -> Callable:
  return nn.initializers.normal(stddev)


def partitioned(init: Callable, axes: tuple) -> Callable:
  return nn.with_logical_partitioning(init, axes)


def dense(features: int, axes: tuple[str, str], dtype: Any, name: str,
          kernel_init: Callable = xavier_uniform(), use_bias: bool = True) -> "EinsumDense":
  """Linear layer over the last axis (params "kernel" (in, out) and "bias" as nn.Dense's) with float32
  parameters named by `axes` = (input axis, output axis); bias zero-init."""
  bias_shape = (features,) if use_bias else None
  return EinsumDense("...i,io->...o", (None, features), axes, bias_shape, axes[1:], kernel_init, dtype, name=name)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """adaLN modulation x * (1 + scale) + shift, with (B, D) shift/scale broadcast over tokens of x (B, T, D)."""
  return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
  """LayerNorm over the last axis without affine parameters, computed in float32."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0,
                       freq_shift: float = 0.0) -> jnp.ndarray:
  """Sinusoidal timestep features [cos(t w_i), sin(t w_i)], w_i = max_period^(-i / (dim/2 - freq_shift)).

  freq_shift = 0 is the official DiT (what its weights were trained with); diffusers' DiT uses 1.
  t: (B,) possibly fractional; returns (B, dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]  # (B, half)
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # (B, 2 * half)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Scalar timesteps -> (B, D): 256 sinusoidal frequencies, then Linear-SiLU-Linear."""
  hidden_size: int
  frequency_size: int = 256
  freq_shift: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
    freqs = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)  # (B, 256)
    h = dense(self.hidden_size, ("freq", "embed"), self.dtype, "mlp_in", normal(0.02))(freqs)  # (B, D)
    return dense(self.hidden_size, ("mlp", "embed"), self.dtype, "mlp_out", normal(0.02))(nn.silu(h))


class LabelEmbedder(nn.Module):
  """Class labels -> (B, D). With dropout_prob > 0 the table has a null class (index num_classes) for
  classifier-free guidance, and training replaces labels by it with that probability (rng 'dropout').

  The lookup clamps labels to the table (callers check them: sample.sample_labels). nn.Embed's default take
  fills out-of-range rows with NaN through a mask that, on a batch sharded over the fsdp axis, lowers to a
  collective XLA's TPU cost model cannot price (optimal_seconds -1 for the whole step)."""
  num_classes: int
  hidden_size: int
  dropout_prob: float

  @nn.compact
  def __call__(self, labels: jnp.ndarray, train: bool) -> jnp.ndarray:
    has_null = self.dropout_prob > 0
    table = nn.Embed(self.num_classes + int(has_null), self.hidden_size, param_dtype=jnp.float32,
                     embedding_init=partitioned(normal(0.02), ("vocab", "embed")), name="embedding_table")
    if train and has_null:
      drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob  # (B,)
      labels = jnp.where(drop, self.num_classes, labels)
    return jnp.take(table.embedding, labels, axis=0, mode="clip")  # (B, D)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learned scale (QK-norm; T5's norms), computed in float32."""
  eps: float = 1e-6
  axis_name: str = "kv"  # the scale's logical axis

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), (self.axis_name,)), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)


class EinsumDense(nn.Module):
  """Linear map by an einsum `equation` with a named (kernel_axes) float32 kernel and a zero-init bias (none when
  bias_shape is None).

  In `equation`, "..." stands for the leading axes of x; a None in `kernel_shape` for the size of x's last axis.
  """
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple
  bias_shape: tuple
  bias_axes: tuple
  kernel_init: Callable
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shape = tuple(x.shape[-1] if size is None else size for size in self.kernel_shape)
    kernel = self.param("kernel", partitioned(self.kernel_init, self.kernel_axes), shape, jnp.float32)
    equation = self.equation.replace("...", "abcdefgh"[:x.ndim - 1])  # no ellipsis in matmul.einsum
    y = matmul.einsum(equation, x, kernel, self.dtype, jnp.float32)
    low_rank = lora.branch(self, x, equation, shape, self.kernel_axes, self.dtype)  # None without an adapter
    if low_rank is not None:
      y = y + low_rank.astype(jnp.float32)
    if self.bias_shape is not None:  # added in float32: so is its gradient
      y = y + self.param("bias", partitioned(zeros, self.bias_axes), self.bias_shape, jnp.float32)
    return checkpoint_name(y.astype(matmul.activation_dtype(self.dtype)), "dense")  # what remat="dots" keeps


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (with bias), optional QK-norm and 2D RoPE."""
  num_heads: int
  dtype: Any = jnp.float32
  backend: str = "auto"  # see attention.ATTENTION_BACKENDS
  qk_norm: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, rope: tuple | None = None) -> jnp.ndarray:
    dim = x.shape[-1]
    heads, head_dim = self.num_heads, dim // self.num_heads
    # Xavier fans of the official (3D, D) and (D, D) linears: (D -> 3 H Dh) and (H Dh -> D).
    qkv = EinsumDense("btd,dshk->btshk", (dim, 3, heads, head_dim), ("embed", None, "heads", "kv"),
                      (3, heads, head_dim), (None, "heads", "kv"),
                      xavier_uniform(in_axis=0, out_axis=(1, 2, 3)), self.dtype, name="qkv")(x)  # (B, T, 3, H, Dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh) each
    if self.qk_norm:
      q, k = RMSNorm(name="q_norm")(q), RMSNorm(name="k_norm")(k)
    if rope is not None:
      q, k = posemb.apply_rope(q, *rope), posemb.apply_rope(k, *rope)
    q, k, v = (nn.with_logical_constraint(a.astype(self.dtype), attention.ACT_AXES) for a in (q, k, v))
    backend = attention.resolve_backend(self.backend, self.dtype, x.shape[1], head_dim)
    out = attention.dot_product_attention(q, k, v, backend)  # (B, T, H, Dh)
    return EinsumDense("bthk,hkd->btd", (heads, head_dim, dim), ("heads", "kv", "embed"), (dim,), ("embed",),
                       xavier_uniform(in_axis=(0, 1), out_axis=2), self.dtype, name="proj")(out)  # (B, T, D)


class SwiGLU(nn.Module):
  """SwiGLU MLP (Shazeer 2020; DINOv2's SwiGLUFFN, LightningDiT's MLP): fc1 to two halves (D -> 2 x M, fused;
  the halves on their own axis so tensor sharding of M splits neither), silu(first) * second, fc2 (M -> D)."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dim, hidden = x.shape[-1], self.hidden_features
    h = EinsumDense("btd,dsm->btsm", (dim, 2, hidden), ("embed", None, "mlp"), (2, hidden), (None, "mlp"),
                    xavier_uniform(in_axis=0, out_axis=(1, 2)), self.dtype, name="fc1")(x)  # (B, T, 2, M)
    h = nn.with_logical_constraint(nn.silu(h[:, :, 0]) * h[:, :, 1], ("act_batch", "act_len", "act_mlp"))
    return dense(dim, ("mlp", "embed"), self.dtype, "fc2")(h)  # (B, T, D)


class Mlp(nn.Module):
  """Linear -> tanh-GELU -> Linear."""
  hidden_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = dense(self.hidden_features, ("embed", "mlp"), self.dtype, "fc1")(x)  # (B, T, M)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("act_batch", "act_len", "act_mlp"))
    return dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(h)  # (B, T, D)
