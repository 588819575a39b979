"""Stable Diffusion's AutoencoderKL (the VAE of latent diffusion) in flax.linen, NHWC.

    vae = create_vae("sd")       # SD 1.x/2.x (sd-vae-ft-ema / ft-mse); "sdxl", "sd3" (16 channels), "flux"
    mean, logvar = vae.apply(variables, images, method=vae.encode)   # images (B, H, W, 3) in [-1, 1]
    images = vae.apply(variables, latents, method=vae.decode)        # latents (B, H/8, W/8, 4), unscaled
Latent diffusion trains on vae.scale_latents(sample(mean, logvar)) = (z - shift_factor) * scaling_factor, and
decodes vae.unscale_latents(latents): the VAE's two factors are the one source of truth for that scaling.
Module and parameter names follow diffusers' AutoencoderKL, so its weights map one to one.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.nn.blockwise import blockwise_attention

VAE_CONFIGS = {
    # block widths, resnets per block, latent channels, scaling and shift factors
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               scaling_factor=0.18215, shift_factor=0.0),
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                 scaling_factor=0.13025, shift_factor=0.0),
    # SD3 / SD3.5 and Flux: 16 latent channels, no quant convs, shifted latents
    "sd3": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
    "flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
}


def conv(features: int, kernel: int, name: str, stride: int = 1, padding=None, dtype=jnp.float32) -> nn.Conv:
  pad = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


GROUPNORM_EPS = 1e-6


def group_norm(name: str, groups: int = 32) -> nn.GroupNorm:
  """GroupNorm(32, eps 1e-6) with the exact (two-pass) variance of PyTorch."""
  return nn.GroupNorm(num_groups=groups, epsilon=GROUPNORM_EPS, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv3x3 twice, plus a 1x1 conv shortcut when the width changes."""
  features: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    h = conv(self.features, 3, "conv1", dtype=self.dtype)(nn.silu(group_norm("norm1", self.groups)(x)))
    h = conv(self.features, 3, "conv2", dtype=self.dtype)(nn.silu(group_norm("norm2", self.groups)(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "conv_shortcut", dtype=self.dtype)(x)
    return x + h  # (B, H, W, features)


class AttentionBlock(nn.Module):
  """Single-head self-attention over all pixels, with GroupNorm and a residual connection; "blockwise"
  attention keeps its memory linear in pixels (tiled decoding of large images)."""
  groups: int = 32
  dtype: Any = jnp.float32
  attention_backend: str = "einsum"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    tokens = group_norm("group_norm", self.groups)(x).reshape(b, h * w, c)  # (B, T, C)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    q, k, v = dense("to_q")(tokens), dense("to_k")(tokens), dense("to_v")(tokens)  # (B, T, C)
    if self.attention_backend == "einsum":
      scores = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)  # (B, T, T)
      out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)  # (B, T, C)
    else:
      out = blockwise_attention(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]  # (B, T, C), one head
    return x + dense("to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
  """ResNet, attention, ResNet at the lowest resolution."""
  groups: int = 32
  dtype: Any = jnp.float32
  attention_backend: str = "einsum"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    x = AttentionBlock(self.groups, self.dtype, self.attention_backend, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """(B, H, W, 3) -> (B, H/8, W/8, 2 * latent_channels) posterior moments (before quant_conv)."""
  block_out_channels: tuple
  layers_per_block: int
  latent_channels: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = conv(self.block_out_channels[0], 3, "conv_in", dtype=self.dtype)(x)
    for i, width in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        x = ResnetBlock(width, self.groups, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(x)
      if i < len(self.block_out_channels) - 1:  # stride-2 conv after padding right and bottom by one
        x = conv(width, 3, f"down_blocks_{i}_downsamplers_0_conv", 2, ((0, 1), (0, 1)), self.dtype)(x)
    x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
    x = nn.silu(group_norm("conv_norm_out", self.groups)(x))
    return conv(2 * self.latent_channels, 3, "conv_out", dtype=self.dtype)(x)


class Decoder(nn.Module):
  """(B, h, w, latent_channels) (after post_quant_conv) -> (B, 8h, 8w, 3)."""
  block_out_channels: tuple
  layers_per_block: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
    widths = tuple(reversed(self.block_out_channels))
    x = conv(widths[0], 3, "conv_in", dtype=self.dtype)(z)
    x = MidBlock(self.groups, self.dtype, name="mid_block")(x)
    for i, width in enumerate(widths):
      for j in range(self.layers_per_block + 1):
        x = ResnetBlock(width, self.groups, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(x)
      if i < len(widths) - 1:  # nearest-neighbour x2, then a 3x3 conv
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        x = conv(width, 3, f"up_blocks_{i}_upsamplers_0_conv", dtype=self.dtype)(x)
    x = nn.silu(group_norm("conv_norm_out", self.groups)(x))
    return conv(3, 3, "conv_out", dtype=self.dtype)(x)


class AutoencoderKL(nn.Module):
  """The KL-regularized autoencoder: encode -> (mean, logvar) of a diagonal Gaussian; decode latents."""
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215  # latent diffusion sees (z - shift_factor) * scaling_factor
  shift_factor: float = 0.0  # 0 for SD 1.x/2.x and SDXL; SD3's VAE shifts its latents too
  use_quant_conv: bool = True  # the 1x1 convs around the latent (SD 1.x/2.x, SDXL); SD3 and Flux have none
  use_post_quant_conv: bool = True
  dtype: str = "float32"

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent pixel along each axis (8 for the SD VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    dtype = jnp.dtype(self.dtype)
    self.encoder = Encoder(self.block_out_channels, self.layers_per_block, self.latent_channels,
                           self.norm_num_groups, dtype)
    self.decoder = Decoder(self.block_out_channels, self.layers_per_block, self.norm_num_groups, dtype)
    identity = lambda x: x
    self.quant_conv = conv(2 * self.latent_channels, 1, "quant_conv", dtype=dtype) if self.use_quant_conv \
        else identity
    self.post_quant_conv = conv(self.latent_channels, 1, "post_quant_conv", dtype=dtype) \
        if self.use_post_quant_conv else identity

  def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """images (B, H, W, 3) in [-1, 1] -> mean, logvar (B, H/8, W/8, latent_channels); logvar in [-30, 20]."""
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
    """Unscaled latents (B, h, w, latent_channels) -> images (B, 8h, 8w, 3), roughly in [-1, 1]."""
    return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

  def scale_latents(self, z: jnp.ndarray) -> jnp.ndarray:
    """VAE latents -> the latents a diffusion model sees: (z - shift_factor) * scaling_factor."""
    return (z - self.shift_factor) * self.scaling_factor

  def unscale_latents(self, latents: jnp.ndarray) -> jnp.ndarray:
    """Inverse of scale_latents: what `decode` takes."""
    return latents / self.scaling_factor + self.shift_factor

  def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
    """Reconstruction through the posterior mode (used for init)."""
    return self.decode(self.encode(images)[0])


def sample_posterior(mean: jnp.ndarray, logvar: jnp.ndarray, rng: jax.Array) -> jnp.ndarray:
  """mean + exp(logvar / 2) * N(0, 1)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def create_vae(name: str = "sd", **overrides) -> AutoencoderKL:
  if name not in VAE_CONFIGS:
    raise ValueError(f"unknown VAE {name!r}; expected one of {', '.join(VAE_CONFIGS)}")
  return AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})
