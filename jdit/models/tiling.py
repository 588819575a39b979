"""Tiled VAE encode and decode: overlapping tiles blended linearly, in bounded device memory.

Every tile has the same shape (the last row and column of tiles are aligned to the image edge), so the jitted
tile function compiles once; tiles run one at a time and are accumulated on the host with weights that ramp
linearly across the middle half of each overlap (see ramp_window). Device memory is that of one tile, whatever
the image size.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Start offsets of tiles of `tile` covering [0, size) with at least `overlap` shared between neighbours."""
  if tile >= size:
    return [0]
  stride = tile - overlap
  starts = list(range(0, size - tile + 1, stride))
  if starts[-1] + tile < size:
    starts.append(size - tile)
  return starts


def ramp_window(length: int, overlap_before: int, overlap_after: int) -> np.ndarray:
  """Blend weights along one tile axis: 1 inside; across an overlap with a neighbour, 0 on the outer quarter
  (next to this tile's border, where padding distorts it), a linear ramp across the middle half. So a network
  whose reach is under a quarter of the overlap is reproduced exactly."""
  w = np.ones(length, np.float32)

  def ramp(n: int) -> np.ndarray:
    q = n // 4
    return np.concatenate([np.zeros(q), (np.arange(n - 2 * q) + 0.5) / (n - 2 * q), np.ones(q)]).astype(np.float32)

  if overlap_before:
    w[:overlap_before] = ramp(overlap_before)
  if overlap_after:
    w[length - overlap_after:] = np.minimum(w[length - overlap_after:], ramp(overlap_after)[::-1])
  return w


def tiled_apply(fn: Callable, x: np.ndarray, tile: int, overlap: int, scale: float) -> np.ndarray:
  """Blends fn over overlapping tiles of x (B, H, W, C); fn maps a (B, t, t, C) tile to (B, t*scale, t*scale, C')."""
  if not 0 <= overlap < tile:
    raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
  b, h, w, _ = x.shape
  th, tw = min(tile, h), min(tile, w)
  rows, cols = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
  out_h, out_w = round(h * scale), round(w * scale)
  out = weight = None
  for i, top in enumerate(rows):
    for j, left in enumerate(cols):
      y = np.asarray(jax.device_get(fn(x[:, top:top + th, left:left + tw])), np.float32)
      oh, ow = y.shape[1:3]
      ramp = lambda starts, k, o: round((starts[k - 1] + o - starts[k]) * scale) if k > 0 else 0
      ramp_next = lambda starts, k, o: round((starts[k] + o - starts[k + 1]) * scale) if k + 1 < len(starts) else 0
      wy = ramp_window(oh, ramp(rows, i, th), ramp_next(rows, i, th))
      wx = ramp_window(ow, ramp(cols, j, tw), ramp_next(cols, j, tw))
      window = wy[:, None] * wx[None, :]  # (oh, ow)
      if out is None:
        out = np.zeros((b, out_h, out_w, y.shape[-1]), np.float32)
        weight = np.zeros((out_h, out_w), np.float32)
      oy, ox = round(top * scale), round(left * scale)
      out[:, oy:oy + oh, ox:ox + ow] += y * window[None, :, :, None]
      weight[oy:oy + oh, ox:ox + ow] += window
  return out / weight[None, :, :, None]


def decode_tiled(vae, params, latents, tile: int = 64, overlap: int = 16) -> np.ndarray:
  """Decodes (B, h, w, C) latents in `tile` x `tile` latent tiles overlapping by `overlap` -> (B, 8h, 8w, 3)."""
  decode = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))
  return tiled_apply(decode, np.asarray(latents, np.float32), tile, overlap, scale=vae.downsample_factor)


def encode_tiled(vae, params, images, tile: int = 512, overlap: int = 128) -> tuple[np.ndarray, np.ndarray]:
  """Encodes (B, H, W, 3) images in pixel tiles (multiples of 8) -> posterior mean and logvar (B, H/8, W/8, C)."""
  factor = vae.downsample_factor
  if tile % factor or overlap % factor:
    raise ValueError(f"encode tile and overlap must be multiples of {factor}, got tile={tile}, overlap={overlap}")
  encode = jax.jit(lambda x: jnp.concatenate(vae.apply({"params": params}, x, method=vae.encode), axis=-1))
  moments = tiled_apply(encode, np.asarray(images, np.float32), tile, overlap, scale=1 / factor)
  return np.split(moments, 2, axis=-1)
