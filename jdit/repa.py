"""REPA (Yu et al. 2024, "Representation Alignment for Generation"): the tokens leaving one block of the diffusion
transformer, through a small MLP projector, are pulled toward a frozen DINOv2's patch features of the clean image.

    config.repa.encoder = "/models/dinov2-base"   # a transformers Dinov2Model directory; "" disables REPA
    alignment = repa.Alignment(config.repa, model)      # depth, weight and the projector for this model
    encoder = repa.Encoder(config.repa.encoder, model)  # features(batch) -> batch with FEATURES, (B, T, D_enc)
The training loss becomes loss + repa.weight * alignment, alignment = -mean over tokens of cos(projector(h_k), z)
per example (REPA's proj_loss). The encoder sees the clean image resized (PyTorch's bicubic) to the model's token
grid times its patch size, ImageNet-normalized; its patch tokens after the final LayerNorm are z. Latent models
read each latent's source image from the image folder its cache was extracted from (data.images_dir), flipped
with the latent, as REPA trains on SD-VAE latents beside the raw images. The projector's
parameters sit beside the model's under PROJECTOR: trained and checkpointed with the run, outside the EMA, so
sampling checkpoints and grids never hold them.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.data import transforms
from jdit.nn.layers import dense

PROJECTOR = "repa_projector"  # the projector's parameters, beside the model's
FEATURES = "repa_features"  # the batch key of the encoder's (B, T, D_enc) patch features


class Projector(nn.Module):
  """REPA's build_mlp: Linear(D, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out), per token."""
  hidden: int
  out: int

  @nn.compact
  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    h = nn.silu(dense(self.hidden, ("embed", "mlp"), jnp.float32, "fc1")(tokens))  # (B, T, P)
    h = nn.silu(dense(self.hidden, ("mlp", "embed"), jnp.float32, "fc2")(h))  # (B, T, P)
    return dense(self.out, ("embed", None), jnp.float32, "fc3")(h)  # (B, T, D_enc)


def alignment_loss(projected: jnp.ndarray, features: jnp.ndarray) -> jnp.ndarray:
  """(B,) per-example REPA loss: the negative cosine similarity of each token's projection and encoder feature,
  averaged over the tokens."""
  unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # F.normalize
  cosine = jnp.sum(unit(projected.astype(jnp.float32)) * unit(features.astype(jnp.float32)), axis=-1)  # (B, T)
  return -cosine.mean(axis=1)


def model_params(params: dict) -> dict:
  """The model's parameters without the projector (what the EMA tracks and sampling uses)."""
  return {k: v for k, v in params.items() if k != PROJECTOR}


class Alignment:
  """config.repa for `model`: the aligned block, the loss weight and the projector to the encoder's width."""

  def __init__(self, repa, model, encoder_width: int):
    from jdit.models import family
    if not hasattr(family.get(model.FAMILY), "block_tokens"):
      raise ValueError(f"repa.encoder: model.family={model.FAMILY!r} does not expose its block tokens (REPA "
                       "aligns a transformer block's tokens)")
    if not 1 <= repa.depth <= getattr(model, "depth", 0):
      raise ValueError(f"repa.depth={repa.depth}: expected a block of the model, 1 to {getattr(model, 'depth', 0)}")
    self.depth, self.weight = repa.depth, repa.weight
    self.projector = Projector(repa.projector_dim, encoder_width)
    self.width = model.hidden_size

  def init(self, rng: jax.Array):
    """The projector's (boxed) parameters."""
    return self.projector.init(rng, jnp.zeros((1, 1, self.width)))["params"]

  def loss(self, params: dict, tokens: jnp.ndarray, batch: dict) -> jnp.ndarray:
    """(B,) alignment of the model's block tokens with the batch's encoder features."""
    projected = self.projector.apply({"params": params[PROJECTOR]}, tokens.astype(jnp.float32))
    return alignment_loss(projected, batch[FEATURES])


def encoder_width(path: str) -> int:
  """The feature width of config.repa.encoder; ValueError naming the field when it is not a DINOv2."""
  from jdit.convert import config_error
  from jdit.eval.dinov2 import encoder_width as width
  from jdit.state_dict import CheckpointError
  try:
    return width(path)
  except CheckpointError as e:
    raise config_error("repa.encoder", path, e) from None


class Encoder:
  """The frozen encoder's patch features of a batch's clean images at the model's token grid: its "image" ([-1, 1]
  pixels, NHWC), or for latent models its "source_image" (uint8 0..255; data.images_dir)."""

  def __init__(self, path: str, model, mesh):
    from jdit import sharding
    from jdit.eval import dinov2
    self.model, params = dinov2.load_dinov2(path)
    self.params = jax.device_put(params, sharding.replicated(mesh))
    height, width = model.input_hw
    grid, patch = (height // model.size_multiple, width // model.size_multiple), self.model.patch_size
    mean, std = dinov2.MEAN, dinov2.STD

    def features(params, pixels):  # pixels in [0, 1], any size: resized to the grid x the encoder's patch
      if pixels.shape[-1] == 1:
        pixels = jnp.repeat(pixels, 3, axis=-1)  # grayscale digits: the encoder reads RGB
      resize = [dinov2.bicubic_matrix(pixels.shape[1 + a], grid[a] * patch) for a in (0, 1)]  # PyTorch's bicubic
      x = jnp.einsum("hi,wj,bijc->bhwc", *resize, pixels, precision=jax.lax.Precision.HIGHEST)
      out = self.model.apply({"params": params}, (x - mean) / std)["last_hidden_state"]
      return out[:, 1 + self.model.num_register_tokens:]  # (B, T, D_enc): the patch tokens

    self.features = jax.jit(features)

  @property
  def width(self) -> int:
    return self.model.hidden_size

  def __call__(self, batch: dict) -> dict:
    """The batch with FEATURES added (the images' encoder patch features, sharded like the batch), without
    source_image (the model never reads it)."""
    batch = dict(batch)
    source = batch.pop(transforms.SOURCE_IMAGE, None)
    pixels = (batch["image"].astype(jnp.float32) + 1.0) / 2.0 if source is None else source.astype(jnp.float32) / 255
    return {**batch, FEATURES: self.features(self.params, pixels)}


def check(config, source_module) -> None:
  """One-line errors for REPA settings that cannot run."""
  if config.lora.rank:
    raise ValueError("repa.encoder: REPA trains a projector beside the model; it does not combine with lora.rank")
  if getattr(source_module, "LATENT", False) and not config.data.get("images_dir"):
    raise ValueError(f"repa.encoder: data.source={config.data.source!r} gives VAE latents and REPA's encoder reads "
                     "the clean images: set data.images_dir to the image folder the cache was extracted from")
