"""Positional encodings as pure functions: the official 2D sin-cos table, axial 2D RoPE and n-axis RoPE (Flux).

Both are computed from the token grid of the input at trace time (numpy, static shapes), so a model
runs on any grid size or aspect ratio without stored position tables.
"""
import jax.numpy as jnp
import numpy as np

POS_EMBEDS = ("sincos", "rope")  # the positions a model may use: 2D sin-cos table or 2D RoPE


def grid_positions(grid_h: int, grid_w: int) -> np.ndarray:
  """(row, column) of every token in row-major order: shape (grid_h * grid_w, 2), float32."""
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32),
                           indexing="ij")
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2)), i < dim/2. Shape (len(p), dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.einsum("m,d->md", positions.reshape(-1), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """Official DiT (MAE) 2D sin-cos table, (grid_h * grid_w, embed_dim) float32.

  The first half of the channels encodes the column index, the second half the row index, each with
  `sincos_1d(embed_dim / 2, .)`; tokens are in row-major order (the order of flattened patches).
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size must be divisible by 4 for 2D sin-cos positions, got {embed_dim}")
  pos = grid_positions(grid_h, grid_w)
  table = np.concatenate([sincos_1d(embed_dim // 2, pos[:, 1]), sincos_1d(embed_dim // 2, pos[:, 0])], axis=1)
  return table.astype(np.float32)


def rope_axes(axes_dims: tuple, ids: np.ndarray, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """Rotary angles over several position axes (Flux's 3-axis RoPE): ids (T, n) -> (cos, sin), each
  (T, sum(axes_dims) / 2). Axis a owns axes_dims[a] / 2 consecutive rotary pairs, pair i of it turning by
  ids[:, a] * base^(-2i / axes_dims[a])."""
  if len(axes_dims) != ids.shape[-1] or any(d % 2 for d in axes_dims):
    raise ValueError(f"RoPE axis dims must be even, one per id axis ({ids.shape[-1]}), got {tuple(axes_dims)}")
  ids = np.asarray(ids, dtype=np.float64)
  angles = np.concatenate([ids[:, a:a + 1] * base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
                           for a, d in enumerate(axes_dims)], axis=1)  # (T, sum / 2)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope_2d(head_dim: int, positions: np.ndarray, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
  """Axial 2D rotary angles for `positions` (T, 2) = (row, column): returns (cos, sin), each (T, head_dim/2).

  Rotary pair i < head_dim/4 turns by row * theta_i, pair head_dim/4 + i by column * theta_i,
  with theta_i = base^(-i / (head_dim/4)): half the rotary dimensions for rows, half for columns.
  """
  if head_dim % 4:
    raise ValueError(f"head dimension must be divisible by 4 for 2D RoPE, got {head_dim}")
  return rope_axes((head_dim // 2, head_dim // 2), positions, base)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates consecutive pairs (x[2i], x[2i+1]) of x (B, T, H, Dh) by the angles behind cos/sin (T, Dh/2)."""
  x32 = x.astype(jnp.float32)
  x_even, x_odd = x32[..., 0::2], x32[..., 1::2]  # (B, T, H, Dh/2)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, Dh/2)
  rotated = jnp.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], axis=-1)  # (B, T, H, Dh/2, 2)
  return rotated.reshape(x.shape).astype(x.dtype)


def cropped_sincos_2d(embed_dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int) -> np.ndarray:
  """SD3's table (diffusers' PatchEmbed with pos_embed_max_size): the sin-cos table of a max_size x max_size grid
  whose positions are index / (max_size / base_size) (float32), centre-cropped to grid_h x grid_w.
  (grid_h * grid_w, embed_dim) float32, channels as sincos_2d (columns first)."""
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f"a {grid_h}x{grid_w} patch grid exceeds pos_embed_max_size={max_size}")
  if embed_dim % 4:
    raise ValueError(f"hidden size must be divisible by 4 for 2D sin-cos positions, got {embed_dim}")
  coords = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  rows, cols = np.meshgrid(coords[top:top + grid_h], coords[left:left + grid_w], indexing="ij")
  table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  return table.astype(np.float32)
