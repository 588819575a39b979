"""LoRA training (config.lora) on a frozen, fsdp-sharded base: only the adapters change and only they have optimizer
state; a resumed run ends bit-identical to an unbroken one; a different base is refused; a LoRA workdir samples
as its base with the EMA adapters merged, and its adapter file, tools/lora.py export and the unmerged forward give
the same weights (and the same validation numbers); data.rotate turns the images of any source."""
import functools
import os

import jax
import numpy as np
import pytest
from conftest import load_tool, randomize
from train_test import tiny_config

from jdit import checkpoint, lora, lora_base, sample, sharding, train
from jdit.data import sources
from jdit.eval import prediction_stability
from jdit.models import family

pytestmark = pytest.mark.xdist_group("lora_train")
FSDP = {"data": 2, "fsdp": 4, "tensor": 1}


def lora_config(base: str, **changes):
  c = tiny_config(init_from=base, **{"lora.rank": 2, "lora.alpha": 4.0, "lora.base_dtype": "bfloat16",
                                     "checkpoint_every": 2, **changes})
  c.mesh.update(FSDP)
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A random base checkpoint; a LoRA run of 4 steps in one go and one of 2 + 2 (resumed), on an fsdp mesh."""
  root = tmp_path_factory.mktemp("lora_runs")
  model = family.create(tiny_config().model)
  params = randomize(model.init(jax.random.key(0), *model.dummy_inputs())["params"])
  base = checkpoint.save_pretrained(str(root / "base"), model, jax.tree.map(np.asarray, params))
  straight = train.train_and_evaluate(lora_config(base, num_train_steps=4), str(root / "straight"))
  train.train_and_evaluate(lora_config(base, num_train_steps=2), str(root / "resumed"))
  resumed = train.train_and_evaluate(lora_config(base, num_train_steps=4), str(root / "resumed"))
  return dict(root=root, model=model, base=base, params=params, straight=straight, resumed=resumed)


def test_only_the_adapters_train_and_resume_is_bit_identical(runs):
  state = runs["straight"]
  expected = lora_base.cast(runs["params"], "bfloat16")
  assert jax.tree.structure(state.base) == jax.tree.structure(expected)
  assert all(np.array_equal(a, b) and a.dtype == np.dtype("bfloat16")
             for a, b in zip(jax.tree.leaves(state.base), jax.tree.leaves(expected)))  # the base, bit for bit
  kernel = state.base["blocks"]["mlp"]["fc1"]["kernel"]
  assert "fsdp" in str(kernel.sharding.spec)  # the frozen base is sharded like the model
  adapter_shapes = {a.shape for a in jax.tree.leaves(state.params)}
  assert {a.shape for a in jax.tree.leaves(state.opt_state)} <= adapter_shapes | {()}  # Adam moments: adapters only
  assert sum(a.size for a in jax.tree.leaves(state.opt_state)) < 3 * sum(a.size for a in jax.tree.leaves(state.params))
  assert np.abs(np.asarray(state.params["blocks"]["attn"]["qkv"]["b"])).max() > 0  # B moved off zero
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.ema_params)),
                  jax.tree.leaves((runs["resumed"].params, runs["resumed"].opt_state, runs["resumed"].ema_params))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_lora_workdir_samples_merged_and_exports_its_adapters(runs, tmp_path, capsys):
  state, model, workdir = runs["straight"], runs["model"], str(runs["root"] / "straight")
  spec = lora.spec_for(model, 2, 4.0)
  config = lora_config("")  # sampling finds the base the checkpoint records
  restored_model, merged = sample.restore_for_sampling(config, workdir, log=lambda _: None)
  want = lora.merge(runs["params"], state.ema_params, spec.scale)  # the float32 base, not the bf16 training copy
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  x, t, labels = model.dummy_inputs(4)
  x, cond = jax.random.normal(jax.random.key(3), x.shape), model.condition({"label": labels})
  unmerged = lora.apply(model, runs["params"], state.ema_params, spec, x, t, cond)
  np.testing.assert_allclose(family.apply(restored_model, merged, x, t, cond), unmerged, rtol=1e-5, atol=1e-6)
  with config.unlocked():
    config.eval.update(dict(val_num_samples=16, val_timesteps=4))
  mesh = sharding.make_mesh(dict(config.mesh))
  on_mesh = lambda tree: jax.device_put(tree, sharding.replicated(mesh))  # noqa: E731
  adapted = prediction_stability(config, model, on_mesh(state.params), mesh, base=on_mesh(runs["params"]),
                                 adapters=spec)  # the validation pass of a LoRA run: the trained adapters on the base
  base_only = prediction_stability(config, model, on_mesh(runs["params"]), mesh)
  for name, value in prediction_stability(config, model, on_mesh(lora.merge(runs["params"], state.params,
                                                                             spec.scale)), mesh).items():
    assert adapted[name] == pytest.approx(value, rel=1e-4, abs=1e-9), name
  assert adapted["x0_error"] != pytest.approx(base_only["x0_error"], rel=1e-6)  # the adapters count
  from_file = lora.load_lora(model, runs["params"], os.path.join(workdir, lora_base.ADAPTER_FILE))
  out = str(tmp_path / "exported.safetensors")
  assert load_tool("lora").main(["export", workdir, "--out", out]) == 0
  assert "rank 2, alpha 4" in capsys.readouterr().out
  for loaded in (from_file, lora.load_lora(model, runs["params"], out)):
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(merged)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  plain = str(tmp_path / "plain.safetensors")
  lora.save_lora(model, state.ema_params, plain)  # no spec: the arrays' rank, alpha = rank
  assert (lora.describe_file(plain)["rank"], lora.describe_file(plain)["alpha"]) == (2, 2.0)
  with pytest.raises(ValueError, match="is a LoRA run's checkpoint"):
    checkpoint.load_pretrained(os.path.join(workdir, "checkpoints"))


def test_a_different_base_is_refused_and_lora_needs_a_base(runs, tmp_path):
  model = runs["model"]
  other = checkpoint.save_pretrained(str(tmp_path / "other"), model, jax.tree.map(
      lambda a: np.asarray(a) * 1.01, runs["params"]))
  with pytest.raises(ValueError, match=r"init_from=.*other.* is not the base these adapters were trained on"):
    train.train_and_evaluate(lora_config(other, num_train_steps=6), str(runs["root"] / "straight"))
  with pytest.raises(ValueError, match="lora.base_dtype='float32': the run was trained with 'bfloat16'"):
    train.train_and_evaluate(lora_config(runs["base"], num_train_steps=6, **{"lora.base_dtype": "float32"}),
                             str(runs["root"] / "straight"))
  with pytest.raises(ValueError, match="lora.rank=2 trains adapters on a frozen base: set config.init_from"):
    train.train_and_evaluate(lora_config(""), str(tmp_path / "no_base"))
  assert not os.path.exists(tmp_path / "no_base")  # nothing left behind


def test_rotate_turns_the_images_of_any_source():
  config = tiny_config(**{"data.rotate": 180})
  source = sources.open_source(config.data)
  turned = sources.transform(config.data, source)(source[5], np.random.default_rng(0))["image"]
  config.data.rotate = 0
  upright = sources.transform(config.data, source)(source[5], np.random.default_rng(0))["image"]
  np.testing.assert_array_equal(turned, upright[::-1, ::-1])


def test_dropout_drops_the_adapters_input_while_training_only():
  model = family.create(tiny_config().model)
  x, t, labels = model.dummy_inputs(4)
  x, cond = jax.random.normal(jax.random.key(1), x.shape), model.condition({"label": labels})
  params = randomize(jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())["params"])
  adapters = randomize(jax.jit(lambda p: lora.init(model, p, lora.spec_for(model, 2), jax.random.key(2)))(params),
                       seed=3)

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def run(rate, train_mode):
    rngs = {"dropout": jax.random.key(4)} if train_mode else None
    return lora.apply(model, params, adapters, lora.spec_for(model, 2, dropout=rate), x, t, cond, train_mode, rngs)

  reference = jax.jit(lambda p: family.apply(model, lora.merge(p, adapters, 1.0), x, t, cond))(params)
  np.testing.assert_allclose(run(0.5, False), reference, rtol=1e-5, atol=1e-6)  # sampling: no dropout
  assert np.abs(run(0.5, True) - run(0.0, True)).max() > 1e-3  # training: the branch's input dropped
