"""Rectified flow / flow matching (SD3, SiT, LightningDiT style) as small pure functions.

Time t in [0, 1] runs from data (t = 0) to noise (t = 1):
    x_t = (1 - t) x0 + t eps,   velocity target v = dx_t/dt = eps - x0.
The model sees t * time_scale (1000 by default, so DiT's timestep embedder sees the usual range).
"""
import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import weighting

def interpolate(x0: jnp.ndarray, noise: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
  """x_t = (1 - t) x0 + t eps, t (B,) broadcast over the other axes."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """v = eps - x0."""
  return noise - x0


def implied_x0(x_t: jnp.ndarray, t: jnp.ndarray, velocity: jnp.ndarray) -> jnp.ndarray:
  """x0 = x_t - t v: the clean sample a velocity v implies at x_t."""
  return x_t - t.reshape(t.shape + (1,) * (x_t.ndim - 1)) * velocity


def shift_time(t, shift: float):
  """Resolution-dependent shift t' = s t / (1 + (s - 1) t) (SD3); s > 1 spends more time near noise."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(rng: jax.Array, batch: int, sampling: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                shift: float = 1.0, mode_scale: float = 1.29) -> jnp.ndarray:
  """Training times: drawn with the density `sampling` (jdit.diffusion.weighting.DENSITIES: uniform U(0, 1),
  logit-normal sigmoid(loc + scale n), SD3's mode), then shifted."""
  return shift_time(weighting.time_density(rng, batch, sampling, loc, scale, mode_scale), shift)


SCHEDULES = ("uniform", "sd3", "flux")


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, base_tokens: int = 256,
            max_tokens: int = 4096) -> float:
  """FluxPipeline's resolution-dependent shift: mu linear in the image token count, base_shift at base_tokens
  and max_shift at max_tokens (the released schedulers' values)."""
  slope = (max_shift - base_shift) / (max_tokens - base_tokens)
  return image_tokens * slope + base_shift - slope * base_tokens


def exponential_shift(t, mu: float):
  """t' = e^mu / (e^mu + (1 / t - 1)): diffusers' exponential time shift (e^mu plays SD3's s)."""
  return np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0))


def sampling_times(num_steps: int, shift: float = 1.0, schedule: str = "uniform",
                   num_train_steps: int = 1000, image_tokens: int = 0) -> np.ndarray:
  """num_steps + 1 times from 1 (noise) to 0 (data).

  uniform  evenly spaced on [1, 0], then shifted
  sd3      diffusers' FlowMatchEulerDiscreteScheduler (the SD3 pipelines): num_steps times evenly spaced from 1
           to the scheduler's smallest training sigma, shift(1 / num_train_steps), shifted, then 0
  flux     FluxPipeline's: num_steps times evenly spaced from 1 to 1 / num_steps (float32), shifted by
           exponential_shift with mu = flux_mu(image_tokens), then 0 (`shift` is not used)"""
  if schedule == "uniform":
    return shift_time(np.linspace(1.0, 0.0, num_steps + 1), shift)
  if schedule == "sd3":
    smallest = shift_time(1.0 / num_train_steps, shift)
    times = shift_time(np.linspace(1.0, smallest, num_steps), shift)
    return np.concatenate([times, [0.0]])
  if schedule == "flux":
    if image_tokens <= 0:
      raise ValueError("flow_schedule='flux' needs the image token count of the sampled latents")
    times = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    return np.concatenate([exponential_shift(times, np.float32(flux_mu(image_tokens))), [0.0]])
  raise ValueError(f"diffusion.flow_schedule must be one of {SCHEDULES}, got {schedule!r}")


def flow_loss(output: jnp.ndarray, x0: jnp.ndarray, noise: jnp.ndarray, loss: str = "mse",
              huber_c: float = 0.1) -> jnp.ndarray:
  """Per-example loss (squared error, or pseudo-Huber) between the predicted and the target velocity."""
  return weighting.regression(output, velocity_target(x0, noise), loss, huber_c)
