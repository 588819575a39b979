"""Prediction stability: the x0 / v each parameterization implies are exact (round trips, true targets), the
numbers are zero for an oracle that returns the true target at every step and grow with noise injected into it
per step; the validation pass logs them (validation_test checks them by hand; main_test on 1 vs 2 hosts and
across a resume)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_test import tiny_config

from jdit import sharding, validation
from jdit.diffusion import flow, gaussian, objective
from jdit.eval import prediction_stability, stability
from jdit.models import family

FLOW = {"diffusion.kind": "flow", "diffusion.sampler": "euler", "diffusion.variance": "fixed_small",
        "model.learn_sigma": False}


def test_implied_x0_and_v_are_exact_for_every_parameterization():
  x0, eps, output = (np.asarray(jax.random.normal(k, (6, 4, 4, 2)), np.float64)
                     for k in jax.random.split(jax.random.key(0), 3))
  schedule, t = gaussian.make_schedule("linear", 1000), np.array([0, 10, 250, 500, 750, 999])
  a, s = (np.sqrt(v)[t].reshape(-1, 1, 1, 1) for v in (schedule.alphas_cumprod, 1 - schedule.alphas_cumprod))
  x_t, v = a * x0 + s * eps, a * eps - s * x0
  for prediction, target in (("eps", eps), ("x0", x0), ("v", v)):
    implied = gaussian.implied_x0_v(schedule, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(target), prediction)
    np.testing.assert_allclose(implied[0], x0, atol=2e-4, err_msg=prediction)  # the true target: the true x0, v
    np.testing.assert_allclose(implied[1], v, atol=2e-4, err_msg=prediction)
    x0_hat, v_hat = (np.asarray(value, np.float64) for value in gaussian.implied_x0_v(
        schedule, jnp.asarray(x_t), jnp.asarray(t), jnp.asarray(output), prediction))
    back = {"eps": a * v_hat + s * x_t, "x0": x0_hat, "v": v_hat}[prediction]  # x_t = a x0 + s eps, v = a eps - s x0
    np.testing.assert_allclose(back, output, atol=2e-4, err_msg=prediction)
    np.testing.assert_allclose(a * x_t - s * v_hat, x0_hat, atol=2e-5, err_msg=prediction)
  times = np.array([0.01, 0.2, 0.5, 0.8, 0.99, 1.0]).reshape(-1, 1, 1, 1)
  x_t = (1 - times) * x0 + times * eps
  np.testing.assert_allclose(flow.implied_x0(jnp.asarray(x_t), jnp.asarray(times[:, 0, 0, 0]), jnp.asarray(eps - x0)),
                             x0, atol=1e-5)
  x0_hat = np.asarray(flow.implied_x0(jnp.asarray(x_t), jnp.asarray(times[:, 0, 0, 0]), jnp.asarray(output)))
  np.testing.assert_allclose((x_t - x0_hat) / times, output, atol=1e-4)  # the velocity it implies back


def oracle(config, sigma: float):
  """family.apply of a model that knows the held-out set: it finds the example (x0_i, eps_i) whose path passes
  through x_t and returns the true target there, plus sigma times noise drawn afresh for each step."""
  x0 = jnp.asarray(validation.held_out(config)["image"])
  eps = jnp.asarray(validation.fixed_noise(config.eval.val_seed, len(x0), x0.shape[1:]))
  cfg, schedule = config.diffusion, gaussian.make_schedule("linear", 1000)

  def apply(model, params, x, time, cond, **_):
    column = lambda values: values.reshape(-1, 1, 1, 1, 1)  # noqa: E731  (B, 1, 1, 1, 1) against (B, N, H, W, C)
    if cfg.kind == "flow":
      a, s = column(1 - time / cfg.time_scale), column(time / cfg.time_scale)
    else:
      steps = time.astype(jnp.int32)
      a, s = (column(jnp.sqrt(jnp.asarray(v, jnp.float32))[steps])
              for v in (schedule.alphas_cumprod, 1 - schedule.alphas_cumprod))
    index = jnp.argmin(jnp.sum((x[:, None] - a * x0[None] - s * eps[None]) ** 2, axis=(2, 3, 4)), axis=1)
    true_x0, true_eps = x0[index], eps[index]
    if cfg.kind == "flow":
      target = true_eps - true_x0
    else:
      target = {"eps": true_eps, "x0": true_x0, "v": a[:, 0] * true_eps - s[:, 0] * true_x0}[cfg.prediction]
    key = jax.random.fold_in(jax.random.key(7), jnp.round(time[0]).astype(jnp.uint32))  # one draw per step
    target = target + sigma * jax.random.normal(key, target.shape)
    return jnp.concatenate([target, jnp.zeros_like(target)], -1) if model.learn_sigma else target

  return apply


@pytest.mark.parametrize("overrides", [FLOW, {"diffusion.prediction": "eps"}, {"diffusion.prediction": "v"}],
                         ids=["flow", "eps", "v"])
def test_zero_for_an_oracle_and_growing_with_injected_noise(overrides, monkeypatch):
  config = tiny_config(**overrides, **{"eval.val_num_samples": 16, "eval.val_timesteps": 6})
  model = family.create(config.model)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  names = ("x0_variance", "x0_change", "x0_error", "v_error")
  results = []
  for sigma in (0.0, 0.05, 0.2):
    monkeypatch.setattr(objective.family, "apply", oracle(config, sigma))
    results.append(prediction_stability(config, model, {}, mesh))
  for name in names:
    assert results[0][name] < 1e-9 and results[0][name + "_p90"] < 1e-9, (name, results[0][name])
    assert 1e-6 < results[1][name] < results[2][name], (name, results[1][name], results[2][name])
  if overrides.get("diffusion.prediction") != "eps":  # the model predicts v itself: its error is the noise's
    assert [result["v_error"] for result in results[1:]] == pytest.approx([0.05 ** 2, 0.2 ** 2], rel=0.1)
  steps = stability.per_step(results[2], "x0_error")
  assert len(steps) == 6 and all(value > 0 for value in steps.values())


def test_table_and_curve_image_show_every_step():
  numbers = {"loss": 0.5, **{f"{name}{suffix}": 0.1 for name in validation.PER_EXAMPLE for suffix in ("", "_p50",
                                                                                                       "_p90")}}
  for k, step in enumerate(("0062", "0312", "0562", "0812")):
    numbers |= {f"loss_t{step}": 0.3 + k, f"x0_error_t{step}": 10.0 ** -k, f"v_error_t{step}": 10.0 ** k}
  text = stability.table({f"val/{name}": value for name, value in numbers.items()})
  assert text.splitlines()[1].split() == ["0062", "0.3", "1", "1"] and "x0_variance" in text
  image = stability.curve_image(numbers)
  assert image.shape == (300, 480, 3) and image.dtype == np.uint8
  for color in stability.CURVES.values():
    assert (image == color).all(axis=-1).sum() > 100, color  # each curve drawn
