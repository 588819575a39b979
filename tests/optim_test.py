"""The optimizer of config.optimizer: schedules against their closed forms, gradient accumulation against one
larger batch (on a sharded batch), and factored optimizer state placed from the model's logical names."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from train_test import tiny_config

from jdit import optim, sharding, train
from jdit.models import family


def opt_config(**changes) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(tiny_config().optimizer.to_dict(), **changes))


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedules_warm_up_then_decay_to_the_final_rate(name):
  schedule = optim.learning_rate_schedule(opt_config(learning_rate=2.0, warmup_steps=10, schedule=name,
                                                     final_learning_rate=0.5), total_steps=110)
  decayed = {"constant": lambda s: 2.0, "linear": lambda s: 2.0 - 1.5 * s / 100,
             "cosine": lambda s: 0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * s / 100))}[name]
  for step in (0, 4, 10, 35, 80, 110, 150):
    expected = 2.0 * step / 10 if step < 10 else decayed(min(step - 10, 100))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-7), step


def quadratic_loss(params, batch, rng):
  """A loss whose gradient depends on every row; `draw` shows the rng each micro-batch got."""
  residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return jnp.mean(residual ** 2), {"draw": jax.random.uniform(rng)}


def test_accumulated_micro_batches_equal_one_large_batch_on_a_sharded_batch():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  batch = sharding.global_batch({"x": rng.standard_normal((32, 3)).astype(np.float32),
                                 "y": rng.standard_normal((32, 2)).astype(np.float32)}, mesh)
  tx, schedule = optim.make_optimizer(opt_config(name="lion", b2=0.99, learning_rate=1e-2), 10)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           ema_params=params)
  step = lambda k: jax.jit(lambda s, b: train.train_step(s, b, jax.random.key(1), loss_fn=quadratic_loss, tx=tx,
                                                         schedule=schedule, ema_decay=0.9, grad_accum_steps=k))
  with jax.set_mesh(mesh):
    (one, one_metrics), (four, four_metrics) = step(1)(state, batch), step(4)(state, batch)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(one_metrics["grad_norm"]), float(four_metrics["grad_norm"]), rtol=1e-6)
  key = jax.random.fold_in(jax.random.key(1), 0)  # the step's key; micro-batch i draws with fold_in(key, i)
  draws = [float(jax.random.uniform(jax.random.fold_in(key, i))) for i in range(4)]
  assert float(four_metrics["draw"]) == pytest.approx(np.mean(draws), rel=1e-6)  # each its own noise
  micro = optim.micro_batches({"x": np.arange(8)}, 4)["x"]
  np.testing.assert_array_equal(micro, [[0, 4], [1, 5], [2, 6], [3, 7]])  # strided: each device's rows split


def test_factored_optimizer_state_is_placed_from_the_logical_names():
  config = tiny_config(**{"optimizer.name": "adafactor"})
  model = family.create(config.model)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  _, shardings = train.sharded_init(model, tx, mesh, sharding.rules(config.axis_rules))
  factored = [s for s in jax.tree.leaves(shardings.opt_state) if s.spec == jax.sharding.PartitionSpec()]
  kernel = shardings.params["blocks"]["mlp"]["fc1"]["kernel"]
  assert factored and kernel.spec != jax.sharding.PartitionSpec()  # rows / columns replicated, kernels sharded
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("changes,message", [
    ({"grad_accum_steps": 3}, "grad_accum_steps=3: batch_size=16 must split into 3 micro-batches divisible by"),
    ({"optimizer.name": "sgd"}, "optimizer.name='sgd': expected one of 'adamw', 'lion', 'adafactor'"),
    ({"optimizer.schedule": "step"}, "optimizer.schedule='step': expected one of 'constant', 'cosine', 'linear'"),
])
def test_optimizer_fields_are_checked(changes, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**changes), str(tmp_path))
