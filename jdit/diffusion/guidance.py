"""Classifier-free guidance as one wrapper that every sampler uses.

    guided = uncond + scale * (cond - uncond)
Conditional and unconditional halves run in one batched model call; the conditioning is a dict (see
jdit.models.conditioning) and its unconditional half comes from the model family (the null class, ...). Modes:
  first3    guide only the first 3 output channels, the rest from the conditional half (official DiT: needed to
            reproduce its FIDs; with 4 latent channels the 4th eps channel stays unguided)
  all       guide every prediction channel (diffusers)
  interval  guide every prediction channel, only while the model timestep t is in [low, high]; outside it the
            unconditional half is not computed (a lax.cond: one model call of B rows instead of 2B)
Learned-variance channels (those past the input's channel count) always come from the conditional half.
"""
from typing import Callable

import jax
import jax.numpy as jnp

GUIDANCE_MODES = ("first3", "all", "interval")


def classifier_free_guidance(model_fn: Callable, cond: dict, null_cond: dict, scale: float, *,
                             mode: str = "first3", interval: tuple[float, float] = (0.0, 1000.0)) -> Callable:
  """model_fn(x, t, cond) -> guided fn(x, t) for the conditioning `cond` (arrays with a leading batch axis B);
  `null_cond` (the same keys and shapes) is its unconditional counterpart."""
  if mode not in GUIDANCE_MODES:
    raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {mode!r}")
  both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null_cond)  # (2B, ...): conditional first

  def guided(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    cond, uncond = jnp.split(out, 2, axis=0)  # (B, ..., C_out) each
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
