"""Tiled VAE encode/decode: equal to the untiled VAE on real photos at any tile size, the same device programs
whatever the image size, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import relative_error
from vae_test import photos

from jdit.models import tiling
from jdit.models import vae as vae_lib

SMALL = dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8)
SD3_STYLE = dict(SMALL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)


def _vae(**config):
  """A small VAE whose norm scales and all biases are non-trivial (GroupNorm affine terms matter to tiling)."""
  vae = vae_lib.AutoencoderKL(**config)
  params = vae.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.RandomState(1)
  noisy = [leaf + 0.1 * rng.randn(*leaf.shape).astype(np.float32)
           if jax.tree_util.keystr(path).endswith(("'bias']", "'scale']")) else leaf for path, leaf in leaves]
  return vae, jax.tree_util.tree_unflatten(treedef, noisy)


def _untiled(vae, params, images):
  mean, logvar = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode))(images)
  decoded = jax.jit(lambda z: vae.apply({"params": params}, z, method=vae.decode))(mean)
  return np.asarray(mean), np.asarray(logvar), np.asarray(decoded)


@pytest.mark.parametrize("config", [SMALL, SD3_STYLE], ids=["sd", "sd3"])
def test_tiled_vae_equals_the_untiled_vae_on_real_photos(config):
  vae, params = _vae(**config)
  images = photos(192)  # two photos: statistics are per example
  mean, logvar, decoded = _untiled(vae, params, images)
  # GroupNorm statistics span the whole image and the mid block runs whole, so tiles change only rounding: 4 x 4
  # tiles of 12 latent pixels (past the edge of the 48 x 48 latents), and 5 x 5 tiles of 10.
  for tile in (12, 10):
    tiled = tiling.decode_tiled(vae, params, mean, tile=tile)
    assert tiled.shape == decoded.shape == (2, 192, 192, 3)
    assert relative_error(tiled, decoded) < 1e-5, tile
  for tile in (64, 80):
    tiled_mean, tiled_logvar = tiling.encode_tiled(vae, params, images, tile=tile)
    assert relative_error(tiled_mean, mean) < 1e-5 and relative_error(tiled_logvar, logvar) < 1e-5, tile


def test_tile_programs_do_not_grow_with_the_image():
  """Device memory is one tile's: a 4x larger image runs the very same compiled tile programs."""
  vae, params = _vae(**SMALL)
  latents = np.random.RandomState(0).randn(1, 16, 16, 4).astype(np.float32)
  tiling.decode_tiled(vae, params, latents, tile=8)
  programs = tiling._conv_tile._cache_size(), tiling._resnet_tile._cache_size()
  large = tiling.decode_tiled(vae, params, np.tile(latents, (1, 2, 2, 1)), tile=8)
  assert large.shape == (1, 128, 128, 3)
  assert (tiling._conv_tile._cache_size(), tiling._resnet_tile._cache_size()) == programs


def test_bad_tile_sizes_are_one_line_errors():
  vae, params = _vae(**SMALL)
  with pytest.raises(ValueError, match=r"vae.decode_tile=0: expected a positive number"):
    tiling.decode_tiled(vae, params, np.zeros((1, 8, 8, 4), np.float32), tile=0)
  with pytest.raises(ValueError, match="positive multiple of 4, got 250"):
    tiling.encode_tiled(vae, params, np.zeros((1, 32, 32, 3), np.float32), tile=250)
