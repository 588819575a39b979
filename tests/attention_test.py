"""Attention backends: Pallas splash attention (interpreted on CPU) and the blockwise backend equal the reference,
with gradients, the blockwise one in memory linear in tokens, and `auto` picks the backend per platform."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdit import sharding
from jdit.nn import attention


def qkv(tokens=128, heads=4, head_dim=32, batch=4, dtype=jnp.float32):
  rng = np.random.RandomState(0)
  return tuple(jnp.asarray(rng.randn(batch, tokens, heads, head_dim), dtype) for _ in range(3))


def loss(backend):
  return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, backend)))


def test_splash_attention_matches_the_reference_with_gradients_sharded_or_not():
  q, k, v = qkv()
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, "splash"),
                             attention.dot_product_attention(q, k, v, "einsum"), atol=2e-6)
  reference = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
  for got, want in zip(sharded, reference):
    np.testing.assert_allclose(got, want, atol=1e-5)
  one = tuple(a[:1] for a in (q, k, v))  # a batch of one (a model's init) over 4 batch shards: XLA's attention
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    np.testing.assert_allclose(jax.jit(lambda *a: attention.dot_product_attention(*a, "splash"))(*one),
                               attention.dot_product_attention(*one, "einsum"), atol=2e-6)


@pytest.mark.parametrize("tokens", [64, 200])
def test_splash_attention_pads_token_counts_off_the_128_lanes(tokens):
  """The padded keys are masked out: MM-DiT's 4096 + 333 tokens, or any count, equal the reference."""
  q, k, v = qkv(tokens=tokens, batch=2)
  np.testing.assert_allclose(attention.dot_product_attention(q, k, v, "splash"),
                             attention.dot_product_attention(q, k, v, "einsum"), atol=2e-6)
  for got, want in zip(jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("platform,dtype,tokens,head_dim,expected", [
    ("gpu", jnp.bfloat16, 256, 72, "cudnn"),   # DiT-XL/2 at 256px in bf16
    ("gpu", jnp.float32, 256, 72, "xla"),      # cuDNN flash attention needs 16-bit inputs
    ("gpu", jnp.bfloat16, 256, 132, "xla"),    # head dim over 128
    ("tpu", jnp.bfloat16, 256, 72, "splash"),
    ("tpu", jnp.bfloat16, 4429, 64, "splash"),  # SD3.5 at 1024px: 4096 + 333 tokens, padded to 4480
    ("tpu", jnp.float32, 64, 64, "xla"),       # under one 128-lane tile
    ("cpu", jnp.float32, 256, 64, "blockwise"),   # one block: the direct path
    ("cpu", jnp.float32, 4096, 64, "blockwise"),  # long sequences: linear memory
])
def test_auto_backend_per_platform(platform, dtype, tokens, head_dim, expected):
  assert attention.resolve_backend("auto", dtype, tokens, head_dim, platform) == expected
  assert attention.resolve_backend("einsum", dtype, tokens, head_dim, platform) == "einsum"  # explicit wins


def _relative(a, b) -> float:
  return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())


@pytest.mark.parametrize("tokens,block,scans", [(100, 32, True), (333, 128, True), (64, 64, False), (7, 512, False)])
def test_blockwise_attention_equals_the_reference_with_gradients(tokens, block, scans):
  """333: SD3's text + image; one block (64 and 7 tokens) runs the direct path, without scans."""
  q, k, v = qkv(tokens, heads=3, head_dim=16, batch=2)
  blockwise = lambda q, k, v: attention.blockwise_attention(q, k, v, block)  # noqa: E731
  step = jax.value_and_grad(lambda q, k, v: blockwise(q, k, v).sum(), argnums=(0, 1, 2))
  assert ("scan[" in str(jax.make_jaxpr(step)(q, k, v))) == scans
  assert _relative(blockwise(q, k, v), attention.dot_product_attention(q, k, v, "einsum")) <= 1e-6
  target = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
  grads = [jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), target), argnums=(0, 1, 2))(q, k, v)
           for fn in (blockwise, lambda q, k, v: attention.dot_product_attention(q, k, v, "einsum"))]
  for got, want in zip(*grads):
    assert _relative(got, want) <= 2e-6


def test_blockwise_attention_in_bfloat16_and_through_a_joint_text_image_model():
  q, k, v = qkv(200, heads=2, head_dim=16, batch=2, dtype=jnp.bfloat16)
  out = attention.dot_product_attention(q, k, v, "blockwise")
  assert out.dtype == jnp.bfloat16
  assert _relative(out, attention.dot_product_attention(q, k, v, "einsum")) <= 2e-2
  from conftest import randomize
  from jdit.models import family
  from jdit.models.conditioning import text_conditioned
  model = family.get("mmdit").create_mmdit("tiny")
  assert text_conditioned(model)
  batch = {k: jnp.asarray(v) for k, v in model.dummy_batch(2).items()}
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  outs = [family.apply(model.clone(attention_backend=b), params, batch["image"], jnp.full((2,), 300.0),
                       model.condition(batch)) for b in ("einsum", "blockwise")]
  assert _relative(outs[1], outs[0]) <= 1e-5


def test_blockwise_attention_memory_is_linear_in_tokens():
  """XLA's compiled estimate of a forward and backward pass at 4,096 tokens: the einsum backend holds
  (B, H, T, T) float32 scores, the blockwise one a block of them (measured figures: tools/bench.py --attention)."""
  def temporaries(backend, tokens):
    q, k, v = qkv(tokens, heads=2, head_dim=16, batch=1)
    loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, backend))  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  scores = 2 * 4096 * 4096 * 4  # one (H, T, T) float32 score matrix
  assert temporaries("einsum", 4096) >= scores
  assert temporaries("blockwise", 4096) < scores / 8
  assert temporaries("blockwise", 4096) < 3 * temporaries("blockwise", 2048)  # about twice: linear, not quadratic
