"""The DiT model: official initialization, shapes, conditioning, precision, backends, remat, axes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize, relative_error

from jdit import config as config_lib, sample
from jdit.models import create_dit
from jdit.nn import platform, posemb
from jdit.models import dit as dit_lib

TINY = dict(input_size=8, in_channels=4, num_classes=10)
UNROLLED = dict(TINY, scan_blocks=False)  # per-block parameters blocks_0, blocks_1, ... (the default scans them)


def _inputs(model, batch=3, seed=0, hw=None):
  rng = np.random.RandomState(seed)
  hw = hw or model.input_hw
  x = jnp.asarray(rng.randn(batch, *hw, model.in_channels), jnp.float32)
  t = jnp.asarray(np.linspace(0, 999, batch), jnp.float32)
  y = jnp.asarray(rng.randint(0, model.num_classes + 1, batch)) if model.num_classes else None
  return x, t, y


def _init(model):
  return model.init(jax.random.key(0), *model.dummy_inputs())["params"]


def test_official_init_makes_every_block_identity_and_output_zero():
  model = create_dit("Tiny/2", **UNROLLED)
  params = _init(model)
  x, t, y = _inputs(model)
  out, state = model.apply({"params": params}, x, t, y, capture_intermediates=True)
  assert np.abs(np.asarray(out)).max() == 0.0
  inter = state["intermediates"]
  tokens = inter["x_embedder"]["__call__"][0].reshape(3, 16, model.hidden_size)
  embedded = tokens + posemb.sincos_2d(model.hidden_size, 4, 4)[None]
  np.testing.assert_array_equal(inter["blocks_0"]["__call__"][0], embedded)
  np.testing.assert_array_equal(inter["blocks_1"]["__call__"][0], embedded)


def test_official_initialization_distributions():
  model = create_dit("S/2", input_size=32, depth=2, scan_blocks=False)  # real widths, few blocks
  p = nn.unbox(_init(model))
  d = model.hidden_size
  for block in ("blocks_0", "blocks_1"):
    assert not np.any(p[block]["adaLN_modulation"]["kernel"]) and not np.any(p[block]["adaLN_modulation"]["bias"])
  for leaf in jax.tree.leaves(p["final_layer"]):
    assert not np.any(leaf)
  for kernel, fan_in, fan_out in ((p["blocks_0"]["attn"]["qkv"]["kernel"], d, 3 * d),
                                  (p["blocks_0"]["attn"]["proj"]["kernel"], d, d),
                                  (p["blocks_0"]["mlp"]["fc1"]["kernel"], d, 4 * d),
                                  (p["x_embedder"]["kernel"], 4 * 2 * 2, d)):  # patch conv: flattened view
    bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform
    assert np.abs(kernel).max() <= bound
    assert abs(np.std(kernel) - bound / math.sqrt(3)) < 0.05 * bound
  for table in (p["y_embedder"]["embedding_table"]["embedding"], p["t_embedder"]["mlp_in"]["kernel"],
                p["t_embedder"]["mlp_out"]["kernel"]):
    assert abs(np.std(table) - 0.02) < 0.002
  assert p["y_embedder"]["embedding_table"]["embedding"].shape == (1001, d)  # + null class
  biases = [p["blocks_0"]["attn"]["qkv"]["bias"], p["blocks_0"]["mlp"]["fc1"]["bias"], p["x_embedder"]["bias"],
            p["t_embedder"]["mlp_in"]["bias"]]
  assert not any(np.any(b) for b in biases)


@pytest.mark.parametrize("learn_sigma,hw", [(True, (8, 12)), (False, (12, 8))])
def test_any_size_and_learned_sigma(learn_sigma, hw):
  model = create_dit("Tiny/4", input_size=hw, in_channels=3, num_classes=10, learn_sigma=learn_sigma)
  params = randomize(_init(model))
  out = model.apply({"params": params}, *_inputs(model, batch=2))
  assert out.shape == (2, *hw, 6 if learn_sigma else 3)
  assert np.all(np.isfinite(out))


def test_unconditional_model_has_no_label_embedder():
  model = create_dit("Tiny/2", input_size=8, in_channels=4, num_classes=0)
  params = randomize(_init(model))
  assert "y_embedder" not in params
  x, t, _ = _inputs(model)
  assert model.apply({"params": params}, x, t).shape == (3, 8, 8, 8)


def test_label_dropout_uses_the_null_class_during_training_only():
  model = create_dit("Tiny/2", **TINY, class_dropout_prob=1.0)
  params = randomize(_init(model))
  x, t, y = _inputs(model)
  dropped = model.apply({"params": params}, x, t, y, train=True, rngs={"dropout": jax.random.key(1)})
  null = model.apply({"params": params}, x, t, jnp.full_like(y, 10))
  np.testing.assert_allclose(dropped, null, rtol=1e-6, atol=1e-6)
  kept = model.apply({"params": params}, x, t, jnp.zeros_like(y))
  assert np.abs(np.asarray(kept - null)).max() > 1e-3


def test_sampling_classes_outside_the_table_get_a_clear_error():
  # the embedder clamps labels (a take XLA can shard and price), so the sampler checks them first
  model = create_dit("Tiny/2", **TINY)
  config = config_lib.base("dit")
  assert list(sample.sample_labels(config, model, 12)) == [*range(10), 0, 1]
  config.sample.classes = [3, 10]
  with pytest.raises(ValueError, match=r"sample.classes must be class indices in \[0, 10\)"):
    sample.sample_labels(config, model, 4)


def test_bf16_compute_is_close_to_fp32_and_keeps_fp32_params():
  model = create_dit("Tiny/2", **TINY)
  params = randomize(_init(model), scale=0.05)
  inputs = _inputs(model)
  ref = model.apply({"params": params}, *inputs)
  bf16 = create_dit("Tiny/2", **TINY, dtype="bfloat16")
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(_init(bf16))))
  out = bf16.apply({"params": params}, *inputs)
  assert out.dtype == jnp.float32
  assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("target,stream", [("cpu", jnp.float32), ("gpu", jnp.bfloat16)])
def test_bf16_residual_stream_follows_the_platforms_activations(target, stream):
  # bf16 on accelerators (as MM-DiT's and Flux's streams; 13% of the XL/2 step's HBM traffic on v5p), float32 on CPUs
  model = create_dit("Tiny/2", **TINY, attention_backend="einsum")
  params = randomize(_init(model), scale=0.05)
  inputs = _inputs(model)
  ref = model.apply({"params": params}, *inputs)
  with platform.targeting(target):
    out, state = model.clone(dtype="bfloat16").apply({"params": params}, *inputs, mutable=["intermediates"])
  tokens = dit_lib.block_tokens(state["intermediates"], 2)  # the stream leaving the last block
  assert tokens.dtype == stream and out.dtype == jnp.float32
  assert relative_error(out, ref) < 2e-2


@pytest.mark.parametrize("pos_embed,qk_norm", [("sincos", False), ("rope", True)])
def test_attention_backends_agree(pos_embed, qk_norm):
  backends = ["einsum", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
  outputs = []
  for backend in backends:
    dtype = "bfloat16" if backend == "cudnn" else "float32"
    model = create_dit("Tiny/2", **TINY, pos_embed=pos_embed, qk_norm=qk_norm, attention_backend=backend,
                       dtype=dtype)
    params = randomize(_init(model))
    outputs.append(model.apply({"params": params}, *_inputs(model)))
  for out, backend in zip(outputs[1:], backends[1:]):
    assert relative_error(out, outputs[0]) < (2e-2 if backend == "cudnn" else 1e-5), backend


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_gives_the_same_outputs_and_gradients(policy):
  base = create_dit("Tiny/2", **TINY)
  params = randomize(_init(base))
  inputs = _inputs(base)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, *inputs) ** 2)

  ref_loss, ref_grads = jax.value_and_grad(lambda p: loss(base, p))(params)
  remat = create_dit("Tiny/2", **TINY, remat=policy)
  got_loss, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_blocks_equal_the_unrolled_model_with_gradients(remat):
  unrolled = create_dit("Tiny/2", **UNROLLED)
  params = randomize(_init(unrolled))
  inputs = _inputs(unrolled)
  scanned = create_dit("Tiny/2", **TINY, scan_blocks=True, remat=remat)
  stacked = dit_lib.block_layout(params, scan_blocks=True)
  assert jax.tree.structure(stacked) == jax.tree.structure(nn.unbox(_init(scanned)))
  assert stacked["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 64, 3, 4, 16)  # (depth, D, 3, H, Dh)
  loss = lambda model: lambda p: jnp.mean(model.apply({"params": p}, *inputs) ** 2)
  ref_loss, ref_grads = jax.value_and_grad(loss(unrolled))(params)
  got_loss, got_grads = jax.jit(jax.value_and_grad(loss(scanned)))(stacked)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)
  got_grads = dit_lib.block_layout(got_grads, scan_blocks=False)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  spec = nn.get_partition_spec(scanned.init(jax.random.key(0), *inputs)["params"])
  assert spec["blocks"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("layers", "embed", "mlp")


def test_rope_model_runs_on_other_grid_sizes_and_aspect_ratios():
  model = create_dit("Tiny/2", **TINY, pos_embed="rope")
  params = randomize(_init(model))
  assert "pos_embed" not in params
  for hw in ((8, 16), (16, 8), (12, 12)):
    out = model.apply({"params": params}, *_inputs(model, batch=2, hw=hw))
    assert out.shape == (2, *hw, 8) and np.all(np.isfinite(out))


def test_every_parameter_has_logical_axis_names():
  model = create_dit("Tiny/2", **UNROLLED, qk_norm=True)
  boxed = model.init(jax.random.key(0), *model.dummy_inputs())["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) and len(v.names) == v.value.ndim for v in leaves)
  specs = nn.get_partition_spec(boxed)
  assert specs["blocks_0"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec("embed", None, "heads", "kv")


@pytest.mark.parametrize("name", ["S/2", "XL/2", "L/8"])
def test_full_size_variants_by_shape_only(name):
  model = create_dit(name)
  x, t, y = model.dummy_inputs(batch_size=2)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, t, y)[0])
  assert out.shape == (2, 32, 32, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="XXL/2"), "unknown DiT variant"),
    (dict(variant="S/3"), "unknown DiT variant"),
    (dict(variant="S/8", input_size=12), "patch_size=8 must divide input_size=12"),
    (dict(variant="S/2", attention_backend="flash"), "attention_backend must be one of"),
    (dict(variant="S/2", num_heads=5), "num_heads=5 must divide hidden_size=384"),
    (dict(variant="S/2", pos_embed="learned"), "pos_embed must be one of"),
    (dict(variant="S/2", remat="some"), "remat must be one of"),
])
def test_bad_configuration_gets_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    create_dit(kwargs.pop("variant"), **kwargs)


def test_bad_input_gets_a_clear_error():
  model = create_dit("Tiny/4", **TINY)
  params = _init(model)
  with pytest.raises(ValueError, match="must divide the input height and width"):
    model.apply({"params": params}, jnp.zeros((1, 10, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="in_channels=4"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="y \\(class labels\\) is required"):
    model.apply({"params": params}, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)))
