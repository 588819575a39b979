"""The validation loss (config.eval.val_every): the objective's loss on a fixed held-out set, at fixed timesteps,
with fixed noise, so the number is comparable across runs, resumes and host counts (the SD3 paper's eval loss).

    validation = Validation(config, model, mesh, adapters)    # reads the held-out set once
    numbers = validation(state.params, state.base)            # {"val/loss": mean, "val/loss_t0062": ..., ...}
The set is the first eval.val_num_samples readable records of split eval.val_split (of eval.val_data_dir, default
data.data_dir: a latent cache holds one split, so its held-out split is another cache), transformed without random
flips or caption dropout (latents: a posterior draw seeded by the record's index). The K = eval.val_timesteps
steps are evenly spaced: Gaussian step floor((k + 1/2) N / K) of N, flow time (k + 1/2) / K. Example i at step k
gets the noise of fold_in(fold_in(key(eval.val_seed), k), i), whatever the batch or the host. Per-example losses
(unweighted: diffusion.loss_weighting is a training choice) are gathered to every host and averaged there in
float64.
"""
import jax
import numpy as np

from jdit import sharding
from jdit.data import sources, transforms
from jdit.diffusion import objective
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


def fixed_noise(seed: int, step: int, count: int, shape: tuple) -> np.ndarray:
  """(count, *shape) noise of examples 0..count-1 at validation step index `step`: one key per example."""
  key = jax.random.fold_in(jax.random.key(seed), step)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.arange(count))
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, shape))(keys))


class Validation:
  """The validation loss of config for `model` on `mesh` (LoRA runs: with their `adapters` on the frozen base)."""

  def __init__(self, config, model, mesh, adapters=None):
    count, dp = config.eval.val_num_samples, sharding.data_parallel_size(mesh)
    if count % dp:
      raise ValueError(f"eval.val_num_samples={count} must be divisible by the data-parallel size {dp}")
    batch, seed = held_out(config), config.eval.val_seed
    steps, shape = timesteps(config.diffusion, config.eval.val_timesteps), batch["image"].shape[1:]
    # the held-out set and every step's times and noise are placed on the mesh once, for every evaluation
    self.batch = sharding.global_batch({k: _local(v) for k, v in batch.items()}, mesh)
    self.inputs = {_name(step): sharding.global_batch({"t": _local(np.full((count,), step, steps.dtype)),
                                                       "noise": _local(fixed_noise(seed, index, count, shape))}, mesh)
                   for index, step in enumerate(steps)}
    terms = objective.make_terms_fn(model, config.diffusion)

    def losses(params, base, batch, t, noise):
      with lora.active(adapters):
        if adapters is None:
          return terms(params, batch, t, noise, weighted=False)["loss"]
        return terms(base, batch, t, noise, adapters=params, weighted=False)["loss"]

    self.losses = jax.jit(losses)

  def __call__(self, params, base=None) -> dict[str, float]:
    """{"val/loss": the mean over steps and examples, "val/loss_tSTEP": the mean at each step}."""
    from jdit.sample import gather
    numbers = {name: float(np.mean(gather(self.losses(params, base, self.batch, inputs["t"], inputs["noise"]))
                                   .astype(np.float64)))
               for name, inputs in self.inputs.items()}
    return {"val/loss": float(np.mean(list(numbers.values()))), **numbers}


def _local(array: np.ndarray) -> np.ndarray:
  """This host's consecutive block of rows."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows:(jax.process_index() + 1) * rows]


def _name(step) -> str:
  """The TensorBoard scalar of a validation step (Gaussian) or time (flow)."""
  return f"val/loss_t{int(step):04d}" if isinstance(step, np.integer) else f"val/loss_t{float(step):.4f}"
