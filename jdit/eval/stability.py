"""Prediction stability: how steadily a model's estimate of the clean sample holds as the timestep changes.

    numbers = prediction_stability(config, model, params, mesh)   # {"loss": ..., "x0_variance": ..., ...}
    print(table(numbers)); image = curve_image(numbers)           # a text table; the per-step curves (uint8)
The numbers are the validation pass's (jdit.validation, logged as "val/NAME" every config.eval.val_every steps):
the held-out set, steps and noise of config.eval, example i with one noise eps_i at every step t_1..t_K. From the
prediction at x_t = q(x0_i, eps_i, t_k) come the implied clean sample x0_hat_ik and velocity v_hat_ik; with D the
number of values per example,
    x0_variance_i = 1/D sum_d 1/K sum_k (x0_hat_ikd - mean_k x0_hat_ikd)^2
    x0_change_i   = 1/(K-1) sum_{k<K} 1/D ||x0_hat_i(k+1) - x0_hat_ik||^2
    x0_error_ik   = 1/D ||x0_hat_ik - x0_i||^2,   v_error_ik = 1/D ||v_hat_ik - v_ik||^2
(v: sqrt(abar) eps - sqrt(1 - abar) x0 for Gaussian diffusion, eps - x0 for flow). Reported: the mean over the
examples of each (errors also averaged over the steps), its median "_p50" and 90th percentile "_p90", and the
errors at each step "_tSTEP". A model that returned the true target at every step scores 0 on all of them.
"""
import re

import numpy as np

from jdit.validation import PER_EXAMPLE, Validation

CURVES = {"loss": (31, 119, 180), "x0_error": (214, 39, 40), "v_error": (44, 160, 44)}  # per-step names, colors


def prediction_stability(config, model, params, mesh, base=None, adapters=None) -> dict[str, float]:
  """The validation pass's numbers for `params` (a LoRA run: `adapters` as params on the frozen `base`), without
  the "val/" prefix."""
  import flax.linen as nn
  import jax

  from jdit import sharding
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules(config.axis_rules)):
    numbers = Validation(config, model, mesh, adapters)(params, base)
  return {name.removeprefix("val/"): value for name, value in numbers.items()}


def per_step(numbers: dict, name: str) -> dict[str, float]:
  """{STEP: value} of the per-step numbers NAME_tSTEP (with or without the "val/" prefix), in step order."""
  pattern = re.compile(rf"^(?:val/)?{name}_t([\d.]+)$")
  return {match.group(1): value for key, value in numbers.items() if (match := pattern.match(key))}


def table(numbers: dict) -> str:
  """The numbers as text: the per-step loss and errors, then the mean, median and 90th percentile of each."""
  get = lambda name: numbers.get(name, numbers.get(f"val/{name}"))  # noqa: E731
  columns = {name: per_step(numbers, name) for name in CURVES}
  lines = [f"{'step':>8} " + " ".join(f"{name:>12}" for name in columns)]
  lines += [f"{step:>8} " + " ".join(f"{columns[name][step]:12.6g}" for name in columns) for step in columns["loss"]]
  lines += ["", f"{'':>12} {'mean':>12} {'p50':>12} {'p90':>12}"]
  lines += [f"{name:>12} " + " ".join(f"{get(name + suffix):12.6g}" for suffix in ("", "_p50", "_p90"))
            for name in PER_EXAMPLE]
  return "\n".join(lines)


def curve_image(numbers: dict, width: int = 480, height: int = 300) -> np.ndarray:
  """(height, width, 3) uint8: log10 of the per-step loss, x0 error and v error against the step (TensorBoard)."""
  from PIL import Image, ImageDraw
  curves = {name: per_step(numbers, name) for name in CURVES}
  steps = list(curves["loss"])
  logs = {name: np.log10(np.maximum(list(values.values()), 1e-12)) for name, values in curves.items()}
  low = np.floor(min(v.min() for v in logs.values()))
  high = max(np.ceil(max(v.max() for v in logs.values())), low + 1)
  left, right, top, bottom = 48, width - 12, 24, height - 28
  x = lambda i: left + (right - left) * (i / max(len(steps) - 1, 1))  # noqa: E731
  y = lambda v: bottom - (bottom - top) * (v - low) / (high - low)  # noqa: E731
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  draw.rectangle((left, top, right, bottom), outline=(128, 128, 128))
  for decade in range(int(low), int(high) + 1):
    draw.line((left - 4, y(decade), left, y(decade)), fill=(0, 0, 0))
    draw.text((4, y(decade) - 6), f"1e{decade}", fill=(0, 0, 0))
  for i, step in enumerate(steps):
    draw.text((x(i) - 3 * len(step), bottom + 6), step, fill=(0, 0, 0))
  for row, (name, color) in enumerate(CURVES.items()):
    points = [(x(i), y(v)) for i, v in enumerate(logs[name])]
    draw.line(points, fill=color, width=2)
    draw.text((left + 8 + 110 * row, 6), name, fill=color)
  return np.asarray(image)
