"""Running a text encoder on prompts: parameters sharded over a mesh by their logical names, and one spec per
encoder saying which hidden state a text-to-image model consumes.

    spec = TextEncoderSpec.load("clip_g", "sd3/text_encoder_2", "sd3/tokenizer_2")    # SD3's CLIP-G
    outputs = spec.encode(["a photo of a cat"])   # {"sequence": (1, 77, 1280), "pooled": (1, 1280), "length": (1,)}
"""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdit import sharding
from jdit.text.tokenizer import Tokenizer, load_tokenizer
from jdit.text.weights import load_text_encoder

LAYERS = ("last", "penultimate")  # last_hidden_state | penultimate_hidden_state
DEFAULT_MAX_LENGTH = {"clip": 77, "t5": 256}  # SD3's lengths
DEFAULT_LAYER = {"clip": "penultimate", "t5": "last"}  # what SD3 / SDXL take from each


def abstract_params(encoder, length: int = 8):
  """The encoder's parameter shapes, boxed with their logical axis names (nothing allocated)."""
  ids = jnp.zeros((1, min(length, getattr(encoder, "max_positions", length))), jnp.int32)
  return jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), ids))["params"]


def shard_params(encoder, params, mesh, axis_rules=None):
  """params placed on `mesh`, each split by its logical axis names under axis_rules (default: the training
  rules, so on an fsdp axis every device holds 1/fsdp of T5-XXL)."""
  rules = sharding.rules(axis_rules)
  shardings = sharding.logical_shardings(abstract_params(encoder), mesh, rules)
  return jax.device_put(params, shardings)


def make_apply(encoder, mesh=None, axis_rules=None):
  """jit(params, ids, mask) -> the encoder's output dict, with logical activation constraints under `mesh`
  (batch over the data-parallel axes)."""
  rules = sharding.rules(axis_rules)

  def apply(params, ids, mask):
    with nn.logical_axis_rules(rules):
      return encoder.apply({"params": params}, ids, mask)

  if mesh is None:
    return jax.jit(apply)
  batch = sharding.batch_sharding(mesh)
  jitted = jax.jit(apply, in_shardings=(None, batch, batch))

  def run(params, ids, mask):
    with jax.set_mesh(mesh):
      return jitted(params, ids, mask)
  return run


@dataclasses.dataclass
class TextEncoderSpec:
  """One encoder of a text-to-image model: weights, tokenizer, prompt length, which hidden state is the
  sequence embedding, whether the encoder sees the padding mask (SD3 passes none), and whether only its pooled
  vector conditions the model (Flux's CLIP-L)."""
  name: str
  encoder: nn.Module
  params: dict
  tokenizer: Tokenizer
  max_length: int
  layer: str
  use_mask: bool = False
  mesh: object = None
  source: tuple = ("", "")  # (weights, tokenizer) paths it was loaded from, recorded in caches
  pooled_only: bool = False  # the sequence is not part of the model's context (Flux's CLIP-L)

  def __post_init__(self):
    if self.layer not in LAYERS:
      raise ValueError(f"{self.name}: layer must be one of {LAYERS}, got {self.layer!r}")
    if self.max_length > getattr(self.encoder, "max_positions", self.max_length):
      raise ValueError(f"{self.name}: max_length={self.max_length} exceeds the encoder's "
                       f"{self.encoder.max_positions} positions")
    if self.mesh is not None:
      self.params = shard_params(self.encoder, self.params, self.mesh)
    self._apply = make_apply(self.encoder, self.mesh)

  @classmethod
  def load(cls, name: str, weights: str, tokenizer: str, max_length: int | None = None, layer: str | None = None,
           use_mask: bool = False, mesh=None, pooled_only: bool = False, **overrides) -> "TextEncoderSpec":
    encoder, params = load_text_encoder(weights, **overrides)
    return cls(name, encoder, params, load_tokenizer(tokenizer), max_length or DEFAULT_MAX_LENGTH[encoder.KIND],
               layer or DEFAULT_LAYER[encoder.KIND], use_mask, mesh,
               (os.path.abspath(weights), os.path.abspath(tokenizer)), pooled_only)

  @classmethod
  def from_description(cls, name: str, description: dict, mesh=None) -> "TextEncoderSpec":
    """The spec a cache's jdit_text.json describes (its weights and tokenizer paths must still exist)."""
    return cls.load(name, description["weights"], description["tokenizer"], description["max_length"],
                    description["layer"], description["use_mask"], mesh, description.get("pooled_only", False))

  def describe(self) -> dict:
    return {"kind": self.encoder.KIND, "width": self.encoder.width, "max_length": self.max_length,
            "layer": self.layer, "use_mask": self.use_mask, "pooled_dim": self.pooled_dim,
            "pooled_only": self.pooled_only, "weights": self.source[0], "tokenizer": self.source[1]}

  @property
  def pooled_dim(self) -> int:
    return (self.encoder.projection_dim or self.encoder.width) if self.encoder.KIND == "clip" else 0

  def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
    """{"sequence": (N, L, D) float32, "length": (N,) int32 real tokens, "pooled": (N, P) for CLIP}; the batch is
    padded to a multiple of the mesh's data-parallel size."""
    ids, mask = self.tokenizer(prompts, self.max_length, return_attention_mask=True)
    count, multiple = len(prompts), sharding.data_parallel_size(self.mesh) if self.mesh is not None else 1
    pad = -count % multiple
    ids_in, mask_in = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (ids, mask))
    out = self._apply(self.params, ids_in, mask_in if self.use_mask else None)
    key = "last_hidden_state" if self.layer == "last" else "penultimate_hidden_state"
    result = {"sequence": np.asarray(out[key])[:count], "length": mask.sum(-1).astype(np.int32)}
    if "pooled" in out:
      result["pooled"] = np.asarray(out["pooled"])[:count]
    return result
