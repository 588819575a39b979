"""The LightningDiT block options of the DiT family (model.mlp="swiglu", model.norm="rms", with qk_norm and 2D
RoPE) against a PyTorch re-statement of LightningDiT's published block (hustvl/LightningDiT,
models/lightningdit.py: LightningDiTBlock with use_qknorm, use_swiglu, use_rmsnorm; DINOv2's SwiGLUFFN; the
Llama RMSNorm), and the parameters the model table counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from conftest import randomize, relative_error

from jdit import flops
from jdit.models import dit as dit_lib
from jdit.nn import posemb

D, HEADS, TOKENS = 48, 4, 16  # a 4x4 grid


def rms(x, weight, eps=1e-6):
  """The Llama RMSNorm LightningDiT imports: x / rms(x) in float32, times a learned weight."""
  return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rotate(x, cos, sin):
  """RoPE on interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin), as VisionRotaryEmbeddingFast."""
  pairs = x.unflatten(-1, (-1, 2))
  rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
  return x * cos + rotated * sin


def torch_block(w, x, c, cos, sin):
  """LightningDiTBlock.forward with use_qknorm, use_swiglu, use_rmsnorm (6-way adaLN with shift)."""
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(F.silu(c), *w["ada"]).chunk(6, dim=1)
  modulate = lambda h, shift, scale: h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
  h = modulate(rms(x, w["norm1"]), shift_msa, scale_msa)
  b, n, _ = h.shape
  q, k, v = F.linear(h, *w["qkv"]).reshape(b, n, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
  q, k = rms(q, w["q_norm"]), rms(k, w["k_norm"])
  q, k = rotate(q, cos, sin), rotate(k, cos, sin)
  attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, D)
  x = x + gate_msa.unsqueeze(1) * F.linear(attn, *w["proj"])
  h = modulate(rms(x, w["norm2"]), shift_mlp, scale_mlp)
  x1, x2 = F.linear(h, *w["w12"]).chunk(2, dim=-1)  # SwiGLUFFN: w12 -> silu(x1) * x2 -> w3
  return x + gate_mlp.unsqueeze(1) * F.linear(F.silu(x1) * x2, *w["w3"])


def as_torch(params):
  """Our block's parameters as the reference's (weight (out, in), bias) pairs."""
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64)).float()
  linear = lambda p: (t(p["kernel"].reshape(p["kernel"].shape[0], -1)).T, t(p["bias"].reshape(-1)))
  return {"ada": linear(params["adaLN_modulation"]), "norm1": t(params["norm1"]["scale"]),
          "norm2": t(params["norm2"]["scale"]), "qkv": linear(params["attn"]["qkv"]),
          "q_norm": t(params["attn"]["q_norm"]["scale"]), "k_norm": t(params["attn"]["k_norm"]["scale"]),
          "proj": (t(params["attn"]["proj"]["kernel"].reshape(D, D)).T, t(params["attn"]["proj"]["bias"])),
          "w12": linear(params["mlp"]["fc1"]), "w3": linear(params["mlp"]["fc2"])}


def test_swiglu_rms_block_matches_lightningdit():
  block = dit_lib.DiTBlock(HEADS, qk_norm=True, mlp="swiglu", norm="rms")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, TOKENS, D)).astype(np.float32)
  c = rng.standard_normal((2, D)).astype(np.float32)
  rope = tuple(jnp.asarray(a, jnp.float32) for a in posemb.rope_2d(D // HEADS, posemb.grid_positions(4, 4)))
  params = randomize(jax.jit(block.init)(jax.random.key(0), x, c, rope)["params"], seed=1)  # no zero gates
  assert params["mlp"]["fc1"]["kernel"].shape == (D, 2, 128)  # int(2/3 * 4D): LightningDiT's width
  ours = jax.jit(block.apply)({"params": params}, x, c, rope)
  cos, sin = (torch.from_numpy(np.array(a)).repeat_interleave(2, dim=-1) for a in rope)  # per pair -> per dim
  reference = torch_block(as_torch(params), torch.from_numpy(x), torch.from_numpy(c), cos, sin)
  assert relative_error(np.asarray(ours), reference.numpy()) < 1e-5


def test_lightning_rows_of_the_model_table_count_the_new_parameters():
  rows = {r["model"]: r for r in flops.table_rows("dit", ["XL/2", "XL/2 lightning"])}
  depth, dim, head_dim = 28, 1152, 72
  # fc1 D -> 2 x 3072 and fc2 3072 -> D hold the weights of the GELU MLP's D -> 4608 -> D; fc1 has 1536 more biases
  added = depth * (2 * 3072 - 4608 + 2 * dim + 2 * head_dim) + dim  # + RMS scales, qk-norm scales, final norm
  assert rows["XL/2 lightning"]["params"] == rows["XL/2"]["params"] + added
  assert abs(rows["XL/2 lightning"]["gmacs"] / rows["XL/2"]["gmacs"] - 1) < 0.01


def test_every_parameter_of_the_lightning_dit_has_logical_axis_names():
  model = dit_lib.create_dit("Tiny/2", input_size=8, in_channels=4, num_classes=10, **dit_lib.LIGHTNING)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
  assert boxed["final_layer"]["norm_final"]["scale"].names == ("embed",)
  assert boxed["blocks"]["norm1"]["scale"].names == ("layers", "embed")  # scanned: stacked over the blocks
