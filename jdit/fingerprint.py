"""A content hash of a parameter tree, exact and independent of its sharding: what LoRA runs record of their base
and FID sample sets of the weights they sample.

    fingerprint(params)   # "3f9a0c..." (16 hex digits); computed where the arrays are, two words per leaf fetched
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def _leaf_hash(x: jax.Array) -> jax.Array:
  """Two 32-bit words of a float array's bits, exact and independent of sharding and summation order: sums mod
  2^32 of the bits times position-dependent odd multipliers."""
  bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
  bits = bits.astype(jnp.uint32)
  index = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
  for axis in range(1, x.ndim):  # the flat position, wrapping mod 2^32
    index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  first = jnp.sum(bits * (index * jnp.uint32(2654435761) | jnp.uint32(1)), dtype=jnp.uint32)
  second = jnp.sum((bits ^ (index * jnp.uint32(40503))) * jnp.uint32(2246822519), dtype=jnp.uint32)
  return jnp.stack([first, second])


def fingerprint(params) -> str:
  """A content hash of a parameter tree (paths, shapes, dtypes and every bit), computed where the arrays are."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  words = jax.device_get(jax.jit(lambda ls: [_leaf_hash(leaf) for leaf in ls])([leaf for _, leaf in leaves]))
  digest = hashlib.sha256()
  for (path, leaf), word in zip(leaves, words):
    digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}{leaf.dtype}".encode())
    digest.update(np.asarray(word, np.uint32).tobytes())
  return digest.hexdigest()[:16]
