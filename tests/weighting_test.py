"""Loss weighting, training-time densities and the Huber loss against diffusers' training_utils (compute_snr,
compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, the min-SNR weights of its training
scripts), and the objective's use of them."""
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import training_utils

from jdit.diffusion import flow, gaussian, objective, weighting
from jdit.models import family


def test_snr_and_min_snr_weights_match_diffusers():
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear")
  schedule = gaussian.make_schedule("linear", 1000)
  scheduler.alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
  steps = np.array([0, 1, 17, 250, 500, 999])
  reference = training_utils.compute_snr(scheduler, torch.from_numpy(steps)).double()  # in float64: 1 - abar cancels
  snr = gaussian.gather(schedule.snr, jnp.asarray(steps), 1)
  np.testing.assert_allclose(np.asarray(snr), reference.numpy(), rtol=1e-6)
  gamma = 5.0
  clipped = torch.stack([reference, gamma * torch.ones_like(reference)], dim=1).min(dim=1)[0]
  for prediction, expected in [("eps", clipped / reference), ("v", clipped / (reference + 1)), ("x0", clipped)]:
    np.testing.assert_allclose(np.asarray(weighting.min_snr(snr, gamma, prediction)), expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize("scheme", weighting.DENSITIES)
def test_time_densities_match_diffusers_on_the_same_draws(scheme, monkeypatch):
  draw = np.random.default_rng(0).standard_normal(64) if scheme == "logit_normal" else \
      np.random.default_rng(0).uniform(size=64)
  given = torch.from_numpy(draw).float()
  monkeypatch.setattr(torch, "normal", lambda mean, std, **_: mean + std * given)
  monkeypatch.setattr(torch, "rand", lambda **_: given)
  reference = training_utils.compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.3, logit_std=0.8,
                                                                   mode_scale=1.29)
  ours = weighting.density_of(jnp.asarray(draw, jnp.float32), scheme, 0.3, 0.8, 1.29)
  np.testing.assert_allclose(np.asarray(ours), reference.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_flow_weights_match_diffusers_sd3(scheme):
  sigmas = np.linspace(0.01, 1.0, 50)
  reference = training_utils.compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigmas))
  np.testing.assert_allclose(np.asarray(weighting.flow_weight(jnp.asarray(sigmas), scheme)), reference.numpy(),
                             rtol=1e-6)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
  c = 0.1
  small, large = jnp.full((1, 4), 1e-3), jnp.full((1, 4), 50.0)
  zero = jnp.zeros((1, 4))
  assert float(weighting.regression(small, zero, "huber", c)[0]) == pytest.approx(1e-6, rel=1e-3)
  assert float(weighting.regression(large, zero, "huber", c)[0]) == pytest.approx(2 * c * 50.0 - 2 * c * c, rel=1e-3)
  assert float(weighting.regression(large, zero, "mse")[0]) == pytest.approx(2500.0)


def _loss_and_time(cfg, kind_fields):
  """The objective's loss and its first metric for one example of a tiny DiT, and the time it drew."""
  cfg.update(kind_fields)
  model = family.create(dict(family.default_config("dit"), **family.tiny("dit"), learn_sigma=False,
                             num_classes=0))
  params = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())["params"]
  batch = {"image": jax.random.normal(jax.random.key(1), (1, 8, 8, 1))}
  rng = jax.random.key(2)
  loss, metrics = jax.jit(objective.make_loss_fn(model, cfg))(params, batch, rng)
  return float(loss), float(metrics[cfg.loss]), jax.random.split(rng, 3)[0]


def test_the_objective_weighs_each_example_as_configured():
  cfg = objective.default_config()
  cfg.update(dict(variance="fixed_small", guidance_scale=1.0))
  loss, regression, t_rng = _loss_and_time(cfg, dict(loss_weighting="min_snr", min_snr_gamma=2.0))
  t = jax.random.randint(t_rng, (1,), 0, 1000)
  snr = gaussian.gather(gaussian.make_schedule("linear", 1000).snr, t, 1)
  assert loss == pytest.approx(regression * float(weighting.min_snr(snr, 2.0, "eps")[0]), rel=1e-6)

  cfg = objective.default_config()
  cfg.update(dict(kind="flow", sampler="euler", variance="fixed_small", guidance_scale=1.0))
  loss, regression, t_rng = _loss_and_time(cfg, dict(loss_weighting="cosmap", loss="huber", shift=3.0,
                                                     timestep_sampling="mode"))
  t = float(flow.sample_time(t_rng, 1, "mode", shift=3.0)[0])
  assert loss == pytest.approx(regression * 2 / (math.pi * (1 - 2 * t + 2 * t * t)), rel=1e-6)


def test_weightings_that_do_not_apply_are_refused():
  cfg = objective.default_config()
  cfg.loss_weighting = "cosmap"
  with pytest.raises(ValueError, match="diffusion.loss_weighting='cosmap' applies to kind='flow', not kind='gaussian'"):
    weighting.check(cfg)
  cfg.update(dict(kind="flow", loss_weighting="min_snr"))
  with pytest.raises(ValueError, match="diffusion.loss_weighting='min_snr' applies to kind='gaussian'"):
    weighting.check(cfg)
