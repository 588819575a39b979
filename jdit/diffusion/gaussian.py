"""Gaussian diffusion exactly as the official DiT (ADM's), written as small pure functions.

Notation: a process of T steps with betas b_t, alphas a_t = 1 - b_t, abar_t = prod_{s<=t} a_s. Data x0, noise eps,
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
A respaced process ("250", "ddim50", "10,20,30") keeps a subset S of the base steps with betas
    b'_i = 1 - abar_{S_i} / abar_{S_{i-1}}  (abar_{S_{-1}} = 1),
and the model sees the base timestep S_i (`timestep_map`). Schedules are float64 numpy; values are gathered per
timestep and cast to float32, like the official code. Arrays are channels-last: learned variance channels are
the second half of the last axis.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jdit.diffusion import weighting

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("learned_range", "fixed_small", "fixed_large")
NOISE_SCHEDULES = ("linear", "cosine")


# ----------------------------------------------------------------------------------------------
#                                     Schedules and respacing
# ----------------------------------------------------------------------------------------------

def linear_betas(num_steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
  """Linear betas from start to end, rescaled by 1000 / num_steps (the ADM convention)."""
  scale = 1000 / num_steps
  return np.linspace(scale * start, scale * end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
  """b_i = min(1 - f((i+1)/T) / f(i/T), max_beta), f(s) = cos((s + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal)."""
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)])


def space_timesteps(num_steps: int, spacing: str) -> list[int]:
  """Kept base steps, sorted. "ddimN": the stride s with len(range(0, T, s)) = N; "a,b,c": the T steps split
  into equal sections taking a, b, c evenly spaced steps (rounded); "" keeps all."""
  if not spacing:
    return list(range(num_steps))
  if spacing.startswith("ddim"):
    desired = int(spacing[len("ddim"):])
    for stride in range(1, num_steps):
      if len(range(0, num_steps, stride)) == desired:
        return list(range(0, num_steps, stride))
    raise ValueError(f"timestep_respacing={spacing!r}: no integer stride gives {desired} of {num_steps} steps")
  counts = [int(c) for c in spacing.split(",")]
  size_per, extra = divmod(num_steps, len(counts))
  steps, start = [], 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"timestep_respacing={spacing!r}: cannot take {count} steps from a section of {size}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    steps += [start + round(stride * j) for j in range(count)]
    start += size
  return sorted(set(steps))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A (possibly respaced) Gaussian process: its betas and the base timestep of each of its steps."""
  betas: np.ndarray
  timestep_map: np.ndarray

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @property
  def snr(self) -> np.ndarray:
    """The signal-to-noise ratio abar / (1 - abar) of each step (in float64: 1 - abar cancels near t = 0)."""
    return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self) -> np.ndarray:
    """Var of q(x_{t-1} | x_t, x0) = b_t (1 - abar_{t-1}) / (1 - abar_t)."""
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_log_variance_clipped(self) -> np.ndarray:
    """log of the posterior variance with its t = 0 entry (zero) replaced by the t = 1 one."""
    var = self.posterior_variance
    return np.log(np.append(var[1], var[1:]))


def make_schedule(name: str = "linear", num_steps: int = 1000, respacing: str = "") -> Schedule:
  """The base schedule `name` (linear | cosine) of num_steps, respaced by `respacing` ("" keeps all)."""
  if name == "linear":
    betas = linear_betas(num_steps)
  elif name == "cosine":
    betas = cosine_betas(num_steps)
  else:
    raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {name!r}")
  keep = space_timesteps(num_steps, respacing)
  abar = np.cumprod(1.0 - betas)[keep]
  new_betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return Schedule(betas=new_betas, timestep_map=np.array(keep, dtype=np.int32))


def gather(values: np.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """values[t] as float32 with shape (B, 1, ..., 1) broadcasting against an array of rank ndim."""
  out = jnp.asarray(values, jnp.float32)[t]
  return out.reshape(out.shape + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------
#                                 Forward process and posterior
# ----------------------------------------------------------------------------------------------

def q_sample(s: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  return (gather(np.sqrt(s.alphas_cumprod), t, x0.ndim) * x0
          + gather(np.sqrt(1.0 - s.alphas_cumprod), t, x0.ndim) * noise)


def q_posterior(s: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0):
  mean = b_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(a_t) / (1 - abar_t) x_t."""
  abar, abar_prev = s.alphas_cumprod, s.alphas_cumprod_prev
  coef_x0 = s.betas * np.sqrt(abar_prev) / (1.0 - abar)
  coef_xt = (1.0 - abar_prev) * np.sqrt(1.0 - s.betas) / (1.0 - abar)
  mean = gather(coef_x0, t, x_t.ndim) * x0 + gather(coef_xt, t, x_t.ndim) * x_t
  return mean, gather(s.posterior_variance, t, x_t.ndim), gather(s.posterior_log_variance_clipped, t, x_t.ndim)


def predict_x0(s: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, output: jnp.ndarray, prediction: str) -> jnp.ndarray:
  """x0 from the model's prediction: eps -> sqrt(1/abar) x_t - sqrt(1/abar - 1) eps; v -> sqrt(abar) x_t -
  sqrt(1 - abar) v; x0 -> itself."""
  abar = s.alphas_cumprod
  if prediction == "eps":
    return gather(np.sqrt(1.0 / abar), t, x_t.ndim) * x_t - gather(np.sqrt(1.0 / abar - 1), t, x_t.ndim) * output
  if prediction == "v":
    return gather(np.sqrt(abar), t, x_t.ndim) * x_t - gather(np.sqrt(1.0 - abar), t, x_t.ndim) * output
  if prediction == "x0":
    return output
  raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_from_x0(s: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, x0: jnp.ndarray) -> jnp.ndarray:
  """eps = (sqrt(1/abar) x_t - x0) / sqrt(1/abar - 1)."""
  abar = s.alphas_cumprod
  return ((gather(np.sqrt(1.0 / abar), t, x_t.ndim) * x_t - x0)
          / gather(np.sqrt(1.0 / abar - 1), t, x_t.ndim))


def v_target(s: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho)."""
  return (gather(np.sqrt(s.alphas_cumprod), t, x0.ndim) * noise
          - gather(np.sqrt(1.0 - s.alphas_cumprod), t, x0.ndim) * x0)


def implied_x0_v(s: Schedule, x_t: jnp.ndarray, t: jnp.ndarray, pred: jnp.ndarray, prediction: str):
  """(x0, v) implied by a prediction (eps, x0 or v) at x_t: x0 = predict_x0; v = pred itself (v), else
  v_target(x0, eps) with eps = pred (eps) or eps_from_x0 (x0)."""
  x0 = predict_x0(s, x_t, t, pred, prediction)
  if prediction == "v":
    return x0, pred
  eps = pred if prediction == "eps" else eps_from_x0(s, x_t, t, x0)
  return x0, v_target(s, x0, t, eps)


def split_output(output: jnp.ndarray, variance: str):
  """(prediction, variance channels or None): learned_range models output twice the data channels."""
  if variance == "learned_range":
    return jnp.split(output, 2, axis=-1)
  if variance in VARIANCES:
    return output, None
  raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")


def p_mean_variance(s: Schedule, output: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray, *,
                    prediction: str = "eps", variance: str = "learned_range", clip_denoised: bool = False):
  """Mean, log-variance and predicted x0 of p(x_{t-1} | x_t).

  learned_range: log var = f log b_t + (1 - f) log var~_t with f = (v + 1) / 2 for the variance channels v;
  fixed_small: the posterior variance; fixed_large: b_t (with the posterior variance at t = 0).
  The mean is the posterior mean at the predicted x0 (clipped to [-1, 1] if clip_denoised).
  """
  pred, var_values = split_output(output, variance)
  if variance == "learned_range":
    frac = (var_values + 1) / 2
    log_var = (frac * gather(np.log(s.betas), t, x_t.ndim)
               + (1 - frac) * gather(s.posterior_log_variance_clipped, t, x_t.ndim))
  elif variance == "fixed_small":
    log_var = jnp.broadcast_to(gather(s.posterior_log_variance_clipped, t, x_t.ndim), x_t.shape)
  else:
    log_var = jnp.broadcast_to(gather(np.log(np.append(s.posterior_variance[1], s.betas[1:])), t, x_t.ndim),
                               x_t.shape)
  x0 = predict_x0(s, x_t, t, pred, prediction)
  if clip_denoised:
    x0 = jnp.clip(x0, -1, 1)
  mean, _, _ = q_posterior(s, x0, x_t, t)
  return mean, log_var, x0


# ----------------------------------------------------------------------------------------------
#                                            Losses
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jnp.ndarray) -> jnp.ndarray:
  """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as ADM."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jnp.ndarray, mean: jnp.ndarray, log_scale: jnp.ndarray) -> jnp.ndarray:
  """log P(x) for data in [-1, 1] quantized to 256 bins of width 2/255, edge bins open-ended; elementwise nats."""
  inv_std = jnp.exp(-log_scale)
  cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + 1.0 / 255))
  cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - 1.0 / 255))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x: jnp.ndarray) -> jnp.ndarray:
  return x.reshape(x.shape[0], -1).mean(axis=1)


def loss_terms(s: Schedule, output: jnp.ndarray, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray, *,
               prediction: str = "eps", variance: str = "learned_range", loss: str = "mse", huber_c: float = 0.1,
               weight: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
  """Per-example terms of the hybrid loss, for a model `output` at x_t = q_sample(x0, t, noise):
  mse (or huber) = mean loss of the prediction against its target (eps, x0 or v; weighting.regression); vb
  (learned_range only) = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits, or -log2 p(x0|x1) at t = 0, with a
  stop-gradient on the predicted mean, so vb trains only the variance; loss = weight * mse + vb."""
  x_t = q_sample(s, x0, t, noise)
  pred, var_values = split_output(output, variance)
  target = {"eps": noise, "x0": x0, "v": v_target(s, x0, t, noise)}[prediction]
  terms = {loss: weighting.regression(pred, target, loss, huber_c)}
  if variance == "learned_range":
    frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
    mean, log_var, _ = p_mean_variance(s, frozen, x_t, t, prediction=prediction, variance=variance)
    true_mean, _, true_log_var = q_posterior(s, x0, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    terms["vb"] = jnp.where(t == 0, nll, kl)
  terms["loss"] = (terms[loss] if weight is None else weight * terms[loss]) + terms.get("vb", 0.0)
  return terms
