"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2: multistep, second order, data prediction), as
an ODE and as its SDE variant (2M SDE, the midpoint form of k-diffusion and diffusers), for Gaussian diffusion
(eps, v or x0 models) and rectified flow (velocity models).

With x_t = alpha_t x0 + sigma_t eps, lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1}, r_i = h_{i-1} / h_i
and the model's x0 prediction m_i at step i:
    D_i = m_i + (m_i - m_{i-1}) / (2 r_i)                       (D_i = m_i at the first and the last step)
    ODE: x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} expm1(-h_{i+1}) D_i
    SDE: x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h} x_i - alpha_{i+1} expm1(-2h) D_i + sigma_{i+1} sqrt(-expm1(-2h)) z
The last step goes to sigma = 0 (x = D); a flow run starts at t = 1 (alpha = 0), where e^{-h} = 0. The
coefficients are computed once in float64 on the host; the loop is one `lax.scan` with one model call per step.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import gaussian, guidance
from jdit.diffusion.gaussian import Schedule

SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde")


def coefficients(alphas, sigmas, sde: bool, first_order_final: int = 1) -> np.ndarray:
  """(steps, 4) float64 [x scale, D scale, noise scale, 1 / (2 r)] of the steps between consecutive
  (alpha, sigma) pairs, the last pair having sigma = 0; the first step and the last `first_order_final` are first
  order."""
  alphas, sigmas = np.asarray(alphas, np.float64), np.asarray(sigmas, np.float64)
  with np.errstate(divide="ignore"):
    lambdas = np.log(alphas) - np.log(sigmas)  # -inf at alpha = 0, +inf at sigma = 0
  steps = len(alphas) - 1
  exp_neg_h = alphas[:-1] * sigmas[1:] / (alphas[1:] * sigmas[:-1])  # e^{-h} without infinities
  ratio = sigmas[1:] / sigmas[:-1]
  if sde:
    x_scale, d_scale = ratio * exp_neg_h, alphas[1:] * (1 - exp_neg_h ** 2)
    noise_scale = sigmas[1:] * np.sqrt(1 - exp_neg_h ** 2)
  else:
    x_scale, d_scale, noise_scale = ratio, alphas[1:] * (1 - exp_neg_h), np.zeros(steps)
  h = lambdas[1:] - lambdas[:-1]
  correction = np.zeros(steps)
  for i in range(1, steps - first_order_final):  # first order at the first step (no history) and the last (h = inf)
    correction[i] = h[i] / (2 * h[i - 1])  # 1 / (2 r); 0 when the previous step started at alpha = 0
  return np.stack([x_scale, d_scale, noise_scale, correction], axis=1)


def _loop(denoise: Callable, state, x: jnp.ndarray, coefs: np.ndarray, rng: jax.Array, sde: bool) -> jnp.ndarray:
  """denoise(x, i, state) -> (the x0 prediction at step i, state), from the guidance `state`; coefs from
  `coefficients`; the SDE draws one noise per step."""
  steps = len(coefs)

  def body(carry, inputs):
    x, previous, state = carry
    i, (x_scale, d_scale, noise_scale, correction), key = inputs
    m, state = denoise(x, i, state)
    d = m + correction * (m - previous)
    x = x_scale * x + d_scale * d
    if sde:
      x = x + noise_scale * jax.random.normal(key, x.shape, x.dtype)
    return (x, m, state), None

  inputs = (jnp.arange(steps), jnp.asarray(coefs, jnp.float32), jax.random.split(rng, steps))
  (x, _, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x), state), inputs)
  return x


def gaussian_sample(model_fn, s: Schedule, x: jnp.ndarray, rng: jax.Array, *, sde: bool = False,
                    prediction: str = "eps", variance: str = "learned_range", clip_denoised: bool = False,
                    first_order_final: int = 2):
  """DPM-Solver++(2M) through every step of `s` (respaced, e.g. "ddim20": one model call each), then to x0.

  By default the step into t = 0 is first order too (diffusers' solver takes second order there; 1 gives its rule):
  on a uniform grid in t that step's log-SNR step is ~5x the previous one, and the extrapolation 1 / (2 r) ~ 2.2
  overshoots (on the exact denoiser of a 2-D Gaussian mixture, class covariances were 0.13 off at 20 steps with
  it, 0.02 without)."""
  indices = np.arange(s.num_steps)[::-1].astype(np.int32)
  abar = np.append(np.asarray(s.alphas_cumprod, np.float64)[indices], 1.0)
  coefs = coefficients(np.sqrt(abar), np.sqrt(1 - abar), sde, first_order_final)
  model_times, batch = jnp.asarray(s.timestep_map[indices], jnp.float32), x.shape[0]
  fn = guidance.stateful(model_fn)

  def denoise(x, i, state):
    t = jnp.full((batch,), jnp.asarray(indices)[i], jnp.int32)
    output, state = fn.step(x, jnp.full((batch,), model_times[i]), state)
    return gaussian.p_mean_variance(s, output, x, t, prediction=prediction, variance=variance,
                                    clip_denoised=clip_denoised)[2], state

  return _loop(denoise, fn.init(x), x, coefs, rng, sde)


def flow_sample(model_fn, x: jnp.ndarray, times: np.ndarray, rng: jax.Array, *, sde: bool = False,
                time_scale: float = 1000.0):
  """DPM-Solver++(2M) along `times` (1 -> 0, flow.sampling_times) for x_t = (1 - t) x0 + t eps and a velocity
  model v = eps - x0 (x0 = x - t v)."""
  times = np.asarray(times, np.float64)
  coefs = coefficients(1.0 - times, times, sde)
  model_times, batch = jnp.asarray(times[:-1], jnp.float32), x.shape[0]
  fn = guidance.stateful(model_fn)

  def denoise(x, i, state):
    t = model_times[i]
    velocity, state = fn.step(x, jnp.full((batch,), t * time_scale), state)
    return x - t * velocity, state

  return _loop(denoise, fn.init(x), x, coefs, rng, sde)
