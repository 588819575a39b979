"""The validation pass (config.eval.val_every): the objective's loss and the stability of the model's predictions
on a fixed held-out set, at fixed timesteps, with fixed noise, so the numbers are comparable across runs, resumes
and host counts (the loss is the SD3 paper's eval loss).

    validation = Validation(config, model, mesh, adapters)    # reads the held-out set once
    numbers = validation(state.params, state.base)            # {"val/loss": mean, "val/loss_t0062": ..., ...}
The set is the first eval.val_num_samples readable records of split eval.val_split (of eval.val_data_dir, default
data.data_dir: a latent cache holds one split, so its held-out split is another cache), transformed without random
flips or caption dropout (latents: a posterior draw seeded by the record's index). The K = eval.val_timesteps
steps are evenly spaced: Gaussian step floor((k + 1/2) N / K) of N, flow time (k + 1/2) / K. Example i gets the
noise of fold_in(key(eval.val_seed), i) at every step, whatever the batch or the host, so its K noisy inputs lie
on one path of the process. Per-example numbers (the loss unweighted: diffusion.loss_weighting is a training
choice) are gathered to every host and reduced there in float64.

Prediction stability (docs/evaluation.md has the formulas): from each prediction, the implied clean sample
x0_hat(t) and velocity v_hat(t) (jdit.diffusion.objective's implied terms); per example, the variance of x0_hat
over the K steps (mean over pixels), the mean squared change of x0_hat between neighbouring steps, and the mean
squared errors of x0_hat and v_hat against the true x0 and v at each step; as means over the examples, medians and
90th percentiles ("_p50", "_p90"), and per step ("_tSTEP").
"""
import jax
import jax.numpy as jnp
import numpy as np

from jdit import sharding
from jdit.data import sources, transforms
from jdit.diffusion import objective
from jdit.diffusion.gaussian import mean_flat
from jdit.nn import lora


def held_out(config) -> dict:
  """The validation set: {key: (N, ...)} model-input arrays of the first eval.val_num_samples readable records."""
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.update(split=config.eval.val_split, random_flip=False, data_dir=config.eval.val_data_dir or data.data_dir)
    if "images_dir" in data:
      data.images_dir = ""  # the loss needs no source images (REPA is a training term)
    if "caption_dropout_prob" in data:
      data.caption_dropout_prob = 0.0
  if data.buckets:
    raise ValueError("eval.val_every: the validation loss needs one image shape; it does not run with data.buckets")
  source = sources.open_source(data)
  transform, wanted, elements = sources.transform(data, source), config.eval.val_num_samples, []
  for index in range(len(source)):
    element = transform(source[index], np.random.default_rng(index))
    if element is not None:
      elements.append(element)
    if len(elements) == wanted:
      return transforms.to_model_batch({k: np.stack([e[k] for e in elements]) for k in elements[0]})
  raise ValueError(f"eval.val_num_samples={wanted}: split {data.split!r} of data.source={data.source!r} has "
                   f"{len(elements)} readable examples")


def timesteps(cfg, count: int) -> np.ndarray:
  """The K evenly spaced validation steps (Gaussian, int32) or times (flow, float32)."""
  centers = (np.arange(count) + 0.5) / count
  if cfg.kind == "gaussian":
    return np.floor(centers * cfg.num_steps).astype(np.int32)
  return centers.astype(np.float32)


def fixed_noise(seed: int, count: int, shape: tuple) -> np.ndarray:
  """(count, *shape) noise of examples 0..count-1 (the same at every validation step): one key per example."""
  key = jax.random.key(seed)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(count))
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(keys))


PER_EXAMPLE = ("x0_variance", "x0_change", "x0_error", "v_error")  # summarized by mean, median and 90th percentile


class Validation:
  """The validation pass of config for `model` on `mesh` (LoRA runs: with their `adapters` on the frozen base)."""

  def __init__(self, config, model, mesh, adapters=None):
    count, dp = config.eval.val_num_samples, sharding.data_parallel_size(mesh)
    if count % dp:
      raise ValueError(f"eval.val_num_samples={count} must be divisible by the data-parallel size {dp}")
    batch, self.steps = held_out(config), timesteps(config.diffusion, config.eval.val_timesteps)
    # the held-out set, its noise and the steps' times are placed on the mesh once, for every evaluation
    noise = fixed_noise(config.eval.val_seed, count, batch["image"].shape[1:])
    times = np.tile(self.steps, (count, 1))  # (N, K)
    self.batch = sharding.global_batch({k: _local(v) for k, v in {**batch, "noise": noise, "t": times}.items()},
                                       mesh)
    terms = objective.make_terms_fn(model, config.diffusion)

    def evaluate(params, base, batch):
      """Per step (K, N): the loss and the errors of x0_hat and v_hat; per example (N,): the variance of x0_hat over
      the steps (Welford's running mean and sum of squared deviations) and the mean squared change between
      neighbouring steps."""
      inputs = {name: value for name, value in batch.items() if name not in ("noise", "t")}

      def step(running, t_and_k):
        (t, k), (mean, deviations, changes, previous) = t_and_k, running
        with lora.active(adapters):
          if adapters is None:
            result = terms(params, inputs, t, batch["noise"], weighted=False, implied=True)
          else:
            result = terms(base, inputs, t, batch["noise"], adapters=params, weighted=False, implied=True)
        x0_hat = result["x0_hat"]
        delta = x0_hat - mean
        mean = mean + delta / (k + 1)
        changes = changes + jnp.where(k > 0, mean_flat((x0_hat - previous) ** 2), 0.0)
        running = (mean, deviations + delta * (x0_hat - mean), changes, x0_hat)
        return running, {name: result[name] for name in ("loss", "x0_error", "v_error")}

      image, count = inputs["image"], len(self.steps)
      start = (jnp.zeros_like(image), jnp.zeros_like(image), jnp.zeros(image.shape[:1]), image)
      (_, deviations, changes, _), per_step = jax.lax.scan(step, start, (batch["t"].T, jnp.arange(count, dtype=float)))
      return per_step, {"x0_variance": mean_flat(deviations) / count, "x0_change": changes / max(count - 1, 1)}

    self.evaluate = jax.jit(evaluate)

  def __call__(self, params, base=None) -> dict[str, float]:
    """{"val/loss": the mean over steps and examples, "val/loss_tSTEP": the mean at each step, and the stability
    numbers "val/NAME" (mean), "val/NAME_p50", "val/NAME_p90" for NAME in PER_EXAMPLE, "val/x0_error_tSTEP" and
    "val/v_error_tSTEP"}."""
    from jdit.sample import gather
    per_step, examples = jax.tree.map(lambda x: gather(x).astype(np.float64), self.evaluate(params, base, self.batch))
    examples |= {name: per_step[name].mean(axis=0) for name in ("x0_error", "v_error")}  # over the steps
    suffixes = [_suffix(step) for step in self.steps]
    numbers = {"val/loss": float(per_step["loss"].mean())}
    numbers |= {f"val/loss_t{suffix}": float(row.mean()) for suffix, row in zip(suffixes, per_step["loss"])}
    for name in PER_EXAMPLE:
      values = examples[name]
      numbers |= {f"val/{name}": float(values.mean()), f"val/{name}_p50": float(np.quantile(values, 0.5)),
                  f"val/{name}_p90": float(np.quantile(values, 0.9))}
    for name in ("x0_error", "v_error"):
      numbers |= {f"val/{name}_t{suffix}": float(row.mean()) for suffix, row in zip(suffixes, per_step[name])}
    return numbers


def _local(array: np.ndarray) -> np.ndarray:
  """This host's consecutive block of rows."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows:(jax.process_index() + 1) * rows]


def _suffix(step) -> str:
  """The name of a validation step (Gaussian: "0062") or time (flow: "0.1250") in the TensorBoard scalars."""
  return f"{int(step):04d}" if isinstance(step, np.integer) else f"{float(step):.4f}"
