"""The validation loss: a fixed held-out set, fixed timesteps and fixed noise give the same numbers from a fresh
reader, on any mesh (and, in main_test, on 1 or 2 hosts), equal to the flow loss written out by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from train_test import tiny_config

from jdit import sharding, validation
from jdit.models import family

FLOW = {"diffusion.kind": "flow", "diffusion.sampler": "euler", "diffusion.variance": "fixed_small",
        "model.learn_sigma": False, "eval.val_num_samples": 16, "eval.val_timesteps": 4}


def test_the_validation_loss_is_fixed_mesh_independent_and_the_flow_loss():
  config = tiny_config(**FLOW)
  model = family.create(config.model)
  params = randomize(jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())["params"])
  results = []
  for axes in ({"data": 8}, {"data": 1}):
    mesh = sharding.make_mesh({"fsdp": 1, "tensor": 1, **axes}, jax.devices()[:axes["data"]])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.axis_rules)):
      results.append(validation.Validation(config, model, mesh)(params))
  assert list(results[0])[:5] == ["val/loss", "val/loss_t0.1250", "val/loss_t0.3750", "val/loss_t0.6250",
                                  "val/loss_t0.8750"]
  for name, value in results[0].items():
    assert results[1][name] == pytest.approx(value, rel=1e-6), name  # 8 devices vs 1
  batch = validation.held_out(config)
  np.testing.assert_array_equal(batch["label"], np.asarray(validation.held_out(config)["label"]))  # fixed set
  x0, times = batch["image"].astype(np.float64), (0.125, 0.375, 0.625, 0.875)
  noise = validation.fixed_noise(config.eval.val_seed, 16, x0.shape[1:]).astype(np.float64)
  x_t = [(1 - t) * x0 + t * noise for t in times]
  velocity = [np.asarray(model.apply({"params": params}, jnp.asarray(x, jnp.float32), jnp.full((16,), t * 1000.0),
                                     jnp.asarray(batch["label"]))).astype(np.float64) for x, t in zip(x_t, times)]
  x0_hat = np.stack([x - t * v for x, t, v in zip(x_t, times, velocity)])  # (K, N, H, W, C)
  by_hand = {f"val/loss_t{t:.4f}": np.mean((v - (noise - x0)) ** 2) for t, v in zip(times, velocity)}
  by_hand |= {f"val/x0_error_t{t:.4f}": np.mean((x - x0) ** 2) for t, x in zip(times, x0_hat)}
  per_example = {"x0_variance": x0_hat.var(axis=0).mean(axis=(1, 2, 3)),
                 "x0_change": np.mean((x0_hat[1:] - x0_hat[:-1]) ** 2, axis=(2, 3, 4)).mean(axis=0),
                 "v_error": np.mean([np.mean((v - (noise - x0)) ** 2, axis=(1, 2, 3)) for v in velocity], axis=0)}
  by_hand |= {f"val/{name}": values.mean() for name, values in per_example.items()}
  by_hand |= {f"val/{name}_p90": np.quantile(values, 0.9) for name, values in per_example.items()}
  by_hand["val/loss"] = np.mean([by_hand[f"val/loss_t{t:.4f}"] for t in times])
  for name, value in by_hand.items():
    assert results[0][name] == pytest.approx(value, rel=2e-5), name


def test_gaussian_validation_steps_and_bad_sizes():
  np.testing.assert_array_equal(validation.timesteps(tiny_config().diffusion, 8),
                                [62, 187, 312, 437, 562, 687, 812, 937])
  config = tiny_config(**{"eval.val_num_samples": 12})
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  with pytest.raises(ValueError, match="eval.val_num_samples=12 must be divisible by the data-parallel size 8"):
    validation.Validation(config, family.create(config.model), mesh)
  with pytest.raises(ValueError, match="eval.val_num_samples=5000: split .* has 1797 readable examples"):
    validation.held_out(tiny_config(**{"eval.val_num_samples": 5000}))
