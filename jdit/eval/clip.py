"""CLIP's image tower (ViT) in flax.linen, exactly as transformers' CLIPVisionModelWithProjection, its preprocessing,
and the CLIP metrics of text-to-image samples.

    vision, vision_params = load_clip_vision("openai/clip-vit-large-patch14 directory")
    text, text_params = jdit.text.load_text_encoder("the same directory")       # CLIPModel holds both towers
    clip_score(vision, vision_params, text, text_params, images, token_ids)     # mean max(100 cos, 0)
The layers are jdit.text's CLIPLayer (the text tower's, without the causal mask).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jdit.models.layers import normal, partitioned
from jdit.text import transformer
from jdit.text.clip import CLIPLayer
from jdit.text.transformer import LayerNorm, linear

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIPImageProcessor's normalization
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class CLIPVisionEncoder(nn.Module):
  """(B, S, S, 3) normalized pixels -> {"last_hidden_state" (B, 1 + T, D), "pooled" (B, D) the class token after
  post_layernorm, "image_embeds" (B, P) through visual_projection}."""
  image_size: int = 224
  patch_size: int = 14
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI) | gelu (OpenCLIP)
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pixels: jnp.ndarray) -> dict:
    dtype, (batch, height, width, _) = jnp.dtype(self.dtype), pixels.shape
    if (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"pixels must be {self.image_size}x{self.image_size} (clip_preprocess), got {height}x{width}")
    x = nn.Conv(self.hidden_size, (self.patch_size,) * 2, strides=self.patch_size, use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name="patch_embedding")(pixels)  # (B, h, w, D)
    x = x.reshape(batch, -1, self.hidden_size)  # (B, T, D)
    cls = self.param("class_embedding", partitioned(normal(0.02), ("embed",)), (self.hidden_size,), jnp.float32)
    positions = self.param("position_embedding", partitioned(normal(0.02), (None, "embed")),
                           (1 + x.shape[1], self.hidden_size), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.hidden_size)), x], axis=1) + positions  # (B, 1+T, D)
    x = LayerNorm(self.layer_norm_eps, name="pre_layrnorm")(x).astype(dtype)  # transformers' spelling
    fields = (self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, dtype)
    x, _ = transformer.layer_stack(CLIPLayer, fields, self.num_layers, False, "none", x, jnp.zeros((), jnp.float32))
    x = x.astype(jnp.float32)
    pooled = LayerNorm(self.layer_norm_eps, name="post_layernorm")(x[:, 0])  # (B, D)
    embeds = linear(self.projection_dim, ("embed", "mlp"), jnp.float32, "visual_projection", False)(pooled)
    return {"last_hidden_state": x, "pooled": pooled, "image_embeds": embeds}  # embeds: (B, P)


def clip_preprocess(images, size: int = 224) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, size, size, 3) as CLIPImageProcessor: the short side bicubic-resized to
  `size`, a centre crop, / 255, then normalized by CLIP's mean and std."""
  out = []
  for image in np.asarray(images):
    pil = Image.fromarray(image)
    width, height = pil.size
    short, long = min(width, height), max(width, height)
    long = int(size * long / short)  # transformers' shortest-edge rule
    pil = pil.resize((size, long) if width <= height else (long, size), Image.BICUBIC)
    array = np.asarray(pil, np.float32) / 255.0
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    out.append((array[top:top + size, left:left + size] - MEAN) / STD)
  return np.stack(out)


def vision_params_from_state_dict(weights: dict) -> tuple[dict, dict]:
  """(architecture fields, parameter tree) of transformers' CLIPVisionModelWithProjection / CLIPModel tensors."""
  from jdit.convert.state_dict import CheckpointError, required
  from jdit.text.weights import _clip_layer, _prefix
  root = _prefix(weights, "embeddings.patch_embedding.weight")
  if root is None:
    raise CheckpointError("no CLIP image tower (vision_model.embeddings.patch_embedding.weight) among "
                          f"{len(weights)} tensors")
  get = lambda key: required(weights, key)
  outer = root.removesuffix("vision_model.")
  patches = get(f"{root}embeddings.patch_embedding.weight")  # (D, 3, p, p)
  layer_prefix = f"{root}encoder.layers."
  count = 1 + max(int(k[len(layer_prefix):].split(".")[0]) for k in weights if k.startswith(layer_prefix))
  norm = lambda name: {"scale": get(f"{root}{name}.weight"), "bias": get(f"{root}{name}.bias")}
  positions = get(f"{root}embeddings.position_embedding.weight")  # (1 + T, D)
  params = {"patch_embedding": {"kernel": patches.transpose(2, 3, 1, 0)},
            "class_embedding": get(f"{root}embeddings.class_embedding"), "position_embedding": positions,
            "pre_layrnorm": norm("pre_layrnorm"), "post_layernorm": norm("post_layernorm"),
            "visual_projection": {"kernel": get(f"{outer}visual_projection.weight").T}}
  for i in range(count):
    params[f"layers_{i}"] = _clip_layer(get, f"{layer_prefix}{i}.", openclip=False)
  width, patch = patches.shape[0], patches.shape[2]
  arch = dict(hidden_size=width, patch_size=patch, image_size=patch * int(round(np.sqrt(positions.shape[0] - 1))),
              num_layers=count, intermediate_size=params["layers_0"]["fc1"]["kernel"].shape[1],
              num_heads=width // 64, projection_dim=params["visual_projection"]["kernel"].shape[1])
  return arch, params


CONFIG_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_hidden_layers", "hidden_act", "layer_norm_eps")  # the projection width: from its tensor


def load_clip_vision(path: str, **overrides) -> tuple[CLIPVisionEncoder, dict]:
  """(encoder, params) from a transformers CLIPModel / CLIPVisionModelWithProjection directory or weight file
  (config.json, when present, gives the head count and activation); one-line CheckpointError naming the key."""
  from jdit.convert.state_dict import CheckpointError, check_params, read_weight_file
  from jdit.text.weights import weight_file
  file, config = weight_file(path)
  try:
    arch, params = vision_params_from_state_dict(read_weight_file(file))
    config = (config or {}).get("vision_config", config or {})
    renamed = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
    arch.update({renamed.get(k, k): config[k] for k in CONFIG_FIELDS if k in config})
    encoder = CLIPVisionEncoder(**{**arch, **overrides})
    pixels = jnp.zeros((1, encoder.image_size, encoder.image_size, 3))
    expected = jax.eval_shape(lambda: encoder.init(jax.random.key(0), pixels))["params"]
    check_params(params, nn.unbox(expected), f"CLIPVisionEncoder({encoder.num_layers} layers)")
  except CheckpointError as e:
    raise CheckpointError(f"{file}: {e}") from None
  return encoder, jax.tree.map(jnp.asarray, params)


def _unit(x: Any) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(vision, params, images, batch_size: int = 32) -> np.ndarray:
  """Unit-norm image_embeds (N, P) of uint8 images."""
  apply = jax.jit(lambda p, x: vision.apply({"params": p}, x)["image_embeds"])
  parts = [np.asarray(apply(params, clip_preprocess(images[i:i + batch_size], vision.image_size)))
           for i in range(0, len(images), batch_size)]
  return _unit(np.concatenate(parts))


def text_embeddings(text, params, token_ids) -> np.ndarray:
  """Unit-norm projected end-of-text features (N, P) of token ids (N, 77)."""
  return _unit(jax.jit(lambda p, ids: text.apply({"params": p}, ids)["pooled"])(params, jnp.asarray(token_ids)))


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
  """Mean over pairs of max(100 cos(image, text), 0) (torchmetrics' CLIPScore) of unit embeddings."""
  return float(np.maximum(100.0 * (image_embeds * text_embeds).sum(-1), 0.0).mean())


def directional_similarity(image_before, image_after, text_before, text_after) -> float:
  """Mean cos(image_after - image_before, text_after - text_before) of unit embeddings (edit direction
  agreement, as diffusers' evaluation guide)."""
  return float((_unit(image_after - image_before) * _unit(text_after - text_before)).sum(-1).mean())


def prompt_clip_score(directory: str, images, prompts) -> dict:
  """{"clip_score", "per_image"} of images (N, H, W, 3) uint8 and their prompts, with the CLIP model, its text
  tower and tokenizer in one transformers CLIPModel directory."""
  from jdit.text import load_text_encoder, load_tokenizer
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image")
  vision, vision_params = load_clip_vision(directory)
  text, text_params = load_text_encoder(directory)
  ids = load_tokenizer(directory)([str(p) for p in prompts], max_length=text.max_positions)
  image_embeds = image_embeddings(vision, vision_params, images)
  text_embeds = text_embeddings(text, text_params, ids)
  per_image = np.maximum(100.0 * (image_embeds * text_embeds).sum(-1), 0.0)
  return {"clip_score": clip_score(image_embeds, text_embeds), "per_image": per_image.tolist()}
