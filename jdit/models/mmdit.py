"""MM-DiT (Esser et al. 2024, Stable Diffusion 3 / 3.5) in flax.linen, matching diffusers' SD3Transformer2DModel;
NHWC in and out. Parameter names follow diffusers' modules, so its weights map one to one.

    model = create_mmdit("sd3.5-medium")
    out = model.apply({"params": params}, x, t, context, pooled)
        # x (B, H, W, C) latents, t (B,) = sigma * 1000, context (B, L, joint_attention_dim) text tokens,
        # pooled (B, pooled_projection_dim) pooled text -> (B, H, W, out_channels)
Image patches and text tokens run through one transformer: every block has adaLN-Zero on both streams and one
attention over [image; text]; the last block only reads the text (context_pre_only). SD3.5 adds RMS qk-norm and,
in its first layers, a second image-only attention (attn2).
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.models import fields
from jdit.models.conditioning import TextConditional
from jdit.models.dit import unpatchify
from jdit.nn import attention, layers, lora, matmul, posemb
from jdit.nn.layers import REMAT_POLICIES, dense, layer_norm, modulate, partitioned, zeros

ACT = ("act_batch", "act_len", "act_embed")


def _heads(x: jnp.ndarray, heads: int) -> jnp.ndarray:
  """(B, T, H*Dh) -> (B, T, H, Dh)."""
  return x.reshape(*x.shape[:2], heads, x.shape[-1] // heads)


def _project(x: jnp.ndarray, num_heads: int, qk_norm: bool, names: tuple, dtype: Any) -> tuple:
  """q, k, v of one stream (B, T, D) -> 3 x (B, T, H, Dh), with optional RMS qk-norm; called inside a compact
  method, so the layers are created under the calling module with diffusers' names (to_q/to_k/to_v and
  norm_q/norm_k for the image stream, add_*_proj and norm_added_* for the text stream)."""
  dim = x.shape[-1]
  q, k, v = (_heads(dense(dim, ("embed", "heads"), dtype, name)(x), num_heads) for name in names[:3])
  if qk_norm:
    q, k = layers.RMSNorm(name=names[3])(q), layers.RMSNorm(name=names[4])(k)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype)  # rope runs on these (rounding as before)


IMAGE_NAMES = ("to_q", "to_k", "to_v", "norm_q", "norm_k")
TEXT_NAMES = ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")


class JointAttention(nn.Module):
  """Attention over the concatenated [image; text] tokens; each stream keeps its own projections."""
  num_heads: int
  qk_norm: bool
  context_pre_only: bool
  dtype: Any
  backend: str

  @nn.compact
  def __call__(self, x: jnp.ndarray, ctx: jnp.ndarray, rope: tuple | None) -> tuple:
    dim, tokens = x.shape[-1], x.shape[1]
    image = _project(x, self.num_heads, self.qk_norm, IMAGE_NAMES, self.dtype)
    text = _project(ctx, self.num_heads, self.qk_norm, TEXT_NAMES, self.dtype)
    if rope is not None:  # image tokens only; text tokens have no position
      image = (posemb.apply_rope(image[0], *rope), posemb.apply_rope(image[1], *rope), image[2])
    q, k, v = (nn.with_logical_constraint(jnp.concatenate([a, b], axis=1), attention.ACT_AXES)
               for a, b in zip(image, text))  # (B, T + L, H, Dh)
    backend = attention.resolve_backend(self.backend, self.dtype, q.shape[1], q.shape[-1])
    out = attention.dot_product_attention(q, k, v, backend)
    out = out.reshape(*out.shape[:2], dim)  # (B, T + L, D)
    x = dense(dim, ("heads", "embed"), self.dtype, "to_out_0")(out[:, :tokens])
    if self.context_pre_only:
      return x, None
    return x, dense(dim, ("heads", "embed"), self.dtype, "to_add_out")(out[:, tokens:])


class SelfAttention(nn.Module):
  """SD3.5's second, image-only attention (attn2); pre_only (Flux's single blocks): no output projection, the
  heads come back concatenated."""
  num_heads: int
  qk_norm: bool
  dtype: Any
  backend: str
  pre_only: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, rope: tuple | None) -> jnp.ndarray:
    q, k, v = _project(x, self.num_heads, self.qk_norm, IMAGE_NAMES, self.dtype)
    if rope is not None:
      q, k = posemb.apply_rope(q, *rope), posemb.apply_rope(k, *rope)
    backend = attention.resolve_backend(self.backend, self.dtype, q.shape[1], q.shape[-1])
    out = attention.dot_product_attention(q, k, v, backend).reshape(x.shape)  # (B, T, D)
    return out if self.pre_only else dense(x.shape[-1], ("heads", "embed"), self.dtype, "to_out_0")(out)


class FeedForward(nn.Module):
  """Linear -> tanh-GELU -> Linear (diffusers' FeedForward "gelu-approximate": net.0.proj, net.2)."""
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    h = nn.gelu(dense(4 * dim, ("embed", "mlp"), self.dtype, "net_0_proj")(x), approximate=True)  # (B, T, 4D)
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return dense(dim, ("mlp", "embed"), self.dtype, "net_2")(h)


class JointBlock(nn.Module):
  """One MM-DiT block: adaLN-Zero on the image and the text stream, joint attention, per-stream MLPs."""
  num_heads: int
  qk_norm: bool = False
  dual_attention: bool = False
  context_pre_only: bool = False
  dtype: Any = jnp.float32
  attention_backend: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, ctx: jnp.ndarray, c: jnp.ndarray, rope: tuple | None) -> tuple:
    dim = x.shape[-1]
    count = 9 if self.dual_attention else 6
    mod = dense(count * dim, ("embed", "mlp"), self.dtype, "norm1_linear", zeros)(nn.silu(c))  # (B, 6D or 9D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = jnp.split(mod, count, axis=-1)
    normed = layer_norm(x, 1e-6)
    h = modulate(normed, shift_msa, scale_msa)  # (B, T, D)
    if self.context_pre_only:  # continuous adaLN on the text: (scale, shift), no gates
      scale_c, shift_c = jnp.split(dense(2 * dim, ("embed", "mlp"), self.dtype, "norm1_context_linear",
                                         zeros)(nn.silu(c)), 2, axis=-1)
    else:
      c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = jnp.split(
          dense(6 * dim, ("embed", "mlp"), self.dtype, "norm1_context_linear", zeros)(nn.silu(c)), 6, axis=-1)
      scale_c, shift_c = c_scale_msa, c_shift_msa
    hc = modulate(layer_norm(ctx, 1e-6), shift_c, scale_c)  # (B, L, D)

    a, ac = JointAttention(self.num_heads, self.qk_norm, self.context_pre_only, self.dtype,
                           self.attention_backend, name="attn")(h, hc, rope)
    x = x + gate_msa[:, None] * a
    if self.dual_attention:
      shift_msa2, scale_msa2, gate_msa2 = second
      a2 = SelfAttention(self.num_heads, self.qk_norm, self.dtype, self.attention_backend,
                         name="attn2")(modulate(normed, shift_msa2, scale_msa2), rope)
      x = x + gate_msa2[:, None] * a2
    h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp)
    x = nn.with_logical_constraint(x + gate_mlp[:, None] * FeedForward(self.dtype, name="ff")(h), ACT)
    self.sow("intermediates", "tokens", x)  # kept only when "intermediates" is mutable (REPA's block tokens)
    if self.context_pre_only:
      return x, ctx
    ctx = ctx + c_gate_msa[:, None] * ac
    hc = modulate(layer_norm(ctx, 1e-6), c_shift_mlp, c_scale_mlp)
    ctx = nn.with_logical_constraint(ctx + c_gate_mlp[:, None] * FeedForward(self.dtype, name="ff_context")(hc),
                                     ACT)
    return x, ctx


class ScannedJointBlock(JointBlock):
  """JointBlock in nn.scan's (carry, output) form; the carry is (image stream, text stream)."""

  def __call__(self, carry: tuple, c: jnp.ndarray, rope: tuple | None) -> tuple:
    return super().__call__(*carry, c, rope), None


def block_runs(depth: int, dual_attention_layers: tuple) -> list[tuple[int, int, bool, bool]]:
  """Consecutive blocks of one kind as (start, stop, dual_attention, context_pre_only): the unit nn.scan stacks."""
  kinds = [(i in dual_attention_layers, i == depth - 1) for i in range(depth)]
  runs, start = [], 0
  for i in range(1, depth + 1):
    if i == depth or kinds[i] != kinds[start]:
      runs.append((start, i, *kinds[start]))
      start = i
  return runs


def run_name(start: int, stop: int, prefix: str = "transformer_blocks") -> str:
  """Parameter name of a run: {prefix}_{i} for one block, {prefix}_{start}_{last} scanned."""
  return f"{prefix}_{start}" if stop - start == 1 else f"{prefix}_{start}_{stop - 1}"


class MMDiT(TextConditional, nn.Module):
  """The SD3 / SD3.5 joint transformer over latent patches and text tokens."""
  FAMILY: ClassVar[str] = "mmdit"
  # config.model.variant names a preset: sd3-medium | sd3.5-medium | sd3.5-large | tiny
  patch_size: int = 2
  in_channels: int = 16  # SD3: 16 latent channels
  out_channels: int = 16  # channels of the prediction (SD3: the latents' 16)
  num_heads: int = 24  # attention heads; the width is num_heads x head_dim
  head_dim: int = 64  # width of one head
  depth: int = 24  # joint blocks
  joint_attention_dim: int = 4096  # width of the text tokens (SD3: CLIP-L + CLIP-G padded to T5's 4096)
  pooled_projection_dim: int = 2048  # width of the pooled text vector (SD3: CLIP-L 768 + CLIP-G 1280)
  input_size: int | tuple[int, int] = 128  # native latent (H, W) or side (SD3: image / 8); the sin-cos table's
                                           # base size is input / patch
  pos_embed_max_size: int = 192  # sin-cos table side in patches, centre-cropped to the latent grid
  pos_embed: str = "sincos"  # "sincos" (SD3) or "rope" (2D RoPE on image q and k; any aspect ratio)
  rope_base: float = 10000.0  # RoPE's frequency base
  dual_attention_layers: tuple = ()  # SD3.5: blocks with the second, image-only attention
  qk_norm: bool = False  # RMS qk-norm (SD3.5)
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  attention_backend: str = "auto"  # auto (per platform) | einsum | xla | cudnn | splash (see nn/attention.py)
  remat: str = "none"  # none | full | dots: rematerialization per block
  scan_blocks: bool = True  # runs of identical blocks under one nn.scan each (see block_runs)
  text_length: int = 333  # tokens per caption (SD3: 77 CLIP + 256 T5) of the dummy context; any length runs
  # A text encoder trained with the model (CLIP's architecture, width joint_attention_dim, pooled output projected
  # to pooled_projection_dim) reading token ids; 0: the model reads frozen encoders' embeddings instead.
  text_vocab_size: int = 0
  text_layers: int = 2  # its depth and heads (width joint_attention_dim)
  text_heads: int = 2  # (text_vocab_size > 0 only)
  text_eos_id: int = 0  # the tokenizer's end-of-text id: the pooled feature is taken there

  learn_sigma = False

  def describe(self) -> str:
    h, w = self.input_hw
    return (f"MMDiT depth={self.depth} hidden={self.hidden_size} heads={self.num_heads} patch={self.patch_size} "
            f"on {h}x{w}x{self.in_channels}")

  def check_config(self) -> None:
    """ValueError naming the first invalid field."""
    layers.check_compute_options(self.remat, self.attention_backend)
    if self.pos_embed not in posemb.POS_EMBEDS:
      raise ValueError(f"pos_embed must be one of {posemb.POS_EMBEDS}, got {self.pos_embed!r}")
    bad = [i for i in self.dual_attention_layers if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"dual_attention_layers must be block indices below depth={self.depth}, got {bad}")

  def dummy_inputs(self, batch_size: int = 1) -> tuple:
    """(x, t, context, pooled, tokens) at the native input shape and text_length tokens, for init and shapes
    (tokens for a model with its own text encoder, context and pooled otherwise; the others None)."""
    x, t = jnp.zeros((batch_size, *self.input_hw, self.in_channels), jnp.float32), jnp.zeros((batch_size,))
    if self.text_vocab_size:
      return x, t, None, None, jnp.zeros((batch_size, self.text_length), jnp.int32)
    return (x, t, jnp.zeros((batch_size, self.text_length, self.joint_attention_dim), jnp.float32),
            jnp.zeros((batch_size, self.pooled_projection_dim), jnp.float32), None)

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, context: jnp.ndarray | None = None,
               pooled: jnp.ndarray | None = None, tokens: jnp.ndarray | None = None) -> jnp.ndarray:
    self.check_config()
    dtype, dim, p = jnp.dtype(self.dtype), self.hidden_size, self.patch_size
    if self.text_vocab_size:
      if tokens is None:
        raise ValueError("tokens (B, L) are required: the model has its own text encoder (text_vocab_size > 0)")
      context, pooled = self.encode_text(tokens)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be (B, H, W, in_channels={self.in_channels}), got shape {x.shape}")
    batch, height, width, _ = x.shape
    if height % p or width % p:
      raise ValueError(f"patch_size={p} must divide the input height and width, got {height}x{width}")
    grid_h, grid_w = height // p, width // p

    x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=dtype, param_dtype=jnp.float32,
                name="pos_embed_proj",
                kernel_init=partitioned(layers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                                        (None, None, None, "embed")),
                bias_init=partitioned(zeros, ("embed",)))(x)  # (B, h, w, D)
    x = x.reshape(batch, grid_h * grid_w, dim).astype(jnp.float32)  # (B, T, D)
    rope = None
    if self.pos_embed == "sincos":
      base = self.input_hw[0] // p
      x = x + posemb.cropped_sincos_2d(dim, grid_h, grid_w, self.pos_embed_max_size, base)[None]
    else:
      positions = posemb.grid_positions(grid_h, grid_w)
      rope = tuple(map(jnp.asarray, posemb.rope_2d(self.head_dim, positions, self.rope_base)))
    x = nn.with_logical_constraint(x.astype(matmul.activation_dtype(dtype)), ACT)  # the blocks' output dtype

    c = layers.TimestepEmbedder(dim, dtype=dtype, name="timestep_embedder")(t)  # (B, D); [cos, sin] features
    h = dense(dim, (None, "embed"), dtype, "text_embedder_linear_1", layers.normal(0.02))(pooled)
    c = c + dense(dim, ("mlp", "embed"), dtype, "text_embedder_linear_2", layers.normal(0.02))(nn.silu(h))
    ctx = dense(dim, (None, "embed"), dtype, "context_embedder")(context)  # (B, L, D)
    ctx = nn.with_logical_constraint(ctx, ACT)

    for start, stop, dual, pre_only in block_runs(self.depth, tuple(self.dual_attention_layers)):
      fields = dict(num_heads=self.num_heads, qk_norm=self.qk_norm, dual_attention=dual, context_pre_only=pre_only,
                    dtype=dtype, attention_backend=self.attention_backend)
      x, ctx = run_blocks((JointBlock, ScannedJointBlock), fields, start, stop, self.scan_blocks, self.remat,
                          "transformer_blocks", (x, ctx), c, rope)

    scale, shift = jnp.split(dense(2 * dim, ("embed", "mlp"), dtype, "norm_out_linear", zeros)(nn.silu(c)), 2, -1)
    x = modulate(layer_norm(x, 1e-6), shift, scale)
    x = dense(p * p * self.out_channels, ("embed", "patch"), dtype, "proj_out", zeros)(x)  # (B, T, p*p*C)
    return unpatchify(x.astype(jnp.float32), grid_h, grid_w, p)  # (B, H, W, C_out)


def run_blocks(kinds: tuple, fields: dict, start: int, stop: int, scan: bool, remat: str, prefix: str, carry,
               *broadcast):
  """Blocks start..stop-1 of one kind, kinds = (block, its scanned form), on `carry` (the stream, or a tuple of
  streams) with the `broadcast` arguments; called from a compact __call__. Several blocks under `scan` run as one
  nn.scan over stacked parameters ("{prefix}_{start}_{last}"), else one by one ("{prefix}_{i}")."""
  scanned = scan and stop - start > 1
  block = kinds[1] if scanned else kinds[0]
  if remat != "none":
    block = nn.remat(block, policy=REMAT_POLICIES[remat])
  if scanned:
    stack = nn.scan(block, variable_axes=lora.SCAN_AXES, split_rngs=lora.SCAN_RNGS,
                    in_axes=(nn.broadcast,) * len(broadcast), length=stop - start,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(**fields, name=run_name(start, stop, prefix))(carry, *broadcast)[0]
  for i in range(start, stop):
    carry = block(**fields, name=f"{prefix}_{i}")(*(carry if isinstance(carry, tuple) else (carry,)), *broadcast)
  return carry


def block_tokens(intermediates: dict, depth: int) -> jnp.ndarray:
  """The (B, T, D) image tokens leaving joint block `depth` (1-based) of an apply with "intermediates" mutable
  (REPA): from its run, "transformer_blocks_{i}" or the scanned "transformer_blocks_{start}_{last}"."""
  index = depth - 1
  for name, sown in intermediates.items():
    if not name.startswith("transformer_blocks_"):
      continue
    bounds = [int(part) for part in name.removeprefix("transformer_blocks_").split("_")]
    if bounds[0] <= index <= bounds[-1]:
      tokens = sown["tokens"][0]
      return tokens if len(bounds) == 1 else tokens[index - bounds[0]]
  raise ValueError(f"repa.depth={depth}: no joint block {index} among {sorted(intermediates)}")


def skip_layer_params(params: dict, model: MMDiT, layers: tuple) -> dict:
  """`params` with the joint blocks `layers` (0-based, diffusers' skip_layers) turned into the identity: their
  adaLN gates (image stream: gate_msa, gate_mlp and dual attention's gate_msa2; text stream: its two gates) are
  zero, so the block adds nothing to either stream, as diffusers skips it (skip-layer guidance)."""
  if any(not 0 <= layer < model.depth for layer in layers):
    raise ValueError(f"diffusion.slg_layers={tuple(layers)}: expected joint blocks 0 to {model.depth - 1}")
  runs = [(start, stop) for start, stop, _, _ in block_runs(model.depth, tuple(model.dual_attention_layers))]
  blocks = stack_blocks(params, runs, scan=False)

  def without_gates(linear: dict) -> dict:
    dim, width = linear["kernel"].shape
    keep = jnp.ones(width).at[jnp.concatenate([jnp.arange(g * dim, (g + 1) * dim) for g in range(2, width // dim, 3)])
                              ].set(0.0)  # every third chunk of D from the third: the gates
    return {"kernel": linear["kernel"] * keep, "bias": linear["bias"] * keep}

  for layer in layers:
    block = dict(blocks[f"transformer_blocks_{layer}"])
    block["norm1_linear"] = without_gates(block["norm1_linear"])
    if block["norm1_context_linear"]["kernel"].shape[1] == 6 * block["norm1_context_linear"]["kernel"].shape[0]:
      block["norm1_context_linear"] = without_gates(block["norm1_context_linear"])
    blocks[f"transformer_blocks_{layer}"] = block
  return stack_blocks(blocks, runs, model.scan_blocks)


def stack_runs(params: dict, model: MMDiT) -> dict:
  """Per-block "transformer_blocks_{i}" parameters -> the model's layout (scanned runs stacked), and back."""
  runs = [(start, stop) for start, stop, _, _ in block_runs(model.depth, tuple(model.dual_attention_layers))]
  return stack_blocks(params, runs, model.scan_blocks)


def stack_blocks(params: dict, runs: list[tuple[int, int]], scan: bool, prefix: str = "transformer_blocks") -> dict:
  """Per-block "{prefix}_{i}" parameters of the (start, stop) runs -> one stacked "{prefix}_{start}_{last}" tree per
  run of several blocks when `scan`, and stacked trees back to per-block ones when not."""
  params = dict(params)
  for start, stop in runs:
    if stop - start == 1:
      continue
    name = run_name(start, stop, prefix)
    singles = [f"{prefix}_{i}" for i in range(start, stop)]
    if scan and singles[0] in params:
      params[name] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params.pop(k) for k in singles])
    elif not scan and name in params:
      stacked = params.pop(name)
      for k, single in enumerate(singles):
        params[single] = jax.tree.map(lambda leaf, k=k: leaf[k], stacked)
  return params


# ----------------------------------------------------------------------------------------------
#                                          Presets
# ----------------------------------------------------------------------------------------------

PRESETS = {  # diffusers' transformer configs of the released models
    "sd3-medium": dict(depth=24, num_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": dict(depth=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True),
    # for tests and the CPU demo; not released models
    "tiny": dict(depth=2, num_heads=2, head_dim=16, in_channels=4, out_channels=4, joint_attention_dim=32,
                 pooled_projection_dim=16, input_size=8, pos_embed_max_size=16, text_length=8),
}


def create_mmdit(name: str, **overrides) -> MMDiT:
  """A preset by name (sd3-medium, sd3.5-medium, sd3.5-large, tiny) with fields overridden."""
  return fields.create(MMDiT, PRESETS, name, **overrides)


# ----------------------------------------------------------------------------------------------
#                               Family interface (jdit.models.family)
# ----------------------------------------------------------------------------------------------

MODEL = MMDiT
VARIANT = "sd3.5-medium"
TINY = dict(variant="tiny")
RECIPE = {  # SD3's objective and sampler: rectified flow, logit-normal times, shift 3, Euler
    "diffusion": dict(kind="flow", variance="fixed_small", timestep_sampling="logit_normal", shift=3.0,
                      sampler="euler", sampling_steps=28, guidance_scale=7.0, guidance_mode="all",
                      flow_schedule="sd3"),
}


def to_layout(params: dict, model: MMDiT) -> dict:
  return stack_runs(params, model)


LORA_TARGETS = (  # lora.spec_for's default: attention (both) and MLP kernels of the image and text streams
    r"^transformer_blocks_[\d_]+/(attn2?/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|"
    r"ff(_context)?/(net_0_proj|net_2))$",
)

TABLE = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


def table_model(name: str, resolution: int = 1024) -> MMDiT:
  """Preset `name` at resolution^2 images = (resolution / 8)^2 x 16 SD3-VAE latents, SD3's 333 text tokens."""
  return create_mmdit(name, input_size=resolution // 8)
