"""Samplers: DDPM (ancestral) and DDIM for Gaussian diffusion, Euler and Heun for rectified flow.

Each takes `model_fn(x, t) -> output`, where t (B,) is the timestep the network sees (use
`guidance.classifier_free_guidance` to build a guided one), runs its whole loop with `lax.scan`, and is
jit-able as one program: `jax.jit(lambda x, rng: ddpm_sample(fn, schedule, x, rng))`. With `progress=True` the
device reports every tenth of the run to the host.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import gaussian, guidance
from jdit.diffusion.gaussian import Schedule, gather

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def _report(step, total: int, name: str) -> None:
  print(f"{name}: step {int(step) + 1}/{total}", flush=True)


def _maybe_report(progress: bool, step, total: int, name: str) -> None:
  if progress:
    every = max(1, total // 10)
    jax.lax.cond((step + 1) % every == 0,
                 lambda: jax.debug.callback(_report, step, total, name, ordered=True), lambda: None)


def _timesteps(values, batch: int) -> jnp.ndarray:
  return jnp.full((batch,), values, jnp.float32)


# ----------------------------------------------------------------------------------------------
#                                  Gaussian diffusion: DDPM, DDIM
# ----------------------------------------------------------------------------------------------

def ddpm_step(s: Schedule, output, x, t, noise, *, prediction="eps", variance="learned_range", clip_denoised=False):
  """x_{t-1} = mean + [t > 0] exp(log_var / 2) noise, with p(x_{t-1} | x_t) from the model output."""
  mean, log_var, _ = gaussian.p_mean_variance(s, output, x, t, prediction=prediction, variance=variance,
                                              clip_denoised=clip_denoised)
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_var) * noise


def ddim_step(s: Schedule, output, x, t, noise, *, eta=0.0, prediction="eps", variance="learned_range",
              clip_denoised=False):
  """x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise,
  sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)."""
  _, _, x0 = gaussian.p_mean_variance(s, output, x, t, prediction=prediction, variance=variance,
                                      clip_denoised=clip_denoised)
  eps = gaussian.eps_from_x0(s, x, t, x0)
  abar, abar_prev = gather(s.alphas_cumprod, t, x.ndim), gather(s.alphas_cumprod_prev, t, x.ndim)
  sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
  mean = x0 * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
  nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  return mean + nonzero * sigma * noise


def _gaussian_loop(step_fn, model_fn: ModelFn, s: Schedule, x: jnp.ndarray, rng: jax.Array, progress: bool,
                   name: str) -> jnp.ndarray:
  indices = np.arange(s.num_steps)[::-1].astype(np.int32)
  model_times = s.timestep_map[indices].astype(np.float32)
  batch = x.shape[0]

  fn = guidance.stateful(model_fn)

  def body(carry, inputs):
    x, state = carry
    count, i, model_t, key = inputs
    t = jnp.full((batch,), i, jnp.int32)
    out, state = fn.step(x, _timesteps(model_t, batch), state)
    x = step_fn(s, out, x, t, jax.random.normal(key, x.shape, x.dtype))
    _maybe_report(progress, count, s.num_steps, name)
    return (x, state), None

  keys = jax.random.split(rng, s.num_steps)
  (x, _), _ = jax.lax.scan(body, (x, fn.init(x)), (jnp.arange(s.num_steps), indices, model_times, keys))
  return x


def ddpm_sample(model_fn: ModelFn, s: Schedule, x: jnp.ndarray, rng: jax.Array, *, prediction="eps",
                variance="learned_range", clip_denoised=False, progress=False) -> jnp.ndarray:
  """Ancestral sampling through every step of `s` from x = x_T (the official p_sample_loop)."""
  step = lambda *a: ddpm_step(*a, prediction=prediction, variance=variance, clip_denoised=clip_denoised)
  return _gaussian_loop(step, model_fn, s, x, rng, progress, "ddpm")


def ddim_sample(model_fn: ModelFn, s: Schedule, x: jnp.ndarray, rng: jax.Array, *, eta=0.0, prediction="eps",
                variance="learned_range", clip_denoised=False, progress=False) -> jnp.ndarray:
  """DDIM through every step of `s` (respace it, e.g. "ddim50"); eta = 0 is deterministic."""
  step = lambda *a: ddim_step(*a, eta=eta, prediction=prediction, variance=variance, clip_denoised=clip_denoised)
  return _gaussian_loop(step, model_fn, s, x, rng, progress, "ddim")


# ----------------------------------------------------------------------------------------------
#                                   Rectified flow: Euler, Heun
# ----------------------------------------------------------------------------------------------

def _flow_loop(model_fn: ModelFn, x: jnp.ndarray, times: np.ndarray, time_scale: float, heun: bool,
               progress: bool) -> jnp.ndarray:
  batch, steps = x.shape[0], len(times) - 1
  pairs = np.stack([times[:-1], times[1:]], axis=1).astype(np.float32)  # (steps, 2): (t, t_next)

  fn = guidance.stateful(model_fn)

  def body(carry, inputs):
    x, state = carry
    count, (t, t_next) = inputs
    v, state = fn.step(x, _timesteps(t * time_scale, batch), state)
    x_euler = x + (t_next - t) * v
    if heun:
      v_next, state = fn.step(x_euler, _timesteps(t_next * time_scale, batch), state)
      x_euler = x + (t_next - t) * 0.5 * (v + v_next)
    _maybe_report(progress, count, steps, "heun" if heun else "euler")
    return (x_euler, state), None

  (x, _), _ = jax.lax.scan(body, (x, fn.init(x)), (jnp.arange(steps), jnp.asarray(pairs)))
  return x


def euler_sample(model_fn: ModelFn, x: jnp.ndarray, times: np.ndarray, *, time_scale: float = 1000.0,
                 progress: bool = False) -> jnp.ndarray:
  """Euler ODE steps x <- x + (t_next - t) v(x, t) along `times` (from 1 to 0, see flow.sampling_times)."""
  return _flow_loop(model_fn, x, times, time_scale, heun=False, progress=progress)


def heun_sample(model_fn: ModelFn, x: jnp.ndarray, times: np.ndarray, *, time_scale: float = 1000.0,
                progress: bool = False) -> jnp.ndarray:
  """Heun (2nd order) steps x <- x + (t_next - t) (v(x, t) + v(x_euler, t_next)) / 2: two model calls per step."""
  return _flow_loop(model_fn, x, times, time_scale, heun=True, progress=progress)
