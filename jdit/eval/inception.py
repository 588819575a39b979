"""Inception-v3 of the 2015-12-05 TensorFlow graph (the FID network) in flax.linen, NHWC, float32 at HIGHEST
matmul precision on every platform.

The FID variant differs from torchvision's Inception-v3: average pools exclude the padding, the last block's
pool branch is a 3x3 max pool, BatchNorm eps is 1e-3 and the 1008 logits are read without the bias. Module names
follow pytorch-fid's / torch-fidelity's state dict (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`,
..., `fc.weight`), so its weights load by name (jdit.eval.weights).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
BN_EPS = 1e-3
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of Mixed_6d.branch1x1 (17 x 17 x 7 = 2023 features)


class BatchNormInference(nn.Module):
  """BatchNorm with stored statistics: (x - mean) / sqrt(var + eps) * scale + bias."""

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    mean = self.param("mean", nn.initializers.zeros, (channels,))
    var = self.param("var", nn.initializers.ones, (channels,))
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    return (x - mean) / jnp.sqrt(var + BN_EPS) * scale + bias


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm -> ReLU; `padding` as (pad_h, pad_w)."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=HIGHEST, name="conv")(x)
    return nn.relu(BatchNormInference(name="bn")(x))


def avg_pool_3x3(x):
  """3x3, stride 1, padding 1, the padding left out of each average (TensorFlow's SAME average pool)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x, stride: int = 2):
  padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):  # Mixed_5b..5d: 35 x 35
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)  # (B, 35, 35, 224 + pool_features)


class InceptionB(nn.Module):  # Mixed_6a: 35 -> 17
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, max_pool_3x3(x)], -1)  # (B, 17, 17, 768)


class InceptionC(nn.Module):  # Mixed_6b..6e: 17 x 17; the branch1x1 output also returned (sFID)
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    for i, (kernel, padding) in enumerate((((7, 1), (3, 0)), ((1, 7), (0, 3)), ((7, 1), (3, 0))), 2):
      bd = BasicConv(c7, kernel, padding=padding, name=f"branch7x7dbl_{i}")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1), b1  # (B, 17, 17, 768), (B, 17, 17, 192)


class InceptionD(nn.Module):  # Mixed_7a: 17 -> 8
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool_3x3(x)], -1)  # (B, 8, 8, 1280)


class InceptionE(nn.Module):  # Mixed_7b (average pool branch), Mixed_7c (max pool branch, as the TF graph)
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = max_pool_3x3(x, stride=1) if self.max_pool else avg_pool_3x3(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)  # (B, 8, 8, 2048)


class InceptionV3(nn.Module):
  """(B, 299, 299, 3) inputs already in [-1, 1] -> {"pool_3": (B, 2048), "logits": (B, 1008) without the bias,
  "spatial": (B, 2023) (Mixed_6d.branch1x1's first 7 channels, flattened h, w, c)}."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)  # (B, 149, 149, 32)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # (B, 147, 147, 32)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # (B, 147, 147, 64)
    x = max_pool_3x3(x)  # (B, 73, 73, 64)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)  # (B, 73, 73, 80)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # (B, 71, 71, 192)
    x = max_pool_3x3(x)  # (B, 35, 35, 192)
    x = InceptionA(32, name="Mixed_5b")(x)  # (B, 35, 35, 256)
    x = InceptionA(64, name="Mixed_5c")(x)  # (B, 35, 35, 288)
    x = InceptionA(64, name="Mixed_5d")(x)  # (B, 35, 35, 288)
    x = InceptionB(name="Mixed_6a")(x)  # (B, 17, 17, 768)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, spatial = InceptionC(160, name="Mixed_6d")(x)  # spatial: (B, 17, 17, 192)
    x, _ = InceptionC(192, name="Mixed_6e")(x)  # (B, 17, 17, 768)
    x = InceptionD(name="Mixed_7a")(x)  # (B, 8, 8, 1280)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)  # (B, 8, 8, 2048)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # (B, 8, 8, 2048)
    pool = x.mean(axis=(1, 2))  # (B, 2048)
    logits = nn.Dense(NUM_LOGITS, use_bias=False, precision=HIGHEST, name="fc")(pool)  # (B, 1008)
    spatial = spatial[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)  # (B, 2023)
    return {"pool_3": pool, "logits": logits, "spatial": spatial}
