"""DiT (Peebles & Xie 2023) in flax.linen, matching facebookresearch/DiT exactly; NHWC in and out.
The "dit" model family (see jdit.models.family).

    model = create_dit("XL/2")                       # the paper's variants by name, see VARIANTS
    params = model.init(rng, *model.dummy_inputs())["params"]
    out = model.apply({"params": params}, x, t, y)   # x (B, H, W, C), t (B,), y (B,) -> (B, H, W, C or 2C)
"""
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdit.models import fields
from jdit.models.conditioning import ClassConditional
from jdit.nn import layers, lora, matmul, posemb
from jdit.nn.layers import REMAT_POLICIES, dense, layer_norm, modulate, partitioned, zeros

# name -> (depth, hidden_size, num_heads); a variant is "<size>/<patch>", e.g. "XL/2".
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Tiny": (2, 64, 4),  # for tests and the CPU demo; not a paper variant
}
PATCH_SIZES = (2, 4, 8)
PAPER_VARIANTS = tuple(f"{size}/{p}" for size in ("S", "B", "L", "XL") for p in PATCH_SIZES)
VARIANTS = PAPER_VARIANTS + tuple(f"Tiny/{p}" for p in (1,) + PATCH_SIZES)
ACT = ("act_batch", "act_len", "act_embed")


# ----------------------------------------------------------------------------------------------
#                                      Core DiT modules
# ----------------------------------------------------------------------------------------------

MLPS = ("gelu", "swiglu")  # DiT's tanh-GELU MLP | SwiGLU of 2/3 the width (LightningDiT)
NORMS = ("layer", "rms")  # DiT's affine-free LayerNorm | RMSNorm with a learned scale (LightningDiT)


def block_norm(module: nn.Module, x: jnp.ndarray, kind: str, eps: float, name: str) -> jnp.ndarray:
  """The pre-modulation norm of a block or the final layer: LayerNorm (no parameters) or RMSNorm `name`."""
  return layer_norm(x, eps) if kind == "layer" else layers.RMSNorm(eps, "embed", name=name, parent=module)(x)


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning on c."""
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention_backend: str = "auto"
  qk_norm: bool = False
  mlp: str = "gelu"
  norm: str = "layer"

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray, rope: tuple | None) -> jnp.ndarray:
    dim = x.shape[-1]
    mod = dense(6 * dim, ("embed", "mlp"), self.dtype, "adaLN_modulation", zeros)(nn.silu(c))  # (B, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)  # (B, D)
    h = modulate(block_norm(self, x, self.norm, 1e-6, "norm1"), shift_msa, scale_msa)  # (B, T, D)
    h = layers.Attention(self.num_heads, self.dtype, self.attention_backend, self.qk_norm, name="attn")(h, rope)
    x = nn.with_logical_constraint(x + gate_msa[:, None] * h, ACT)  # (B, T, D)
    h = modulate(block_norm(self, x, self.norm, self.mlp_norm_eps, "norm2"), shift_mlp, scale_mlp)  # (B, T, D)
    width = int(dim * self.mlp_ratio)
    if self.mlp == "swiglu":  # 2/3 of the width keeps the parameter count of the GELU MLP
      h = layers.SwiGLU(int(2 / 3 * width), self.dtype, name="mlp")(h)  # (B, T, D)
    else:
      h = layers.Mlp(width, self.dtype, name="mlp")(h)  # (B, T, D)
    x = nn.with_logical_constraint(x + gate_mlp[:, None] * h, ACT)  # (B, T, D)
    self.sow("intermediates", "tokens", x)  # kept only when "intermediates" is mutable (REPA's block tokens)
    return x


class ScannedBlock(DiTBlock):
  """DiTBlock in the (carry, output) form nn.scan needs: the residual stream is the carry."""

  def __call__(self, x: jnp.ndarray, c: jnp.ndarray, rope: tuple | None) -> tuple[jnp.ndarray, None]:
    return super().__call__(x, c, rope), None


class FinalLayer(nn.Module):
  """adaLN-modulated LayerNorm, then a zero-initialized linear to patch pixels."""
  patch_size: int
  out_channels: int
  dtype: Any = jnp.float32
  norm: str = "layer"

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    dim = x.shape[-1]
    mod = dense(2 * dim, ("embed", "mlp"), self.dtype, "adaLN_modulation", zeros)(nn.silu(c))  # (B, 2D)
    shift, scale = jnp.split(mod, 2, axis=-1)  # (B, D) each
    x = modulate(block_norm(self, x, self.norm, 1e-6, "norm_final"), shift, scale)  # (B, T, D)
    out = self.patch_size ** 2 * self.out_channels
    return dense(out, ("embed", "patch"), self.dtype, "linear", zeros)(x)  # (B, T, p*p*C_out)


def unpatchify(x: jnp.ndarray, grid_h: int, grid_w: int, patch: int) -> jnp.ndarray:
  """(B, h*w, p*p*C) tokens -> (B, h*p, w*p, C) image; token features are ordered (p_row, p_col, C)."""
  b, _, features = x.shape
  c = features // patch ** 2
  x = x.reshape(b, grid_h, grid_w, patch, patch, c)  # (B, h, w, p, p, C)
  x = jnp.einsum("bhwpqc->bhpwqc", x)  # (B, h, p, w, p, C)
  return x.reshape(b, grid_h * patch, grid_w * patch, c)


class DiT(ClassConditional, nn.Module):
  """Diffusion Transformer with adaLN-Zero blocks over latent patches."""
  FAMILY: ClassVar[str] = "dit"
  # config.model.variant names a preset ("<size>/<patch>": S|B|L|XL|Tiny / 1|2|4|8) of the next four fields
  patch_size: int = 2  # pixels per token side
  hidden_size: int = 1152  # token width
  depth: int = 28  # blocks
  num_heads: int = 16  # attention heads (hidden_size / num_heads per head)
  mlp_ratio: float = 4.0  # MLP width / hidden_size
  input_size: int | tuple[int, int] = 32  # native (H, W) or side of the inputs: latent size for latent models,
                                          # image size in pixel space; any divisible size runs
  in_channels: int = 4  # channels of the input (4: SD-VAE latents)
  num_classes: int = 1000  # 0: unconditional
  class_dropout_prob: float = 0.1  # label dropout; > 0 adds the null class used by classifier-free guidance
  learn_sigma: bool = True  # output channels x2: eps and the variance interpolation
  pos_embed: str = "sincos"  # "sincos" (official, added to tokens) or "rope" (2D RoPE on q and k)
  rope_base: float = 10000.0  # RoPE's frequency base
  timestep_freq_shift: float = 0.0  # 0: official DiT; 1: diffusers' DiTTransformer2DModel
  mlp_norm_eps: float = 1e-6  # official 1e-6; diffusers' default norm_eps is 1e-5
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
  attention_backend: str = "auto"  # auto (per platform) | einsum | xla | cudnn | splash (see nn/attention.py)
  remat: str = "none"  # none | full | dots: rematerialization per block (dots saves linear-layer outputs)
  qk_norm: bool = False  # RMSNorm on q and k per head (stabilizes long bf16 runs)
  mlp: str = "gelu"  # gelu (official) | swiglu (LightningDiT: SwiGLU of 2/3 the width, the same parameters)
  norm: str = "layer"  # layer (official LayerNorm, no parameters) | rms (LightningDiT: RMSNorm with a scale)
  scan_blocks: bool = True  # one nn.scan over the blocks, params stacked under "blocks" (XL/2 step compiles 2.7x
                            # faster; CPU fwd+bwd 2.7x faster); False: per-block "blocks_{i}"

  @property
  def out_channels(self) -> int:
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this."""
    return self.patch_size

  def describe(self) -> str:
    return (f"DiT(hidden_size={self.hidden_size}, depth={self.depth}, num_heads={self.num_heads}, "
            f"patch_size={self.patch_size}, in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"learn_sigma={self.learn_sigma})")

  def check_config(self) -> None:
    """Raises ValueError naming the first invalid field."""
    if self.pos_embed not in posemb.POS_EMBEDS:
      raise ValueError(f"pos_embed must be one of {posemb.POS_EMBEDS}, got {self.pos_embed!r}")
    if self.mlp not in MLPS:
      raise ValueError(f"mlp must be one of {MLPS}, got {self.mlp!r}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    layers.check_compute_options(self.remat, self.attention_backend)
    if self.hidden_size % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
    for dim in self.input_hw:
      if dim % self.patch_size:
        raise ValueError(f"patch_size={self.patch_size} must divide input_size={self.input_size}")

  @nn.compact
  def __call__(self, x: jnp.ndarray, t: jnp.ndarray, y: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    self.check_config()
    dtype = jnp.dtype(self.dtype)
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"x must be (B, H, W, in_channels={self.in_channels}), got shape {x.shape}")
    batch, height, width, _ = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"patch_size={p} must divide the input height and width, got {height}x{width}")
    grid_h, grid_w = height // p, width // p

    # Patch embedding: a conv with kernel = stride = patch size.
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                param_dtype=jnp.float32, name="x_embedder",
                kernel_init=partitioned(layers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                                        (None, None, None, "embed")),
                bias_init=partitioned(zeros, ("embed",)))(x)  # (B, h, w, D)
    x = x.reshape(batch, grid_h * grid_w, self.hidden_size).astype(jnp.float32)  # (B, T, D)
    rope = None
    if self.pos_embed == "sincos":
      x = x + posemb.sincos_2d(self.hidden_size, grid_h, grid_w)[None]  # (B, T, D)
    else:
      positions = posemb.grid_positions(grid_h, grid_w)  # (T, 2)
      rope = tuple(map(jnp.asarray, posemb.rope_2d(self.hidden_size // self.num_heads, positions,
                                                    self.rope_base)))  # 2 x (T, Dh/2)
    # The residual stream in the dtype the layers return (as MM-DiT's and Flux's): bf16 on TPUs and GPUs in bf16,
    # float32 on CPUs and in float32; a float32 stream was 13% of the XL/2 step's HBM traffic on v5p.
    x = nn.with_logical_constraint(x.astype(matmul.activation_dtype(dtype)), ACT)

    # Condition: timestep embedding + label embedding.
    c = layers.TimestepEmbedder(self.hidden_size, freq_shift=self.timestep_freq_shift, dtype=dtype,
                                name="t_embedder")(t)  # (B, D)
    if self.num_classes:
      if y is None:
        raise ValueError("y (class labels) is required: the model has num_classes > 0")
      c = c + layers.LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob,
                                   name="y_embedder")(y, train)  # (B, D)

    block = ScannedBlock if self.scan_blocks else DiTBlock
    if self.remat != "none":
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat])
    fields = (self.num_heads, self.mlp_ratio, self.mlp_norm_eps, dtype, self.attention_backend, self.qk_norm,
              self.mlp, self.norm)
    if self.scan_blocks:
      stack = nn.scan(block, variable_axes=lora.SCAN_AXES, split_rngs=lora.SCAN_RNGS,
                      in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(*fields, name="blocks")(x, c, rope)  # (B, T, D)
    for i in range(0 if self.scan_blocks else self.depth):
      x = block(*fields, name=f"blocks_{i}")(x, c, rope)  # (B, T, D)

    x = FinalLayer(p, self.out_channels, dtype, self.norm, name="final_layer")(x, c)  # (B, T, p*p*C_out)
    return unpatchify(x.astype(jnp.float32), grid_h, grid_w, p)  # (B, H, W, C_out)


# ----------------------------------------------------------------------------------------------
#                                   Variants and configuration
# ----------------------------------------------------------------------------------------------

PRESETS = {f"{size}/{patch}": dict(zip(("depth", "hidden_size", "num_heads"), SIZES[size]), patch_size=int(patch))
           for size, _, patch in (name.partition("/") for name in VARIANTS)}


def create_dit(variant: str, **overrides) -> DiT:
  """The named variant ("S/2" ... "XL/8", "Tiny/2") with any DiT field overridden."""
  return fields.create(DiT, PRESETS, variant, **overrides)


def heads_for(depth: int, hidden_size: int) -> int | None:
  """Number of heads of the named size with this depth and width, if there is one."""
  for d, h, heads in SIZES.values():
    if (d, h) == (depth, hidden_size):
      return heads
  return None


def block_layout(params: dict, scan_blocks: bool) -> dict:
  """Parameters in the block layout of a model with this scan_blocks: per-block "blocks_{i}" subtrees, or one
  "blocks" subtree with a leading depth axis. Converts between the two when needed (checkpoints of either
  layout load into either model)."""
  params = dict(params)
  if scan_blocks and "blocks_0" in params:
    names = sorted((k for k in params if k.startswith("blocks_")), key=lambda k: int(k.split("_")[1]))
    params["blocks"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params.pop(k) for k in names])
  elif not scan_blocks and "blocks" in params:
    stacked = params.pop("blocks")
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
      params[f"blocks_{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
  return params


# ----------------------------------------------------------------------------------------------
#                               Family interface (jdit.models.family)
# ----------------------------------------------------------------------------------------------

MODEL = DiT
VARIANT = "XL/2"
TINY = dict(variant="Tiny/2", depth=2, hidden_size=32, num_heads=2, input_size=8, in_channels=1)


def to_layout(params: dict, model: DiT) -> dict:
  return block_layout(params, model.scan_blocks)


def block_tokens(intermediates: dict, depth: int) -> jnp.ndarray:
  """The (B, T, D) tokens leaving block `depth` (1-based) of an apply with "intermediates" mutable (REPA)."""
  if "blocks" in intermediates:  # scanned: every block's tokens stacked
    return intermediates["blocks"]["tokens"][0][depth - 1]
  return intermediates[f"blocks_{depth - 1}"]["tokens"][0]


LORA_TARGETS = (r"^blocks(_\d+)?/(attn/(qkv|proj)|mlp/(fc1|fc2))$",)  # lora.spec_for's default: attention, MLP

TABLE = PAPER_VARIANTS + ("B/2 lightning", "XL/2 lightning")  # the model table's rows: the paper's ImageNet
                                                              # 256x256 setting, and with LightningDiT's block


LIGHTNING = dict(mlp="swiglu", norm="rms", qk_norm=True, pos_embed="rope")  # LightningDiT's block (Yao et al. 2025)


def table_model(name: str, resolution: int = 256) -> DiT:
  """Variant `name` at DiT paper Table 4's setting: resolution^2 images = (resolution / 8)^2 x 4 SD-VAE latents,
  1000 classes (256: the table's 32x32x4); "<variant> lightning" with LightningDiT's block."""
  variant, _, block = name.partition(" ")
  return create_dit(variant, input_size=resolution // 8, in_channels=4, num_classes=1000, learn_sigma=True,
                    **(LIGHTNING if block == "lightning" else {}))
