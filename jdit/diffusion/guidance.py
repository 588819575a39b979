"""Classifier-free guidance as one wrapper that every sampler uses.

    guided = uncond + scale * (cond - uncond)
Conditional and unconditional halves run in one batched model call; the conditioning is a dict (see
jdit.models.conditioning) and its unconditional half comes from the model family (the null class, ...). Modes:
  first3    guide only the first 3 output channels, the rest from the conditional half (official DiT: needed to
            reproduce its FIDs; with 4 latent channels the 4th eps channel stays unguided)
  all       guide every prediction channel (diffusers)
  interval  guide every prediction channel, only while the model timestep t is in [low, high]; outside it the
            unconditional half is not computed (a lax.cond: one model call of B rows instead of 2B)
  apg       adaptive projected guidance (Sadat et al. 2024, diffusers' AdaptiveProjectedGuidance): the update
            cond - uncond, averaged with momentum over the sampler's calls, clipped to a norm, split into its
            parts parallel and orthogonal to cond, the parallel part scaled by eta (high scales without
            oversaturation)
  skip_layer  skip-layer guidance (SD3.5; diffusers' skip_guidance_layers): "all" guidance, plus, while the model
            time is in a window, slg_scale (cond - cond with some blocks skipped): one more model call of B rows
Learned-variance channels (those past the input's channel count) always come from the conditional half.
Guided functions with state across a sampler's calls (APG's momentum) are `Stateful`; samplers run every model
function through `stateful`.
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

GUIDANCE_MODES = ("first3", "all", "interval", "apg", "skip_layer")


def _halves(model_fn: Callable, cond: dict, null_cond: dict) -> Callable:
  """(x, t) -> (conditional, unconditional) predictions of model_fn(x, t, cond), from one batched call of 2B rows
  (conditional first)."""
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)

  def halves(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return tuple(jnp.split(model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both), 2, axis=0))

  return halves


class Stateful(NamedTuple):
  """A model function with state across a sampler's calls: init(x) -> state; step(x, t, state) -> (out, state)."""
  init: Callable
  step: Callable


def stateful(model_fn) -> Stateful:
  """`model_fn` as a Stateful (a plain model_fn(x, t) gets an empty state)."""
  if isinstance(model_fn, Stateful):
    return model_fn
  return Stateful(lambda x: (), lambda x, t, state: (model_fn(x, t), state))


def apg(cond: jnp.ndarray, uncond: jnp.ndarray, scale: float, average: jnp.ndarray, *, eta: float = 1.0,
        norm_threshold: float = 0.0, momentum: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(guided prediction, the new running average) of APG for one call (diffusers' normalized_guidance with its
  MomentumBuffer): average = diff + momentum * average; diff clipped to norm_threshold (> 0) per example; the
  projection on cond in float32."""
  axes = tuple(range(1, cond.ndim))
  average = (cond - uncond) + momentum * average
  diff = average
  if norm_threshold > 0:
    norm = jnp.sqrt(jnp.sum(diff ** 2, axis=axes, keepdims=True))
    diff = diff * jnp.minimum(1.0, norm_threshold / norm)
  unit = cond / jnp.maximum(jnp.sqrt(jnp.sum(cond ** 2, axis=axes, keepdims=True)), 1e-12)
  parallel = jnp.sum(diff * unit, axis=axes, keepdims=True) * unit
  return uncond + scale * (diff - parallel + eta * parallel), average


def adaptive_projected_guidance(model_fn: Callable, cond: dict, null_cond: dict, scale: float, *, eta: float = 1.0,
                                norm_threshold: float = 0.0, momentum: float = 0.0) -> Stateful:
  """model_fn(x, t, cond) -> the Stateful APG-guided fn (its state: the running average of the update)."""
  halves = _halves(model_fn, cond, null_cond)

  def step(x, t, average):
    guided_cond, uncond = halves(x, t)
    n = x.shape[-1]  # the prediction channels; learned variance from the conditional half
    mixed, average = apg(guided_cond[..., :n], uncond[..., :n], scale, average, eta=eta,
                         norm_threshold=norm_threshold, momentum=momentum)
    return jnp.concatenate([mixed, guided_cond[..., n:]], axis=-1), average

  return Stateful(lambda x: jnp.zeros_like(x), step)


def classifier_free_guidance(model_fn: Callable, cond: dict, null_cond: dict, scale: float, *,
                             mode: str = "first3", interval: tuple[float, float] = (0.0, 1000.0)) -> Callable:
  """model_fn(x, t, cond) -> guided fn(x, t) for the conditioning `cond` (arrays with a leading batch axis B);
  `null_cond` (the same keys and shapes) is its unconditional counterpart."""
  if mode not in GUIDANCE_MODES[:3]:
    raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES[:3]} (apg, skip_layer: their own functions), "
                     f"got {mode!r}")
  halves = _halves(model_fn, cond, null_cond)

  def guided(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    cond, uncond = halves(x, t)  # (B, ..., C_out) each
    n = min(3, x.shape[-1]) if mode == "first3" else x.shape[-1]
    mixed = uncond[..., :n] + scale * (cond[..., :n] - uncond[..., :n])
    if mode == "interval":
      inside = ((t >= interval[0]) & (t <= interval[1])).reshape((-1,) + (1,) * (x.ndim - 1))
      mixed = jnp.where(inside, mixed, cond[..., :n])
    return jnp.concatenate([mixed, cond[..., n:]], axis=-1)

  if mode != "interval":
    return guided

  def guided_in_interval(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Outside the interval only the conditional half runs (B rows, not 2B): half the model's work there."""
    inside = jnp.any((t >= interval[0]) & (t <= interval[1]))
    return jax.lax.cond(inside, guided, lambda x, t: model_fn(x, t, cond), x, t)

  return guided_in_interval


def skip_layer_guidance(model_fn: Callable, skipped_fn: Callable, cond: dict, null_cond: dict, scale: float,
                        slg_scale: float, window: tuple[float, float]) -> Callable:
  """model_fn(x, t, cond) -> guided fn(x, t): uncond + scale (cond - uncond), plus, while low <= t <= high (the
  model times of the guided steps), slg_scale (cond - skipped_fn(x, t, cond)), skipped_fn being the model with
  the skipped layers (a lax.cond: outside the window the third call does not run)."""
  halves = _halves(model_fn, cond, null_cond)

  def guided(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    conditional, uncond = halves(x, t)
    mixed = uncond + scale * (conditional - uncond)
    inside = jnp.any((t >= window[0]) & (t <= window[1]))
    return jax.lax.cond(inside, lambda: mixed + slg_scale * (conditional - skipped_fn(x, t, cond)), lambda: mixed)

  return guided
