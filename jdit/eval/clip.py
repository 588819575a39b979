"""CLIP's image tower (ViT) in flax.linen, exactly as transformers' CLIPVisionModelWithProjection and open_clip's
VisionTransformer, its preprocessing, and the CLIP metrics of text-to-image samples (CLIP score, directional
similarity, an HPS v2-style preference score).

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

from jdit.nn.layers import normal, partitioned
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


OPENCLIP_HEADS = {1280: 16, 1408: 16, 1664: 16}  # ViT-H/g/bigG-14: head widths 80, 88, 104; else 64 per head


def vision_params_from_state_dict(weights: dict) -> tuple[dict, dict]:
  """(architecture fields, parameter tree) of a CLIP image tower: transformers' CLIPVisionModelWithProjection /
  CLIPModel tensors, or open_clip's (visual.conv1, visual.transformer.resblocks.* with fused in_proj, visual.proj;
  open_clip and HPS v2 checkpoints, OpenAI's original files)."""
  from jdit.state_dict import CheckpointError, required
  from jdit.text.weights import _clip_layer, _prefix
  get = lambda key: required(weights, key)
  root = _prefix(weights, "embeddings.patch_embedding.weight")
  if root is not None:  # transformers
    names = dict(patches="embeddings.patch_embedding.weight", cls="embeddings.class_embedding",
                 positions="embeddings.position_embedding.weight", pre="pre_layrnorm", post="post_layernorm",
                 layers="encoder.layers.")
    projection = get(f"{root.removesuffix('vision_model.')}visual_projection.weight").T  # a Linear's (P, D)
  else:
    root = _prefix(weights, "conv1.weight")
    if root is None or f"{root}class_embedding" not in weights:
      raise CheckpointError("no CLIP image tower (vision_model.embeddings.patch_embedding.weight or "
                            f"visual.conv1.weight) among {len(weights)} tensors")
    names = dict(patches="conv1.weight", cls="class_embedding", positions="positional_embedding", pre="ln_pre",
                 post="ln_post", layers="transformer.resblocks.")
    projection = get(f"{root}proj")  # (D, P), used as x @ proj
  patches = get(root + names["patches"])  # (D, 3, p, p)
  layer_prefix = root + names["layers"]
  count = 1 + max(int(k[len(layer_prefix):].split(".")[0]) for k in weights if k.startswith(layer_prefix))
  norm = lambda name: {"scale": get(f"{root}{name}.weight"), "bias": get(f"{root}{name}.bias")}
  positions = get(root + names["positions"])  # (1 + T, D)
  params = {"patch_embedding": {"kernel": patches.transpose(2, 3, 1, 0)}, "class_embedding": get(root + names["cls"]),
            "position_embedding": positions, "pre_layrnorm": norm(names["pre"]),
            "post_layernorm": norm(names["post"]), "visual_projection": {"kernel": projection}}
  openclip = names["layers"] == "transformer.resblocks."
  for i in range(count):
    params[f"layers_{i}"] = _clip_layer(get, f"{layer_prefix}{i}.", openclip=openclip)
  width, patch = patches.shape[0], patches.shape[2]
  arch = dict(hidden_size=width, patch_size=patch, image_size=patch * int(round(np.sqrt(positions.shape[0] - 1))),
              num_layers=count, intermediate_size=params["layers_0"]["fc1"]["kernel"].shape[1],
              num_heads=OPENCLIP_HEADS.get(width, width // 64) if openclip else width // 64,
              projection_dim=projection.shape[1], hidden_act="gelu" if openclip else "quick_gelu")
  return arch, params


CONFIG_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_hidden_layers", "hidden_act", "layer_norm_eps")  # the projection width: from its tensor


def load_clip_vision(path: str, **overrides) -> tuple[CLIPVisionEncoder, dict]:
  """(encoder, params) from a transformers CLIPModel / CLIPVisionModelWithProjection directory or weight file, or
  an open_clip checkpoint (HPS v2's {"state_dict": ...} too); config.json, when present, gives the head count and
  activation; overrides set fields (hidden_act="quick_gelu" for OpenAI's original open_clip-layout files).
  One-line CheckpointError naming the key."""

  def build(weights: dict, config: dict | None):
    arch, params = vision_params_from_state_dict(weights)
    config = (config or {}).get("vision_config", config or {})
    renamed = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}
    arch.update({renamed.get(k, k): config[k] for k in CONFIG_FIELDS if k in config})
    return CLIPVisionEncoder(**{**arch, **overrides}), params

  return load_image_tower(path, build)


def load_image_tower(path: str, build) -> tuple:
  """(model, params) of an image tower from a transformers directory or weight file: build(weights, config.json
  or None) -> (model, params), the params then checked against the model's at its native image_size. One-line
  CheckpointError naming the file (and the key)."""
  from jdit.state_dict import CheckpointError, check_params, read_weight_file, select_weights
  from jdit.text.weights import weight_file
  file, config = weight_file(path)
  try:
    model, params = build(select_weights(read_weight_file(file), "model", file), config)
    pixels = jnp.zeros((1, model.image_size, model.image_size, 3))
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels))["params"]
    check_params(params, nn.unbox(expected), f"{type(model).__name__}({model.num_layers} layers)")
  except CheckpointError as e:
    raise CheckpointError(f"{file}: {e}") from None
  return model, jax.tree.map(jnp.asarray, params)


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


def prompt_cosines(weights: str, images, prompts, tokenizer: str = "") -> np.ndarray:
  """cos(image, prompt) (N,) float64 of each image and its prompt, with both towers of one CLIP model (a
  transformers CLIPModel directory, or an open_clip / HPS v2 checkpoint file) and the tokenizer of `tokenizer`
  (a directory with vocab.json and merges.txt; default: the weights' directory)."""
  import os

  from jdit.text import load_text_encoder, load_tokenizer
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts: one prompt per image")
  vision, vision_params = load_clip_vision(weights)
  text, text_params = load_text_encoder(weights)
  tokenize = load_tokenizer(tokenizer or (weights if os.path.isdir(weights) else os.path.dirname(weights)))
  ids = tokenize([str(p) for p in prompts], max_length=text.max_positions)
  return (image_embeddings(vision, vision_params, images) * text_embeddings(text, text_params, ids)).sum(-1)


def prompt_clip_score(weights: str, images, prompts, tokenizer: str = "") -> dict:
  """{"clip_score", "per_image"}: max(100 cos, 0) of images (N, H, W, 3) uint8 and their prompts (prompt_cosines)."""
  per_image = np.maximum(100.0 * prompt_cosines(weights, images, prompts, tokenizer), 0.0)
  return {"clip_score": float(per_image.mean()), "per_image": per_image.tolist()}


def preference_score(weights: str, images, prompts, tokenizer: str = "") -> dict:
  """{"preference_score", "per_image"}: an HPS v2-style score, the cosine of the image and prompt embeddings of a
  preference-tuned CLIP (HPS v2: an open_clip ViT-H-14 checkpoint; its mean over a prompt set is what it reports)."""
  per_image = prompt_cosines(weights, images, prompts, tokenizer)
  return {"preference_score": float(per_image.mean()), "per_image": per_image.tolist()}


def score_samples(path: str, weights: str, kind: str = "clip", tokenizer: str = "") -> dict:
  """The CLIP score (kind "clip") or the preference score ("preference") of a text-to-image samples.npz (images
  and prompts, as --mode=sample writes it); one-line errors naming the file."""
  import os

  from jdit.eval.features import check_images
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with np.load(path) as contents:
    missing = [k for k in ("images", "prompts") if k not in contents.files]
    if missing:
      raise ValueError(f"{path}: no {' or '.join(missing)} array (text-to-image samples from --mode=sample hold "
                       "images and prompts)")
    images, prompts = contents["images"], contents["prompts"]
  check_images(images, f"{path}: images")
  score = prompt_clip_score if kind == "clip" else preference_score
  return score(weights, images, prompts, tokenizer)
