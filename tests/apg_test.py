"""Adaptive projected guidance against diffusers' normalized_guidance and MomentumBuffer, call by call, and its
momentum carried through a sampler's loop."""
import jax.numpy as jnp
import numpy as np
import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from jdit.diffusion import flow, guidance, samplers

OPTIONS = dict(eta=0.3, norm_threshold=2.0, momentum=-0.5)


def test_apg_matches_diffusers_call_by_call():
  rng = np.random.default_rng(0)
  buffer, average = MomentumBuffer(OPTIONS["momentum"]), jnp.zeros((2, 4, 4, 3))
  for _ in range(3):
    cond, uncond = rng.standard_normal((2, 2, 4, 4, 3)).astype(np.float32)
    expected = normalized_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), 4.0, buffer,
                                   eta=OPTIONS["eta"], norm_threshold=OPTIONS["norm_threshold"])
    got, average = guidance.apg(jnp.asarray(cond), jnp.asarray(uncond), 4.0, average, **OPTIONS)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-5, atol=1e-6)


def toy_model(x, t, cond):
  """A linear 'model' whose prediction depends on the input, the time and the conditioning (a scalar per row)."""
  return 0.7 * x + 0.001 * t[:, None, None, None] * cond["c"][:, None, None, None]


def test_the_momentum_is_carried_through_the_samplers_calls():
  cond, null = {"c": jnp.array([1.0, -2.0])}, {"c": jnp.zeros(2)}
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3, 2)), jnp.float32)
  times = flow.sampling_times(4, 1.0)
  got = samplers.heun_sample(guidance.adaptive_projected_guidance(toy_model, cond, null, 3.0, **OPTIONS), x, times)
  buffer = MomentumBuffer(OPTIONS["momentum"])

  def reference(x, t):  # diffusers' guider on the same two halves, one buffer for the whole run
    t = np.full((2,), t * 1000.0, np.float32)
    cond_out, null_out = (torch.from_numpy(np.array(toy_model(x, t, c))) for c in (cond, null))
    return normalized_guidance(cond_out, null_out, 3.0, buffer, eta=OPTIONS["eta"],
                               norm_threshold=OPTIONS["norm_threshold"]).numpy()

  x = np.asarray(x)
  for t, t_next in zip(times[:-1], times[1:]):  # Heun: two guided calls per step, in the sampler's order
    v = reference(x, t)
    v_next = reference(x + (t_next - t) * v, t_next)
    x = x + (t_next - t) * 0.5 * (v + v_next)
  np.testing.assert_allclose(np.asarray(got), x, rtol=1e-5, atol=1e-5)
