"""Flux.1 (Black Forest Labs; dev and schnell) in flax.linen, matching diffusers' FluxTransformer2DModel; NHWC
latents in and out. Parameter names follow diffusers' modules, so its weights map one to one.

    model = create_flux("flux-dev")
    out = model.apply({"params": params}, x, t, context, pooled, guidance)
        # x (B, H, W, 16) latents, t (B,) = sigma * 1000, context (B, L, joint_attention_dim) T5 states,
        # pooled (B, 768) CLIP-L pooled, guidance (B,) the distilled guidance scale (e.g. 3.5; dev only, None for
        # schnell) -> (B, H, W, 16)
The latents are packed 2x2 into tokens (diffusers' channel order (c, dy, dx)). Double-stream blocks are the
MM-DiT's joint blocks (adaLN-Zero and MLPs per stream, RMS qk-norm, one attention over [text; image]); the
single-stream blocks then run on the concatenated tokens: one adaLN, attention and a tanh-GELU MLP in parallel,
one output projection of both. Positions are 3-axis RoPE over (index, row, column) ids: text tokens sit at
(0, 0, 0), as in Flux.1, so they are not rotated; image tokens at (0, row, column) of any grid.
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdit.models import fields
from jdit.models.conditioning import TextConditional
from jdit.models import mmdit
from jdit.models.mmdit import ACT, JointBlock, ScannedJointBlock, SelfAttention, run_blocks, stack_blocks
from jdit.nn import layers, posemb
from jdit.nn.layers import dense, layer_norm, modulate, zeros

GUIDANCE_SCALE = 1000.0  # diffusers multiplies the distilled guidance by 1000 before its sinusoidal features


def pack(x: jnp.ndarray, p: int) -> jnp.ndarray:
  """(B, H, W, C) latents -> (B, H/p * W/p, C p p) tokens, channels in diffusers' (c, dy, dx) order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)  # (B, h, w, C, dy, dx)
  return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack(x: jnp.ndarray, grid_h: int, grid_w: int, p: int) -> jnp.ndarray:
  """Inverse of `pack`: (B, h * w, C p p) -> (B, h p, w p, C)."""
  b, _, channels = x.shape
  x = x.reshape(b, grid_h, grid_w, channels // (p * p), p, p).transpose(0, 1, 4, 2, 5, 3)  # (B, h, dy, w, dx, C)
  return x.reshape(b, grid_h * p, grid_w * p, channels // (p * p))


def position_ids(text_length: int, grid_h: int, grid_w: int) -> np.ndarray:
  """RoPE ids of [text; image] tokens, (L + h w, 3) float32: text (0, 0, 0), image (0, row, column) row-major."""
  image = np.concatenate([np.zeros((grid_h * grid_w, 1), np.float32), posemb.grid_positions(grid_h, grid_w)], 1)
  return np.concatenate([np.zeros((text_length, 3), np.float32), image])


class SingleBlock(nn.Module):
  """One single-stream block: adaLN-Zero (shift, scale, gate), then attention and a tanh-GELU MLP in parallel on
  the same normed tokens, one output projection of both."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_backend: str = "auto"

  @nn.compact
  def __call__(self, h: jnp.ndarray, c: jnp.ndarray, rope: tuple) -> jnp.ndarray:
    dim = h.shape[-1]
    mod = dense(3 * dim, ("embed", "mlp"), self.dtype, "norm_linear", zeros)(nn.silu(c))  # (B, 3D)
    shift, scale, gate = jnp.split(mod, 3, axis=-1)
    normed = modulate(layer_norm(h, 1e-6), shift, scale)  # (B, S, D)
    mlp = dense(int(dim * self.mlp_ratio), ("embed", "mlp"), self.dtype, "proj_mlp")(normed)  # (B, S, M)
    mlp = nn.with_logical_constraint(nn.gelu(mlp, approximate=True), ("act_batch", "act_len", "act_mlp"))
    attn = SelfAttention(self.num_heads, True, self.dtype, self.attention_backend, pre_only=True,
                         name="attn")(normed, rope)  # (B, S, D)
    out = dense(dim, ("mlp", "embed"), self.dtype, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))  # (B, S, D)
    return nn.with_logical_constraint(h + gate[:, None] * out, ACT)


class ScannedSingleBlock(SingleBlock):
  """SingleBlock in nn.scan's (carry, output) form."""

  def __call__(self, h: jnp.ndarray, c: jnp.ndarray, rope: tuple) -> tuple:
    return super().__call__(h, c, rope), None


class Flux(TextConditional, nn.Module):
  """The Flux.1 transformer: double-stream joint blocks, then single-stream blocks over [text; image] tokens."""
  FAMILY: ClassVar[str] = "flux"
  # config.model.variant names a preset: flux-dev | flux-schnell | tiny
  patch_size: int = 2  # latents packed p x p into one token
  in_channels: int = 16  # latent channels (Flux's VAE: 16), before packing
  out_channels: int = 16  # channels of the prediction
  num_heads: int = 24  # attention heads; the width is num_heads x head_dim
  head_dim: int = 128  # width of one head (the sum of axes_dims_rope)
  depth: int = 19  # double-stream (joint) blocks
  single_depth: int = 38  # single-stream blocks
  mlp_ratio: float = 4.0  # MLP width / model width
  joint_attention_dim: int = 4096  # width of the text tokens (T5-XXL)
  pooled_projection_dim: int = 768  # width of the pooled text vector (CLIP-L)
  guidance_embeds: bool = True  # a distilled-guidance embedding (Flux.1-dev; schnell has none)
  embedded_guidance: float = 3.5  # the guidance it reads when the conditioning carries no "guidance" key
  axes_dims_rope: tuple = (16, 56, 56)  # rotary dims of the (index, row, column) position axes
  rope_theta: float = 10000.0  # RoPE's frequency base
  input_size: int | tuple[int, int] = 128  # native latent (H, W) or side (image / 8); RoPE runs on any grid
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  attention_backend: str = "auto"  # auto (per platform) | einsum | xla | cudnn | splash (see nn/attention.py)
  remat: str = "none"  # none | full | dots: rematerialization per block
  scan_blocks: bool = True  # the double and the single blocks each under one nn.scan
  text_length: int = 512  # T5 tokens per caption (dev: 512, schnell: 256) of the dummy context; any length runs
  # A text encoder trained with the model (CLIP's architecture, width joint_attention_dim, pooled output projected
  # to pooled_projection_dim) reading token ids; 0: the model reads frozen encoders' embeddings instead.
  text_vocab_size: int = 0
  text_layers: int = 2  # its depth and heads (width joint_attention_dim)
  text_heads: int = 2  # (text_vocab_size > 0 only)
  text_eos_id: int = 0  # the tokenizer's end-of-text id: the pooled feature is taken there

  learn_sigma = False

  def describe(self) -> str:
    h, w = self.input_hw
    return (f"Flux depth={self.depth}+{self.single_depth} hidden={self.hidden_size} heads={self.num_heads} "
            f"guidance_embeds={self.guidance_embeds} on {h}x{w}x{self.in_channels}")

  def check_config(self) -> None:
    """ValueError naming the first invalid field."""
    layers.check_compute_options(self.remat, self.attention_backend)
    dims = tuple(self.axes_dims_rope)
    if len(dims) != 3 or sum(dims) != self.head_dim or any(d % 2 for d in dims):
      raise ValueError(f"axes_dims_rope must be 3 even dims summing to head_dim={self.head_dim}, "
                       f"got {tuple(self.axes_dims_rope)}")

  def dummy_inputs(self, batch_size: int = 1) -> tuple:
    """(x, t, context, pooled, guidance, tokens) at the native input shape and text_length tokens, for init and
    shapes (tokens for a model with its own text encoder, context and pooled otherwise; the others None)."""
    x, t = jnp.zeros((batch_size, *self.input_hw, self.in_channels), jnp.float32), jnp.zeros((batch_size,))
    guidance = jnp.full((batch_size,), self.embedded_guidance) if self.guidance_embeds else None
    if self.text_vocab_size:
      return x, t, None, None, guidance, jnp.zeros((batch_size, self.text_length), jnp.int32)
    return (x, t, jnp.zeros((batch_size, self.text_length, self.joint_attention_dim), jnp.float32),
            jnp.zeros((batch_size, self.pooled_projection_dim), jnp.float32), guidance, None)

  def forward(self, x, t, cond: dict, train: bool = False):
    """__call__ with the conditioning dict; the distilled guidance is cond["guidance"] (B,) when present, else
    embedded_guidance (guidance_embeds models only)."""
    del train
    guidance = None
    if self.guidance_embeds:
      guidance = cond.get("guidance", jnp.full(t.shape, self.embedded_guidance, jnp.float32))
    return self(x, t, cond.get("context"), cond.get("pooled"), guidance, cond.get("tokens"))

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray | None = None,
               pooled: jnp.ndarray | None = None, guidance: jnp.ndarray | None = None,
               tokens: jnp.ndarray | None = None) -> jnp.ndarray:
    self.check_config()
    dtype, dim, p = jnp.dtype(self.dtype), self.hidden_size, self.patch_size
    if self.text_vocab_size:
      if tokens is None:
        raise ValueError("tokens (B, L) are required: the model has its own text encoder (text_vocab_size > 0)")
      context, pooled = self.encode_text(tokens)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be (B, H, W, in_channels={self.in_channels}), got shape {x.shape}")
    if (guidance is None) == self.guidance_embeds:
      raise ValueError(f"guidance (B,) must be given exactly when guidance_embeds=True (Flux.1-dev); "
                       f"guidance_embeds={self.guidance_embeds}")
    height, width = x.shape[1:3]
    if height % p or width % p:
      raise ValueError(f"patch_size={p} must divide the input height and width, got {height}x{width}")
    grid_h, grid_w = height // p, width // p

    x = dense(dim, ("patch", "embed"), dtype, "x_embedder")(pack(x, p))  # (B, T, D)
    x = nn.with_logical_constraint(x, ACT)
    c = layers.TimestepEmbedder(dim, dtype=dtype, name="timestep_embedder")(t)  # (B, D)
    if self.guidance_embeds:
      c = c + layers.TimestepEmbedder(dim, dtype=dtype, name="guidance_embedder")(guidance * GUIDANCE_SCALE)
    h = dense(dim, (None, "embed"), dtype, "text_embedder_linear_1", layers.normal(0.02))(pooled)
    c = c + dense(dim, ("mlp", "embed"), dtype, "text_embedder_linear_2", layers.normal(0.02))(nn.silu(h))
    ctx = nn.with_logical_constraint(dense(dim, (None, "embed"), dtype, "context_embedder")(context), ACT)  # (B, L, D)

    length = ctx.shape[1]
    cos, sin = posemb.rope_axes(tuple(self.axes_dims_rope), position_ids(length, grid_h, grid_w), self.rope_theta)
    rope, image_rope = (jnp.asarray(cos), jnp.asarray(sin)), (jnp.asarray(cos[length:]), jnp.asarray(sin[length:]))
    common = dict(num_heads=self.num_heads, dtype=dtype, attention_backend=self.attention_backend)
    x, ctx = run_blocks((JointBlock, ScannedJointBlock), dict(common, qk_norm=True), 0, self.depth,
                        self.scan_blocks, self.remat, "transformer_blocks", (x, ctx), c, image_rope)
    h = jnp.concatenate([ctx, x], axis=1)  # (B, L + T, D)
    h = run_blocks((SingleBlock, ScannedSingleBlock), dict(common, mlp_ratio=self.mlp_ratio), 0, self.single_depth,
                   self.scan_blocks, self.remat, "single_transformer_blocks", h, c, rope)
    x = h[:, length:]  # (B, T, D)

    scale, shift = jnp.split(dense(2 * dim, ("embed", "mlp"), dtype, "norm_out_linear", zeros)(nn.silu(c)), 2, -1)
    x = modulate(layer_norm(x, 1e-6), shift, scale)
    x = dense(p * p * self.out_channels, ("embed", "patch"), dtype, "proj_out", zeros)(x)  # (B, T, C p p)
    return unpack(x.astype(jnp.float32), grid_h, grid_w, p)  # (B, H, W, C_out)


def stack_runs(params: dict, model: Flux) -> dict:
  """Per-block parameters ("transformer_blocks_{i}", "single_transformer_blocks_{i}") -> the model's layout (each
  kind stacked under scan_blocks), and back."""
  params = stack_blocks(params, [(0, model.depth)], model.scan_blocks, "transformer_blocks")
  return stack_blocks(params, [(0, model.single_depth)], model.scan_blocks, "single_transformer_blocks")


# ----------------------------------------------------------------------------------------------
#                                          Presets
# ----------------------------------------------------------------------------------------------

PRESETS = {  # diffusers' transformer configs of the released models
    "flux-dev": dict(guidance_embeds=True, text_length=512),
    "flux-schnell": dict(guidance_embeds=False, text_length=256),
    # for tests and the CPU demo; not a released model
    "tiny": dict(depth=1, single_depth=2, num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), in_channels=4,
                 out_channels=4, joint_attention_dim=32, pooled_projection_dim=16, input_size=8, text_length=8,
                 guidance_embeds=True),
}


def create_flux(name: str, **overrides) -> Flux:
  """A preset by name (flux-dev, flux-schnell, tiny) with fields overridden."""
  return fields.create(Flux, PRESETS, name, **overrides)


# ----------------------------------------------------------------------------------------------
#                               Family interface (jdit.models.family)
# ----------------------------------------------------------------------------------------------

MODEL = Flux
VARIANT = "flux-dev"
TINY = dict(variant="tiny")
RECIPE = {  # Flux's objective and sampler: rectified flow, logit-normal times, Euler on the resolution-shifted
    # schedule of FluxPipeline; dev reads its guidance from the embedding, no classifier-free pass
    "diffusion": dict(kind="flow", variance="fixed_small", timestep_sampling="logit_normal", shift=1.0,
                      sampler="euler", sampling_steps=28, guidance_scale=1.0, guidance_mode="all",
                      flow_schedule="flux"),
}


def to_layout(params: dict, model: Flux) -> dict:
  return stack_runs(params, model)


LORA_TARGETS = (  # lora.spec_for's default: attention and MLP kernels of both streams and the single blocks
    r"^(single_)?transformer_blocks_[\d_]+/(attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|"
    r"to_add_out)|ff(_context)?/(net_0_proj|net_2)|proj_mlp|proj_out)$",
)

block_tokens = mmdit.block_tokens  # REPA aligns the image stream of the double-stream blocks

TABLE = ("flux-dev", "flux-schnell")


def table_model(name: str, resolution: int = 1024) -> Flux:
  """Preset `name` at resolution^2 images = (resolution / 8)^2 x 16 latents, its T5 text length."""
  return create_flux(name, input_size=resolution // 8)
