"""jdit checkpoints on Orbax: parameters plus the model configuration (JSON) under a step directory.

    save_pretrained(directory, model, params)   # atomic: Orbax writes to a temporary dir, then renames
    model, params = load_pretrained(directory)  # the latest step
"""
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from jdit.models import dit as dit_lib

PARAMS_ITEM, MODEL_ITEM = "params", "model"


def _manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=(PARAMS_ITEM, MODEL_ITEM))


def is_jdit_checkpoint(directory: str) -> bool:
  """True when `directory` holds at least one finished jdit (Orbax) step."""
  if not os.path.isdir(directory):
    return False
  with _manager(directory) as manager:
    return manager.latest_step() is not None


def save_pretrained(directory: str, model: dit_lib.DiT, params, step: int = 0) -> str:
  """Writes params and the model config as step `step` of `directory`; returns the step path."""
  with _manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardSave(params),
        MODEL_ITEM: ocp.args.JsonSave(dit_lib.model_config(model)),
    }))
    manager.wait_until_finished()
  return os.path.join(os.path.abspath(directory), str(step))


def load_pretrained(directory: str, step: int | None = None, **overrides) -> tuple[dit_lib.DiT, dict]:
  """(model, params) from a jdit checkpoint; `overrides` change model fields such as dtype."""
  with _manager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no jdit checkpoint found")
    config = manager.restore(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[MODEL_ITEM]
    model = dit_lib.dit_from_config({**config, **overrides})
    abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"]
    restored = manager.restore(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardRestore(nn.unbox(abstract))}))
  return model, restored[PARAMS_ITEM]
