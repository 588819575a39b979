"""ADM's feature pipeline: uint8 NHWC images of any size -> float in [0, 255] -> TensorFlow 1's legacy bilinear
resize to 299 (align_corners False, no half-pixel offset) -> (x - 128) / 128 -> Inception-v3 -> pool_3, logits,
spatial; and the loader of pytorch-fid's Inception weights.

    model, params = load_inception("pt_inception-2015-12-05-6726825d.pth")
    features = inception_features(model, params, images)   # {"pool_3": (N, 2048), "logits": (N, 1008),
                                                            #  "spatial": (N, 2023)} float32 numpy
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jdit.eval.inception import InceptionV3

INPUT_SIZE = 299
MODEL = InceptionV3()  # one instance: the compiled feature function is cached per model and mesh
FEATURE_DIMS = {"pool_3": 2048, "logits": 1008, "spatial": 2023}
BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def tf1_resize_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(lower, upper, lerp) of TensorFlow 1's legacy bilinear resize along one axis: source position
  out * (in / out) in float32, lower its floor, upper min(lower + 1, in - 1), lerp the float32 remainder."""
  scale = np.float32(in_size) / np.float32(out_size)
  position = np.arange(out_size, dtype=np.float32) * scale  # (out,)
  lower = np.floor(position).astype(np.int32)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, position - lower.astype(np.float32)


def tf1_resize_bilinear(images: jnp.ndarray, size: int = INPUT_SIZE) -> jnp.ndarray:
  """(B, H, W, C) float32 -> (B, size, size, C) as tf.compat.v1.image.resize_bilinear(align_corners=False):
  rows interpolated along the width first (top, bottom), then between them."""
  y0, y1, wy = map(jnp.asarray, tf1_resize_indices(images.shape[1], size))
  x0, x1, wx = map(jnp.asarray, tf1_resize_indices(images.shape[2], size))
  top, bottom = images[:, y0], images[:, y1]  # (B, size, W, C)
  wx = wx[None, None, :, None]
  top = top[:, :, x0] + (top[:, :, x1] - top[:, :, x0]) * wx  # (B, size, size, C)
  bottom = bottom[:, :, x0] + (bottom[:, :, x1] - bottom[:, :, x0]) * wx
  return top + (bottom - top) * wy[None, :, None, None]


def check_images(images, field: str = "images") -> None:
  """A one-line ValueError unless `images` is uint8 (N, H, W, 3) or grayscale (N, H, W, 1)."""
  images = images if hasattr(images, "dtype") else np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{field}: expected uint8 images (N, H, W, 3) or grayscale (N, H, W, 1), got {images.dtype} "
                     f"{tuple(images.shape)}")


@functools.lru_cache(maxsize=8)
def _feature_fn(model, mesh):
  """(jitted (params, uint8 batch) -> features, the batch sharding), one per model and mesh."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  @jax.jit
  def features(params, batch):  # (B, H, W, 3 or 1) uint8, B a multiple of the devices
    batch = jax.lax.with_sharding_constraint(batch, sharding)
    x = tf1_resize_bilinear(batch.astype(jnp.float32))  # [0, 255]
    x = jnp.broadcast_to(x, (*x.shape[:3], 3))  # grayscale: the gray value in all three channels
    return model.apply({"params": params}, (x - 128.0) / 128.0)
  return features, sharding


def inception_features(model, params, images, batch_size: int = 200, log=None) -> dict[str, np.ndarray]:
  """pool_3 (N, 2048), logits (N, 1008, without the bias) and spatial (N, 2023) float32 of uint8 NHWC images of
  any size (grayscale repeated to RGB), through ADM's pipeline; batches of `batch_size` (rounded up to the devices) split over all local
  devices, the last one padded (one compilation); `log(done, total)` after each batch."""
  check_images(images)
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  per_call = math.ceil(min(batch_size, max(len(images), 1)) / len(devices)) * len(devices)
  features, sharding = _feature_fn(model, mesh)
  outputs = []
  for begin in range(0, len(images), per_call):
    chunk = np.asarray(images[begin:begin + per_call])
    padded = np.concatenate([chunk, np.zeros((per_call - len(chunk), *chunk.shape[1:]), np.uint8)])
    result = jax.device_get(features(params, jax.device_put(padded, sharding)))
    outputs.append({k: np.asarray(v[:len(chunk)], np.float32) for k, v in result.items()})
    if log is not None:
      log(begin + len(chunk), len(images))
  if not outputs:
    return {key: np.zeros((0, dim), np.float32) for key, dim in FEATURE_DIMS.items()}
  return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def inception_params_from_state_dict(weights: dict[str, np.ndarray]) -> dict:
  """pytorch-fid / torch-fidelity keys -> the InceptionV3 parameter tree (conv OIHW -> HWIO, fc (O, I) -> (I, O));
  the fc bias and BatchNorm step counters are not used."""
  from jdit.state_dict import CheckpointError
  params = {}
  for key, value in weights.items():
    *path, leaf = key.split(".")
    if leaf == "num_batches_tracked" or key == "fc.bias":
      continue
    value = np.asarray(value, np.float32)
    if path and path[-1] == "bn" and leaf in BN_NAMES:
      leaf = BN_NAMES[leaf]
    elif leaf == "weight" and value.ndim == 4:
      leaf, value = "kernel", value.transpose(2, 3, 1, 0)
    elif key == "fc.weight" and value.ndim == 2:
      leaf, value = "kernel", value.T
    else:
      raise CheckpointError(f"{key}: not a tensor of pytorch-fid's Inception-v3 (shape {tuple(value.shape)})")
    node = params
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return params


def load_inception(path: str) -> tuple[InceptionV3, dict]:
  """(model, params) from pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the TF graph's numbers; read with
  weights_only=True) or the same state dict as .safetensors; a one-line CheckpointError naming the file or key."""
  from jdit import state_dict
  model = MODEL
  weights = state_dict.read_weight_file(path)
  try:
    params = inception_params_from_state_dict(state_dict.select_weights(weights, "model", path))
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
    state_dict.check_params(params, expected["params"], f"Inception-v3 ({path})")
  except state_dict.CheckpointError as e:
    raise state_dict.CheckpointError(f"{path}: {e}") from None
  return model, jax.tree.map(jnp.asarray, params)
