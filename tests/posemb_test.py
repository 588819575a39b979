"""2D sin-cos against diffusers' reference table; RoPE is relative and works on any grid."""
import numpy as np
import pytest

from jdit.nn import posemb


def test_sincos_matches_diffusers_reference():
  embeddings = pytest.importorskip("diffusers.models.embeddings")
  for dim, grid in ((64, 4), (384, 16), (1152, 32)):
    ref = embeddings.get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="np")
    np.testing.assert_allclose(posemb.sincos_2d(dim, grid, grid), ref, rtol=1e-6, atol=1e-6)


def test_sincos_non_square_orders_columns_first():
  table = posemb.sincos_2d(16, 2, 3)  # 2 rows, 3 columns, row-major tokens
  assert table.shape == (6, 16)
  np.testing.assert_allclose(table[1, :8], posemb.sincos_1d(8, np.array([1.0]))[0], rtol=1e-6)  # column 1
  np.testing.assert_allclose(table[1, 8:], posemb.sincos_1d(8, np.array([0.0]))[0], rtol=1e-6)  # row 0
  np.testing.assert_allclose(table[3, 8:], posemb.sincos_1d(8, np.array([1.0]))[0], rtol=1e-6)  # row 1


def _rope_scores(q, k, positions, head_dim=16):
  cos, sin = posemb.rope_2d(head_dim, positions)
  q_rot, k_rot = np.asarray(posemb.apply_rope(q, cos, sin)), np.asarray(posemb.apply_rope(k, cos, sin))
  return np.einsum("bqhd,bkhd->bhqk", q_rot, k_rot)


def test_rope_scores_depend_only_on_relative_positions():
  rng = np.random.RandomState(0)
  q, k = rng.randn(2, 12, 3, 16).astype(np.float32), rng.randn(2, 12, 3, 16).astype(np.float32)
  positions = posemb.grid_positions(3, 4)  # non-square grid
  base = _rope_scores(q, k, positions)
  shifted = _rope_scores(q, k, positions + np.array([5.0, -7.0], np.float32))
  np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
  # Not trivially invariant: transposing the grid (a non-uniform change) changes the scores.
  transposed = _rope_scores(q, k, positions[:, ::-1].copy())
  assert np.abs(transposed - base).max() > 1e-2


def test_rope_rotates_rows_and_columns_separately_and_keeps_norms():
  cos, sin = posemb.rope_2d(16, np.array([[2.0, 3.0]]))
  angles = np.arctan2(sin, cos)[0]
  theta = 10000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(angles[:4], 2.0 * theta, rtol=1e-5)
  np.testing.assert_allclose(angles[4:], np.angle(np.exp(3j * theta)), rtol=1e-5, atol=1e-6)
  x = np.random.RandomState(1).randn(1, 1, 2, 16).astype(np.float32)
  rotated = np.asarray(posemb.apply_rope(x, cos, sin))
  np.testing.assert_allclose(np.linalg.norm(rotated, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_rejects_head_dim_not_divisible_by_4():
  with pytest.raises(ValueError, match="divisible by 4"):
    posemb.rope_2d(18, posemb.grid_positions(2, 2))
