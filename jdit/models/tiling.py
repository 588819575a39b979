"""Tiled VAE encode and decode that equal the untiled model to float rounding, in bounded device memory.

Each convolutional layer runs over a grid of fixed-size tiles (plus the halo its 3x3 convolutions reach, zero
outside the image as the convolutions pad), one tile at a time on the device; the activations between layers
stay on the host. What spans the whole image is computed whole:
  - GroupNorm statistics: over a stored activation in float64 with the exact two-pass variance; over the hidden
    activation inside a ResNet block (never stored), from per-tile means and squared deviations merged with
    Chan's formula, in a first pass over the tiles;
  - the mid block (ResNet, attention, ResNet) runs once on the whole low-resolution activation, its attention by
    blocks (the blockwise backend), so its memory is linear in latent pixels.
So the tile size changes only rounding. Device memory is one tile's activations (the same program whatever the
image size); host memory holds, for one example at a time, the input and output of the widest full-resolution
layer (the SD VAE at 1024x1024: 256 + 128 channels, 1.5 GiB), about what the untiled program itself needs.

    images = decode_tiled(vae, params, latents, tile=64)        # (B, 8h, 8w, 3); tiles of 64 latent pixels
    mean, logvar = encode_tiled(vae, params, images, tile=512)  # tiles of 512 image pixels
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jdit.models import vae as vae_lib

HALO = 2  # a ResNet block's two 3x3 convolutions reach two pixels


def _grid(height: int, width: int, tile: int):
  """(top, left, size) of a grid of disjoint square tiles of `size` covering (height, width); the last row and
  column reach past the image (their outputs are cropped)."""
  size = min(tile, max(height, width))
  for top in range(0, height, size):
    for left in range(0, width, size):
      yield top, left, size


def _window(x: np.ndarray, top: int, left: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """x[:, top:top+height, left:left+width], zero outside the image, and its (height, width) validity mask."""
  b, h, w, c = x.shape
  out = np.zeros((b, height, width, c), np.float32)
  mask = np.zeros((height, width), np.float32)
  y0, y1, x0, x1 = max(top, 0), min(top + height, h), max(left, 0), min(left + width, w)
  if y0 < y1 and x0 < x1:
    out[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
    mask[y0 - top:y1 - top, x0 - left:x1 - left] = 1.0
  return out, mask


def _crop_into(out: np.ndarray, y, top: int, left: int) -> None:
  """Writes a tile's output into out, dropping what lies past the image."""
  y = np.asarray(y)
  h, w = min(y.shape[1], out.shape[1] - top), min(y.shape[2], out.shape[2] - left)
  out[:, top:top + h, left:left + w] = y[:, :h, :w]


# ----------------------------------------------------------------------------------------------
#                          GroupNorm statistics over the whole image
# ----------------------------------------------------------------------------------------------

def group_stats(x: np.ndarray, groups: int, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Per (example, group) mean and variance of a host activation (B, H, W, C), in float64, two passes over
  blocks of `rows` rows (no full-size float64 copy)."""
  b, h, w, c = x.shape
  chunks = [x[:, r:r + rows].reshape(b, -1, groups, c // groups) for r in range(0, h, rows)]
  count = h * w * (c // groups)
  mean = sum(ch.sum(axis=(1, 3), dtype=np.float64) for ch in chunks) / count
  var = sum(np.square(ch - mean[:, None, :, None]).sum(axis=(1, 3)) for ch in chunks) / count
  return mean, var


def merge_stats(parts) -> tuple[np.ndarray, np.ndarray]:
  """Chan's parallel merge of per-tile (mean, sum of squared deviations, count) into (mean, variance)."""
  mean, m2, n = np.zeros_like(parts[0][0], np.float64), np.zeros_like(parts[0][1], np.float64), 0
  for part_mean, part_m2, count in parts:
    if count == 0:
      continue
    delta = np.asarray(part_mean, np.float64) - mean
    total = n + count
    mean = mean + delta * count / total
    m2 = m2 + np.asarray(part_m2, np.float64) + delta ** 2 * n * count / total
    n = total
  return mean, m2 / n


def _normalize(x, norm: dict, stats) -> jnp.ndarray:
  """GroupNorm of x (b, h, w, C) with given (mean, var) per (example, group), computed as flax computes it."""
  mean, var = stats  # (b, G)
  repeat = x.shape[-1] // mean.shape[-1]
  mean, var = (jnp.repeat(jnp.asarray(a, jnp.float32), repeat, axis=-1)[:, None, None, :] for a in (mean, var))
  return (x.astype(jnp.float32) - mean) * (jax.lax.rsqrt(var + vae_lib.GROUPNORM_EPS) * norm["scale"]) \
      + norm["bias"]


def _tile_stats(x, valid, groups: int) -> tuple:
  """(mean, sum of squared deviations) per (example, group) of x (b, h, w, C) over its valid pixels."""
  b, h, w, c = x.shape
  x, valid = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups), valid[None, :, :, None, None]
  count = jnp.maximum(valid.sum() * (c // groups), 1.0)
  mean = (x * valid).sum(axis=(1, 2, 4)) / count
  return mean, (jnp.square(x - mean[:, None, None, :, None]) * valid).sum(axis=(1, 2, 4))


# ----------------------------------------------------------------------------------------------
#                                The layers, tile by tile
# ----------------------------------------------------------------------------------------------

def _conv(x, conv: dict, dtype, stride: int = 1, padding=None) -> jnp.ndarray:
  """A convolution with a (k, k, Cin, Cout) kernel and bias as nn.Conv computes it, zero-padded by `padding`
  ((before, after) on both axes; default k // 2: "SAME"). Tiles are convolved padded and cropped, not VALID:
  XLA:CPU runs VALID convolutions ~4x slower."""
  k = conv["kernel"].shape[0]
  pad = padding or (k // 2, k // 2)
  y = jax.lax.conv_general_dilated(x.astype(dtype), conv["kernel"].astype(dtype), (stride, stride), (pad, pad),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + conv["bias"].astype(dtype)


def _act(x, norm, stats, mask):
  """silu(GroupNorm(x)), zero outside the image (where the next convolution pads with zeros)."""
  return jax.nn.silu(_normalize(x, norm, stats)) * mask[None, :, :, None]


@functools.partial(jax.jit, static_argnames=("dtype", "stride", "padding", "upsample"))
def _conv_tile(window, mask, conv, norm, stats, dtype, stride, padding, upsample):
  x = window if norm is None else _act(window, norm, stats, mask)
  if upsample:  # nearest x2
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
  return _conv(x, conv, dtype, stride, padding)


@functools.partial(jax.jit, static_argnames=("dtype", "groups", "stats_only"))
def _resnet_tile(window, mask, p, stats1, stats2, dtype, groups, stats_only):
  """window: the tile with a 2-pixel halo; h1 is exact but for its outer ring, h2 on the tile."""
  h1 = _conv(_act(window, p["norm1"], stats1, mask), p["conv1"], dtype)
  if stats_only:  # of the hidden activation, over the tile's pixels inside the image
    return _tile_stats(h1[:, HALO:-HALO, HALO:-HALO], mask[HALO:-HALO, HALO:-HALO], groups)
  h2 = _conv(_act(h1, p["norm2"], stats2, mask), p["conv2"], dtype)[:, HALO:-HALO, HALO:-HALO]
  x = window[:, HALO:-HALO, HALO:-HALO]
  shortcut = _conv(x, p["conv_shortcut"], dtype) if "conv_shortcut" in p else x
  return shortcut.astype(jnp.float32) + h2.astype(jnp.float32)


class _Layers:
  """The VAE's layers on host activations (B, H, W, C) float32, tile by tile; each tile function compiles
  once per shape."""

  def __init__(self, vae):
    self.dtype, self.groups = jnp.dtype(vae.dtype), vae.norm_num_groups

  def conv(self, x: np.ndarray, conv: dict, tile: int, norm: dict | None = None, stride: int = 1,
           padding=None, upsample: bool = False) -> np.ndarray:
    """conv(silu(norm(x))), conv(x), or conv(nearest x2 (x)) (upsample) over the whole image in output tiles of
    `tile`; padding: that of the convolution ((before, after), default k // 2; the downsamplers' (0, 1))."""
    k = conv["kernel"].shape[0]
    before, after = padding or (k // 2, k // 2)
    b, h, w, _ = x.shape
    scale = 2 if upsample else 1
    out_h, out_w = (h * scale + before + after - k) // stride + 1, (w * scale + before + after - k) // stride + 1
    stats = group_stats(x, self.groups) if norm is not None else None
    out = np.empty((b, out_h, out_w, conv["kernel"].shape[-1]), np.float32)
    halo = k // 2
    for top, left, size in _grid(out_h, out_w, tile + tile % 2 if upsample else tile):
      if upsample:  # output [top, top+size) reads upsampled [top-1, top+size+1) of low-res [top/2-1, ...)
        window, mask = _window(x, top // 2 - 1, left // 2 - 1, size // 2 + 2, size // 2 + 2)
        offset = 2  # the upsampled window starts 2 rows above the tile
      elif stride == 1:
        window, mask = _window(x, top - halo, left - halo, size + 2 * halo, size + 2 * halo)
        offset = halo
      else:  # output rows [top, top+size) read input rows [stride*top - before, ...): the window ends a row later
        span = size * stride + k - 1
        window, mask = _window(x, top * stride - before, left * stride - before, span, span)
        offset = 0
      y = _conv_tile(window, mask, conv, norm, stats, self.dtype, stride, (before, after) if stride > 1 else None,
                     upsample)
      _crop_into(out, np.asarray(y)[:, offset:offset + size, offset:offset + size], top, left)
    return out

  def resnet(self, x: np.ndarray, p: dict, tile: int) -> np.ndarray:
    """A ResnetBlock over the whole image in tiles of `tile`: the hidden activation's statistics in a first pass,
    then the block."""
    b, h, w, _ = x.shape
    stats1 = group_stats(x, self.groups)
    grid = list(_grid(h, w, tile))
    windows = lambda: (_window(x, top - HALO, left - HALO, size + 2 * HALO, size + 2 * HALO)  # noqa: E731
                       for top, left, size in grid)
    per_group = p["conv1"]["kernel"].shape[-1] // self.groups
    parts = []
    for window, mask in windows():
      mean, m2 = _resnet_tile(window, mask, p, stats1, stats1, self.dtype, self.groups, True)
      parts.append((np.asarray(mean), np.asarray(m2), int(mask[HALO:-HALO, HALO:-HALO].sum()) * per_group))
    stats2 = merge_stats(parts)
    out = np.empty((b, h, w, p["conv2"]["kernel"].shape[-1]), np.float32)
    for (top, left, _), (window, mask) in zip(grid, windows()):
      _crop_into(out, _resnet_tile(window, mask, p, stats1, stats2, self.dtype, self.groups, False), top, left)
    return out


# ----------------------------------------------------------------------------------------------
#                                   Decode and encode
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _mid_block(vae):
  """The mid block (ResNet, attention, ResNet) on a whole low-resolution activation, its attention blockwise."""
  mid = vae_lib.MidBlock(vae.norm_num_groups, jnp.dtype(vae.dtype), attention_backend="blockwise")
  return jax.jit(lambda p, x: mid.apply({"params": p}, x))


def _per_example(fn, x: np.ndarray):
  """fn over each example (B, ...) -> stacked: host memory holds one example's activations at a time (GroupNorm
  statistics are per example, so this changes nothing else)."""
  outs = [fn(x[i:i + 1]) for i in range(x.shape[0])]
  return tuple(np.concatenate(parts) for parts in zip(*outs)) if isinstance(outs[0], tuple) else np.concatenate(outs)


def decode_tiled(vae, params, latents, tile: int = 64) -> np.ndarray:
  """Decodes unscaled (B, h, w, C) latents -> (B, 8h, 8w, 3) images in tiles of `tile` latent pixels (8 x tile
  image pixels), equal to the untiled decode to float rounding."""
  if tile < 1:
    raise ValueError(f"vae.decode_tile={tile}: expected a positive number of latent pixels")
  return _per_example(lambda z: _decode_one(vae, params, z, tile), np.asarray(latents, np.float32))


def _decode_one(vae, params, x: np.ndarray, tile: int) -> np.ndarray:
  p, layers = params["decoder"], _Layers(vae)
  if vae.use_post_quant_conv:
    x = layers.conv(x, params["post_quant_conv"], tile)
  x = layers.conv(x, p["conv_in"], tile)
  x = np.asarray(_mid_block(vae)(p["mid_block"], x))  # the whole latent, blockwise attention
  levels = len(vae.block_out_channels)
  for i in range(levels):
    for j in range(vae.layers_per_block + 1):
      x = layers.resnet(x, p[f"up_blocks_{i}_resnets_{j}"], tile * 2 ** i)
    if i < levels - 1:
      x = layers.conv(x, p[f"up_blocks_{i}_upsamplers_0_conv"], tile * 2 ** (i + 1), upsample=True)
  return layers.conv(x, p["conv_out"], tile * 2 ** (levels - 1), norm=p["conv_norm_out"])


def encode_tiled(vae, params, images, tile: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Encodes (B, H, W, 3) images in [-1, 1] -> posterior mean and logvar (B, H/8, W/8, C) in tiles of `tile`
  pixels (a multiple of 8), equal to the untiled encode to float rounding."""
  factor = vae.downsample_factor
  if tile <= 0 or tile % factor:
    raise ValueError(f"encode tile must be a positive multiple of {factor}, got {tile}")
  return _per_example(lambda x: _encode_one(vae, params, x, tile), np.asarray(images, np.float32))


def _encode_one(vae, params, x: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
  p, layers = params["encoder"], _Layers(vae)
  x = layers.conv(x, p["conv_in"], tile)
  levels = len(vae.block_out_channels)
  for i in range(levels):
    for j in range(vae.layers_per_block):
      x = layers.resnet(x, p[f"down_blocks_{i}_resnets_{j}"], tile)
    if i < levels - 1:
      tile //= 2
      x = layers.conv(x, p[f"down_blocks_{i}_downsamplers_0_conv"], tile, stride=2, padding=(0, 1))
  x = np.asarray(_mid_block(vae)(p["mid_block"], x))  # the whole latent, blockwise attention
  x = layers.conv(x, p["conv_out"], tile, norm=p["conv_norm_out"])
  if vae.use_quant_conv:
    x = layers.conv(x, params["quant_conv"], tile)
  mean, logvar = np.split(x, 2, axis=-1)
  return mean, np.clip(logvar, -30.0, 20.0)
