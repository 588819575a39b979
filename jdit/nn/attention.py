"""Attention backends: softmax(q k^T / sqrt(Dh)) v over q, k, v (B, T, H, Dh), chosen per platform.

  einsum  two einsums and a float32 softmax (the reference)
  blockwise  exact attention by blocks of queries and keys with an online softmax and a backward pass that
          recomputes the scores (jdit/nn/blockwise.py): memory linear in tokens on every platform
  xla     jax.nn.dot_product_attention(implementation="xla")
  cudnn   cuDNN flash attention (GPU; bfloat16/float16, head dim a multiple of 8 up to 128: XL's 72 works)
  splash  Pallas splash attention (TPU; runs interpreted elsewhere, for tests), sharded with shard_map; a token
          count off the 128-lane tiles is padded to them with the padded keys masked out (MM-DiT's 4096 + 333)
  auto    cudnn on GPUs in bf16/fp16, splash on TPUs from 128 tokens, blockwise on CPUs (the fastest there at every
          length: one block up to 512 tokens runs its direct path), xla otherwise
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit.nn import matmul
from jdit.nn.blockwise import blockwise_attention
from jdit.nn.platform import target as target_platform

ATTENTION_BACKENDS = ("auto", "einsum", "blockwise", "xla", "cudnn", "splash")
ACT_AXES = ("act_batch", "act_len", "act_heads", "act_kv")


def resolve_backend(backend: str, dtype, tokens: int, head_dim: int, platform: str | None = None) -> str:
  """The backend `auto` stands for on `platform` (default: the one traced for), or `backend` itself."""
  if backend != "auto":
    return backend
  platform = platform or target_platform()
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 \
      and head_dim <= 128:
    return "cudnn"
  if platform == "tpu" and tokens >= 128:  # other counts are padded to whole 128-lane tiles, the padding masked
    return "splash"
  if platform == "cpu":
    return "blockwise"
  return "xla"


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, backend: str) -> jnp.ndarray:
  """(B, T, H, Dh) x 3 -> (B, T, H, Dh) with the resolved backend."""
  if backend == "einsum":  # heads-major inside: batched matmuls over leading (B, H) run faster on CPU
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, H, T, Dh)
    scores = matmul.einsum("bhqd,bhkd->bhqk", q, k, q.dtype, jnp.float32) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.swapaxes(matmul.einsum("bhqk,bhkd->bhqd", weights, v, v.dtype), 1, 2)  # (B, T, H, Dh)
  if backend == "blockwise":
    return blockwise_attention(q, k, v)
  if backend in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, implementation=backend)
  if backend == "splash":
    return splash_attention(q, k, v)
  raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")


# ----------------------------------------------------------------------------------------------
#                                   Pallas splash attention
# ----------------------------------------------------------------------------------------------

def _block(tokens: int) -> int:
  """The largest tile of 512, 256 or 128 that divides a (padded) token count."""
  return next(b for b in (512, 256, 128) if tokens % b == 0)


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, tokens: int, valid: int, interpret: bool):
  """The kernel for `tokens` (a multiple of 128) of which the first `valid` are real: the keys after them masked."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  b = _block(tokens)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                            block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  if valid == tokens:
    mask = masks.FullMask((tokens, tokens))
  else:
    mask = masks.NumpyMask(np.broadcast_to(np.arange(tokens) < valid, (tokens, tokens)).copy())
  return splash.make_splash_mha(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v):
  """One shard: (b, T, h, Dh) x 3 -> (b, T, h, Dh); the kernel works on (h, T, Dh) per example, T padded to whole
  128-token tiles."""
  _, tokens, heads, head_dim = q.shape
  padded = -(-tokens // 128) * 128
  kernel = _splash_kernel(heads, padded, tokens, target_platform() != "tpu")
  to_heads = lambda a: jnp.swapaxes(jnp.pad(a, ((0, 0), (0, padded - tokens), (0, 0), (0, 0))), 1, 2)  # (b, h, T', Dh)
  out = jax.vmap(kernel)(to_heads(q / np.sqrt(head_dim).astype(q.dtype)), to_heads(k), to_heads(v))
  return jnp.swapaxes(out, 1, 2)[:, :tokens].astype(q.dtype)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
  """Splash attention on each shard (batch over the data axes, heads over the tensor axis) via shard_map,
  since a Pallas kernel cannot be partitioned by the compiler; XLA's attention where the shards do not divide
  the batch or the heads."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _splash_local(q, k, v)
  spec = nn.logical_to_mesh_axes(ACT_AXES)
  for size, names in zip(q.shape, spec):
    names = (names,) if isinstance(names, str) else names or ()
    if size % math.prod(mesh.shape[name] for name in names):  # e.g. init's batch of one on a data axis of 4
      return jax.nn.dot_product_attention(q, k, v, implementation="xla")  # the same attention, unsharded kernel
  return jax.shard_map(_splash_local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
