"""The ADM U-Net (Dhariwal & Nichol 2021) in flax.linen, exactly as openai/guided-diffusion's `UNetModel`; NHWC in
and out. The "unet" model family (see jdit.models.family): the backbone DiT replaced.

    model = create_unet("adm256")                    # the ImageNet presets of guided-diffusion, see VARIANTS
    params = model.init(rng, *model.dummy_inputs())["params"]
    out = model.apply({"params": params}, x, t, y)   # x (B, H, W, C), t (B,), y (B,) -> (B, H, W, C or 2C)
Module names follow UNetModel's (input_blocks_{i}_{j}, middle_block_{j}, output_blocks_{i}_{j}, out_{j}), so its
state dicts map one to one (jdit/convert/unet.py).
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from jdit.models import fields
from jdit.models.conditioning import ClassConditional
from jdit.nn import attention, layers
from jdit.nn.layers import REMAT_POLICIES, partitioned, zeros

# guided-diffusion's README flags for its ImageNet models; attention_resolutions are downsample rates
# (image_size // the flags' "32,16,8"), as UNetModel takes them.
_ADM = dict(in_channels=3, num_classes=1000, learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True)
PRESETS = {
    "adm64": dict(_ADM, input_size=64, model_channels=192, num_res_blocks=3, channel_mult=(1, 2, 3, 4),
                  attention_resolutions=(2, 4, 8), num_head_channels=64, use_new_attention_order=True, dropout=0.1),
    "adm128": dict(_ADM, input_size=128, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 3, 4),
                   attention_resolutions=(4, 8, 16), num_heads=4),
    "adm256": dict(_ADM, input_size=256, model_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
                   attention_resolutions=(8, 16, 32), num_head_channels=64),
    "adm512": dict(_ADM, input_size=512, model_channels=256, num_res_blocks=2,
                   channel_mult=(0.5, 1, 1, 2, 2, 4, 4), attention_resolutions=(16, 32, 64), num_head_channels=64),
    # for tests and the CPU demo; not an ADM model
    "tiny": dict(input_size=8, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult=(1, 1),
                 attention_resolutions=(2,), num_head_channels=32, use_scale_shift_norm=True, resblock_updown=True),
}
VARIANTS = tuple(PRESETS)
ACT = ("act_batch", None, None, "act_embed")  # NHWC activations


def torch_default_init():
  """PyTorch's default for conv and linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def group_norm(name: str):
  """GroupNorm(32 groups, eps 1e-5) in float32, as UNetModel's GroupNorm32."""
  norm = nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)
  return lambda x: norm(x.astype(jnp.float32))


def conv(features: int, kernel: int, name: str, dtype, stride: int = 1, zero: bool = False, out_axis="embed"):
  """A same-padded convolution (float32 parameters, output channels named `out_axis`); returns float32."""
  init = zeros if zero else torch_default_init()
  layer = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((kernel // 2,) * 2,) * 2,
                  dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=partitioned(init, (None, None, None, out_axis)),
                  bias_init=partitioned(zeros, (out_axis,)))
  return lambda x: layer(x).astype(jnp.float32)


def upsample(x: jnp.ndarray) -> jnp.ndarray:
  """Nearest-neighbour x2: (B, H, W, C) -> (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def downsample(x: jnp.ndarray) -> jnp.ndarray:
  """2x2 average pooling with stride 2."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


# ----------------------------------------------------------------------------------------------
#                                          Blocks
# ----------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv, the timestep embedding (added, or AdaGN scale/shift), GroupNorm-SiLU-Dropout-Conv(zero),
  plus the skip connection; optionally resampling both paths in the middle of the first half (resblock_updown)."""
  out_channels: int
  dropout: float
  use_scale_shift_norm: bool
  resample: str = ""  # "" | "up" | "down"
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, emb: jnp.ndarray) -> jnp.ndarray:
    out = self.out_channels
    h = nn.silu(group_norm("in_layers_0")(x))  # (B, H, W, C)
    if self.resample:
      resample = upsample if self.resample == "up" else downsample
      h, x = resample(h), resample(x)  # (B, H', W', C)
    h = conv(out, 3, "in_layers_2", self.dtype)(h)  # (B, H', W', out)
    width = 2 * out if self.use_scale_shift_norm else out
    emb = layers.dense(width, (None, "embed"), self.dtype, "emb_layers_1", torch_default_init())(nn.silu(emb))
    emb = emb.astype(jnp.float32)[:, None, None, :]  # (B, 1, 1, width)
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = group_norm("out_layers_0")(h) * (1 + scale) + shift
    else:
      h = group_norm("out_layers_0")(h + emb)
    h = nn.Dropout(self.dropout, deterministic=not self.train)(nn.silu(h))
    h = conv(out, 3, "out_layers_3", self.dtype, zero=True)(h)  # (B, H', W', out)
    if x.shape[-1] != out:
      x = conv(out, 1, "skip_connection", self.dtype)(x)
    return nn.with_logical_constraint(x + h, ACT)


class AttentionBlock(nn.Module):
  """Self-attention over all positions: GroupNorm, a 1x1 qkv projection, heads, a zero-initialized 1x1 output.
  The legacy order splits heads before q/k/v (channels (H, 3, Dh)), the new order q/k/v first ((3, H, Dh))."""
  num_heads: int
  new_order: bool
  dtype: Any = jnp.float32
  backend: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, height, width, c = x.shape
    heads, tokens = self.num_heads, height * width
    h = group_norm("norm")(x).reshape(b, tokens, c)  # (B, T, C)
    qkv = layers.dense(3 * c, (None, "embed"), self.dtype, "qkv", torch_default_init())(h)  # (B, T, 3C)
    if self.new_order:
      q, k, v = jnp.moveaxis(qkv.reshape(b, tokens, 3, heads, c // heads), 2, 0)  # (B, T, H, Dh) each
    else:
      q, k, v = jnp.moveaxis(qkv.reshape(b, tokens, heads, 3, c // heads), 3, 0)  # (B, T, H, Dh) each
    backend = attention.resolve_backend(self.backend, self.dtype, tokens, c // heads)
    q, k, v = (a.astype(self.dtype) for a in (q, k, v))  # qkv is float32 on CPU (matmul.activation_dtype)
    h = attention.dot_product_attention(q, k, v, backend).reshape(b, tokens, c)  # (B, T, C): channels (H, Dh)
    h = layers.dense(c, (None, "embed"), self.dtype, "proj_out", zeros)(h).astype(jnp.float32)  # (B, T, C)
    return x + h.reshape(b, height, width, c)


class Downsample(nn.Module):
  """A stride-2 3x3 convolution (conv_resample) or 2x2 average pooling."""
  use_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return conv(x.shape[-1], 3, "op", self.dtype, stride=2)(x) if self.use_conv else downsample(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 convolution (conv_resample)."""
  use_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = upsample(x)
    return conv(x.shape[-1], 3, "conv", self.dtype)(x) if self.use_conv else x


# ----------------------------------------------------------------------------------------------
#                                           U-Net
# ----------------------------------------------------------------------------------------------

class UNet(ClassConditional, nn.Module):
  """The ADM U-Net: residual blocks and attention over channel_mult levels, skip connections between the halves,
  the timestep (+ class) embedding in every residual block. Defaults are UNetModel's."""
  FAMILY: ClassVar[str] = "unet"
  # config.model.variant names a preset: adm64 | adm128 | adm256 | adm512 (guided-diffusion's ImageNet models) | tiny
  input_size: int | tuple[int, int] = 64  # native (H, W) or side: pixels, or latents for a latent U-Net; any
                                          # multiple of size_multiple runs
  in_channels: int = 3  # channels of the input (3: RGB pixels)
  model_channels: int = 128  # width of the first level
  num_res_blocks: int = 2  # residual blocks per level
  attention_resolutions: tuple = (2, 4)  # downsample rates ds (1, 2, 4, ...) with attention: image_size //
                                         # guided-diffusion's flag values
  dropout: float = 0.0  # in the residual blocks (adm64: 0.1)
  channel_mult: tuple = (1, 2, 4, 8)  # width multiplier of each level
  conv_resample: bool = True  # learned convolutions to up/downsample (when not resblock_updown)
  num_classes: int = 0  # 0: unconditional
  class_dropout_prob: float = 0.0  # label dropout; > 0 adds the null class for classifier-free guidance (ADM: 0)
  learn_sigma: bool = True  # output channels x2
  num_heads: int = 1  # attention heads (when num_head_channels is -1)
  num_head_channels: int = -1  # > 0: heads of this width, num_heads ignored
  num_heads_upsample: int = -1  # -1: num_heads (the upsampling half's attention)
  use_scale_shift_norm: bool = False  # AdaGN: the embedding scales and shifts the normalized activations
  resblock_updown: bool = False  # residual blocks resample instead of Downsample / Upsample
  use_new_attention_order: bool = False  # split q/k/v before heads (QKVAttention) instead of after (legacy)
  dtype: str = "float32"  # compute dtype of convolutions and linears: float32 | bfloat16; norms, softmax,
                          # residuals and parameters stay float32
  attention_backend: str = "auto"  # auto (per platform) | einsum | xla | cudnn | splash (see nn/attention.py)
  remat: str = "none"  # none | full | dots: rematerialization of each residual and attention block

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this (one halving per level below the top)."""
    return 2 ** (len(self.channel_mult) - 1)

  def widths(self) -> list[int]:
    return [int(mult * self.model_channels) for mult in self.channel_mult]

  def heads(self, channels: int, upsampling: bool = False) -> int:
    if self.num_head_channels != -1:
      return channels // self.num_head_channels
    return self.num_heads_upsample if upsampling and self.num_heads_upsample != -1 else self.num_heads

  def describe(self) -> str:
    heads = f"num_head_channels={self.num_head_channels}" if self.num_head_channels != -1 else \
        f"num_heads={self.num_heads}"
    return (f"UNet(model_channels={self.model_channels}, channel_mult={tuple(self.channel_mult)}, "
            f"num_res_blocks={self.num_res_blocks}, attention_resolutions={tuple(self.attention_resolutions)}, "
            f"{heads}, in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"learn_sigma={self.learn_sigma})")

  def check_config(self) -> None:
    """Raises ValueError naming the first invalid field."""
    layers.check_compute_options(self.remat, self.attention_backend)
    for width in self.widths():
      if width <= 0 or width % 32:
        raise ValueError(f"model_channels={self.model_channels} x channel_mult={tuple(self.channel_mult)} must "
                         f"give multiples of 32 channels (GroupNorm(32)), got {width}")
      for upsampling in (False, True):
        heads = self.heads(width, upsampling)
        if heads <= 0 or width % heads or (self.num_head_channels != -1 and width % self.num_head_channels):
          raise ValueError(f"num_heads={self.num_heads}, num_head_channels={self.num_head_channels}, "
                           f"num_heads_upsample={self.num_heads_upsample} must split {width} channels into heads")
    for dim in self.input_hw:
      if dim % self.size_multiple:
        raise ValueError(f"input_size={self.input_size} must be a multiple of {self.size_multiple} "
                         f"(2^(len(channel_mult) - 1))")

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    self.check_config()
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be (B, H, W, in_channels={self.in_channels}), got shape {x.shape}")
    if x.shape[1] % self.size_multiple or x.shape[2] % self.size_multiple:
      raise ValueError(f"input height and width must be multiples of {self.size_multiple}, got {x.shape[1:3]}")
    dtype, widths, emb_dim = jnp.dtype(self.dtype), self.widths(), 4 * self.model_channels
    resblock, attn = ResBlock, AttentionBlock
    if self.remat != "none":
      resblock, attn = (nn.remat(m, policy=REMAT_POLICIES[self.remat]) for m in (ResBlock, AttentionBlock))
    res = lambda out, name, resample="": resblock(out, self.dropout, self.use_scale_shift_norm, resample, train,
                                                 dtype, name=name)
    attend = lambda channels, name, up=False: attn(self.heads(channels, up), self.use_new_attention_order, dtype,
                                                   self.attention_backend, name=name)

    # Condition: timestep embedding (+ class embedding).
    freqs = layers.timestep_embedding(t, self.model_channels)  # (B, model_channels)
    emb = layers.dense(emb_dim, (None, "embed"), dtype, "time_embed_0", torch_default_init())(freqs)
    emb = layers.dense(emb_dim, (None, "embed"), dtype, "time_embed_2", torch_default_init())(nn.silu(emb))
    emb = emb.astype(jnp.float32)  # (B, 4 model_channels)
    if self.num_classes:
      if y is None:
        raise ValueError("y (class labels) is required: the model has num_classes > 0")
      emb = emb + layers.LabelEmbedder(self.num_classes, emb_dim, self.class_dropout_prob, name="label_emb")(y, train)

    # Downsampling half: every output is kept for a skip connection.
    h = conv(widths[0], 3, "input_blocks_0_0", dtype)(x)  # (B, H, W, C0)
    skips, index, ds = [h], 1, 1
    for level, width in enumerate(widths):
      for _ in range(self.num_res_blocks):
        h = res(width, f"input_blocks_{index}_0")(h, emb)  # (B, H/ds, W/ds, width)
        if ds in self.attention_resolutions:
          h = attend(width, f"input_blocks_{index}_1")(h)
        skips.append(h)
        index += 1
      if level < len(widths) - 1:
        name = f"input_blocks_{index}_0"
        h = res(width, name, "down")(h, emb) if self.resblock_updown else \
            Downsample(self.conv_resample, dtype, name=name)(h)  # (B, H/2ds, W/2ds, width)
        skips.append(h)
        index, ds = index + 1, ds * 2

    h = res(widths[-1], "middle_block_0")(h, emb)
    h = attend(widths[-1], "middle_block_1")(h)
    h = res(widths[-1], "middle_block_2")(h, emb)  # (B, H/ds, W/ds, C_last)

    # Upsampling half: each block first concatenates the matching skip connection.
    index = 0
    for level in reversed(range(len(widths))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # (B, H/ds, W/ds, C + C_skip)
        h = res(widths[level], f"output_blocks_{index}_0")(h, emb)  # (B, H/ds, W/ds, width)
        part = 1
        if ds in self.attention_resolutions:
          h = attend(widths[level], f"output_blocks_{index}_1", up=True)(h)
          part = 2
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{index}_{part}"
          h = res(widths[level], name, "up")(h, emb) if self.resblock_updown else \
              Upsample(self.conv_resample, dtype, name=name)(h)  # (B, 2H/ds, 2W/ds, width)
          ds //= 2
        index += 1

    h = nn.silu(group_norm("out_0")(h))
    return conv(self.out_channels, 3, "out_2", dtype, zero=True, out_axis=None)(h)  # (B, H, W, C_out), unsharded


# ----------------------------------------------------------------------------------------------
#                               Family interface (jdit.models.family)
# ----------------------------------------------------------------------------------------------

def create_unet(variant: str, **overrides) -> UNet:
  """The named preset ("adm64", "adm128", "adm256", "adm512", "tiny") with any UNet field overridden."""
  return fields.create(UNet, PRESETS, variant, **overrides)


MODEL = UNet
VARIANT = "adm256"
TINY = dict(variant="tiny")
LORA_TARGETS = (r"_\d+/(qkv|proj_out)$",)  # lora.spec_for's default: the attention blocks' projections
TABLE = ("adm64", "adm128", "adm256", "adm512")  # the model table's rows: each at its own resolution


def table_model(name: str, resolution: int | None = None) -> UNet:
  """Preset `name` conditioned on 1000 classes with learned sigma, at `resolution` pixels (default: its own)."""
  model = create_unet(name, num_classes=1000, learn_sigma=True)
  return model.clone(input_size=resolution) if resolution else model
