"""Memory-bounded exact attention in plain JAX: softmax(q k^T / sqrt(Dh)) v by blocks of queries and keys.

Forward (FlashAttention's online softmax): for each block of queries, a scan over key blocks keeps the running
row maximum m, the running sum of exp(s - m) l and the unnormalized output; out = acc / l, and the row's
log-sum-exp L = m + log l is all that is saved besides the inputs and the output. Backward (custom VJP): one scan
over key blocks with an inner scan over query blocks recomputes p = exp(s - L) block by block and accumulates
dv_j = sum_i p^T do_i, dk_j = sum_i ds^T q_i / sqrt(Dh) and dq_i += ds k_j / sqrt(Dh), with
ds = p * (do v^T - rowsum(do * out)). Memory is linear in tokens: one (N, block, block) score tile at a time.
Token counts that blocks do not divide are padded; padded keys are masked out and padded queries dropped.
When one block holds the whole sequence (DiT's 256 tokens) the same formulas run without the scans and the padding
(the direct path), and training saves the probabilities (one score matrix) instead of recomputing them: on CPU that
is faster than the einsum reference's softmax and autodiff.

    out = blockwise_attention(q, k, v)   # (B, T, H, Dh) x 3 -> (B, T, H, Dh), any dtype; scores in float32
"""
import functools
import math

import jax
import jax.numpy as jnp

from jdit.nn.matmul import f32_einsum

BLOCK = 512  # query and key block; a whole sequence when it is shorter


def _blocks(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """(N, T, D) -> (n, N, size, D), T zero-padded to a multiple of size."""
  rows, t, d = x.shape
  n = -(-t // size)
  x = jnp.pad(x, ((0, 0), (0, n * size - t), (0, 0)))
  return jnp.moveaxis(x.reshape(rows, n, size, d), 1, 0)


def _unblock(x: jnp.ndarray, length: int) -> jnp.ndarray:
  """(n, N, size, ...) -> (N, length, ...)."""
  n, rows, size = x.shape[:3]
  return jnp.moveaxis(x, 0, 1).reshape(rows, n * size, *x.shape[3:])[:, :length]


def _key_mask(j, size: int, length: int) -> jnp.ndarray:
  """(size,) True for the real keys of key block j."""
  return j * size + jnp.arange(size) < length


def _one_block(q, k, block: int) -> bool:
  """Whether one block holds all queries and keys: the direct path."""
  return max(q.shape[1], k.shape[1]) <= block


def _direct_scores(q, k):
  """(N, T, S) float32 scores with the max of each row subtracted, and that max (N, T, 1)."""
  s = f32_einsum("nqd,nkd->nqk", q, k) * (1.0 / math.sqrt(q.shape[-1]))
  m = s.max(-1, keepdims=True)
  return s - m, m


def _direct_forward(q, k, v):
  """The forward pass with all keys in one block: (out, lse) as _forward's."""
  s, m = _direct_scores(q, k)
  p = jnp.exp(s)
  l = p.sum(-1, keepdims=True)  # (N, T, 1)
  out = f32_einsum("nqk,nkd->nqd", p.astype(v.dtype), v) / l  # normalized after the product: T*D divides, not T*S
  return out.astype(q.dtype), (m + jnp.log(l))[..., 0]


def _direct_fwd(q, k, v):
  """The direct forward pass for training: out and the residuals, which keep the probabilities (N, T, S)
  (one block: as large as one score matrix) so that the backward pass need not recompute them."""
  s, _ = _direct_scores(q, k)
  p = jnp.exp(s)
  p = p / p.sum(-1, keepdims=True)
  out = f32_einsum("nqk,nkd->nqd", p.astype(v.dtype), v).astype(q.dtype)
  return out, (q, k, v, out, p)


def _direct_bwd(q, k, v, out, p, d_out):
  """Gradients from the saved probabilities: _backward's formulas on the whole score matrix."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (N, T)
  dv = f32_einsum("nqk,nqd->nkd", p.astype(d_out.dtype), d_out)
  ds = p * (f32_einsum("nqd,nkd->nqk", d_out, v) - delta[..., None]) * scale
  dk = f32_einsum("nqk,nqd->nkd", ds.astype(q.dtype), q)
  dq = f32_einsum("nqk,nkd->nqd", ds.astype(k.dtype), k)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _forward(q, k, v, block: int):
  """q, k, v (N, T, D) -> (out (N, T, D) in q's dtype, lse (N, T) float32)."""
  if _one_block(q, k, block):
    return _direct_forward(q, k, v)
  length, scale = k.shape[1], 1.0 / math.sqrt(q.shape[-1])
  size = min(block, max(q.shape[1], length))
  qb, kb, vb = _blocks(q, size), _blocks(k, size), _blocks(v, size)  # (n, N, size, D)

  def one_query_block(q_i):
    def step(carry, inputs):
      m, l, acc = carry
      j, k_j, v_j = inputs
      s = f32_einsum("nqd,nkd->nqk", q_i, k_j) * scale  # (N, size, size)
      s = jnp.where(_key_mask(j, size, length), s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(-1))  # every key block holds a real key: finite
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      acc = acc * correction[..., None] + f32_einsum("nqk,nkd->nqd", p.astype(v_j.dtype), v_j)
      return (m_new, l * correction + p.sum(-1), acc), None

    shape = q_i.shape[:2]
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(q_i.shape, jnp.float32))
    (m, l, acc), _ = jax.lax.scan(step, init, (jnp.arange(kb.shape[0]), kb, vb))
    return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

  out, lse = jax.lax.map(one_query_block, qb)
  return _unblock(out, q.shape[1]), _unblock(lse, q.shape[1])


def _backward(q, k, v, out, lse, d_out, block: int):
  """Gradients (dq, dk, dv) of sum(out * d_out), recomputing the scores block by block."""
  length, scale = k.shape[1], 1.0 / math.sqrt(q.shape[-1])
  size = min(block, max(q.shape[1], length))
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # (N, T)
  qb, kb, vb, dob = _blocks(q, size), _blocks(k, size), _blocks(v, size), _blocks(d_out, size)
  lseb = _blocks(lse[..., None], size)[..., 0]  # (n, N, size)
  deltab = _blocks(delta[..., None], size)[..., 0]

  def key_block(dq, inputs):
    j, k_j, v_j = inputs

    def query_block(carry, inputs):
      dk_j, dv_j = carry
      q_i, do_i, lse_i, delta_i = inputs
      s = f32_einsum("nqd,nkd->nqk", q_i, k_j) * scale  # (N, size, size)
      p = jnp.where(_key_mask(j, size, length), jnp.exp(s - lse_i[..., None]), 0.0)
      dv_j = dv_j + f32_einsum("nqk,nqd->nkd", p.astype(do_i.dtype), do_i)
      ds = p * (f32_einsum("nqd,nkd->nqk", do_i, v_j) - delta_i[..., None]) * scale
      dk_j = dk_j + f32_einsum("nqk,nqd->nkd", ds.astype(q_i.dtype), q_i)
      dq_i = f32_einsum("nqk,nkd->nqd", ds.astype(k_j.dtype), k_j)
      return (dk_j, dv_j), dq_i

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    (dk_j, dv_j), dq_parts = jax.lax.scan(query_block, (zeros, zeros), (qb, dob, lseb, deltab))
    return dq + dq_parts, (dk_j, dv_j)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), (jnp.arange(kb.shape[0]), kb, vb))
  return (_unblock(dq, q.shape[1]).astype(q.dtype), _unblock(dk, length).astype(k.dtype),
          _unblock(dv, length).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, block):
  return _forward(q, k, v, block)[0]


def _attention_fwd(q, k, v, block):
  if _one_block(q, k, block):
    return _direct_fwd(q, k, v)
  out, lse = _forward(q, k, v, block)
  return out, (q, k, v, out, lse)


def _attention_bwd(block, residuals, d_out):
  if _one_block(residuals[0], residuals[1], block):
    return _direct_bwd(*residuals, d_out)
  return _backward(*residuals, d_out, block)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, block: int = BLOCK) -> jnp.ndarray:
  """(B, T, H, Dh) queries and (B, S, H, Dh) keys and values -> (B, T, H, Dh), exactly softmax attention.

  Inside, each head of each example is one of N = B * H rows of (N, T, Dh) arrays: products with one batch axis,
  which XLA:CPU's GEMM (YNNPACK) fuses with the softmax around them faster than with two."""
  batch, _, heads, head_dim = q.shape
  rows = lambda a: jnp.swapaxes(a, 1, 2).reshape(batch * heads, a.shape[1], head_dim)  # (N, T, Dh)  # noqa: E731
  out = _attention(rows(q), rows(k), rows(v), block)
  return jnp.swapaxes(out.reshape(batch, heads, *out.shape[1:]), 1, 2)
