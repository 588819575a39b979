"""Where training spends its effort: the density of training times, the weight of each example's loss, and the
per-element loss itself, for both objectives (Gaussian diffusion and rectified flow).

    u = time_density(rng, batch, "mode", mode_scale=1.29)     # in [0, 1): diffusers' SD3 densities
    w = min_snr(snr, gamma=5.0, prediction="eps")              # Hang et al. 2023 (snr: gaussian.Schedule.snr)
    w = flow_weight(sigmas, "cosmap")                          # diffusers' compute_loss_weighting_for_sd3
    per_example = regression(prediction, target, "huber", c)   # mean over each example's elements
The densities and weights are the formulas of diffusers' training_utils (compute_snr,
compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3) and the SD3 paper (Esser et al. 2024).
"""
import math

import jax
import jax.numpy as jnp

DENSITIES = ("uniform", "logit_normal", "mode")  # diffusion.timestep_sampling
WEIGHTINGS = {"none": ("gaussian", "flow"), "min_snr": ("gaussian",), "sigma_sqrt": ("flow",),
              "cosmap": ("flow",)}  # diffusion.loss_weighting: the objectives each applies to
LOSSES = ("mse", "huber")  # diffusion.loss


def density_of(draw: jnp.ndarray, scheme: str, loc: float = 0.0, scale: float = 1.0,
               mode_scale: float = 1.29) -> jnp.ndarray:
  """Times in [0, 1] from a draw: a standard normal draw for logit_normal (sigmoid(loc + scale n)), a uniform one
  for uniform and mode (1 - u - mode_scale (cos^2(pi u / 2) - 1 + u), the SD3 paper's f_mode)."""
  if scheme == "logit_normal":
    return jax.nn.sigmoid(loc + scale * draw)
  if scheme == "mode":
    return 1.0 - draw - mode_scale * (jnp.cos(math.pi * draw / 2.0) ** 2 - 1.0 + draw)
  if scheme == "uniform":
    return draw
  raise ValueError(f"diffusion.timestep_sampling must be one of {DENSITIES}, got {scheme!r}")


def time_density(rng: jax.Array, batch: int, scheme: str = "uniform", loc: float = 0.0, scale: float = 1.0,
                 mode_scale: float = 1.29) -> jnp.ndarray:
  """(batch,) training times in [0, 1] drawn with the density `scheme` (DENSITIES)."""
  draw = jax.random.normal(rng, (batch,)) if scheme == "logit_normal" else jax.random.uniform(rng, (batch,))
  return density_of(draw, scheme, loc, scale, mode_scale)


def min_snr(snr_t: jnp.ndarray, gamma: float, prediction: str) -> jnp.ndarray:
  """Min-SNR-gamma: the x0-space weight min(SNR, gamma), as a weight on the loss of the predicted target: / SNR for
  eps, / (SNR + 1) for v, as is for x0."""
  clipped = jnp.minimum(snr_t, gamma)
  return {"eps": clipped / snr_t, "v": clipped / (snr_t + 1.0), "x0": clipped}[prediction]


def flow_weight(sigmas: jnp.ndarray, scheme: str) -> jnp.ndarray:
  """The SD3 weights of a rectified flow's loss at noise levels `sigmas` (the flow time t): sigma_sqrt sigma^-2,
  cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)), none 1."""
  if scheme == "sigma_sqrt":
    return sigmas ** -2.0
  if scheme == "cosmap":
    return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
  return jnp.ones_like(sigmas)


def regression(prediction: jnp.ndarray, target: jnp.ndarray, loss: str = "mse", huber_c: float = 0.1) -> jnp.ndarray:
  """(B,) per-example mean of the elementwise loss: squared error, or the pseudo-Huber 2c (sqrt(d^2 + c^2) - c)
  (quadratic near 0, linear beyond c; as diffusers' and kohya's huber loss)."""
  diff = prediction - target
  if loss == "huber":
    elementwise = 2.0 * huber_c * (jnp.sqrt(diff ** 2 + huber_c ** 2) - huber_c)
  else:
    elementwise = diff ** 2
  return elementwise.reshape(elementwise.shape[0], -1).mean(axis=1)


def check(cfg) -> None:
  """One-line errors for a weighting, density or loss that does not exist or does not apply to cfg.kind."""
  weighting = cfg.get("loss_weighting", "none")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"diffusion.loss_weighting must be one of {tuple(WEIGHTINGS)}, got {weighting!r}")
  if cfg.kind not in WEIGHTINGS[weighting]:
    raise ValueError(f"diffusion.loss_weighting={weighting!r} applies to kind={WEIGHTINGS[weighting][0]!r}, not "
                     f"kind={cfg.kind!r}")
  if cfg.get("loss", "mse") not in LOSSES:
    raise ValueError(f"diffusion.loss must be one of {LOSSES}, got {cfg.loss!r}")
  if cfg.timestep_sampling not in DENSITIES:
    raise ValueError(f"diffusion.timestep_sampling must be one of {DENSITIES}, got {cfg.timestep_sampling!r}")
