"""jdit checkpoints on Orbax.

A checkpoint directory holds numbered steps; each step has the items
    params  the parameters to sample with (EMA parameters for training runs, converted weights otherwise)
    model   the model configuration, its family included (JSON; jdit.models.family.model_config)
    train   training only: {"step", "params", "opt_state"}
    data    training only: the grain iterator state of each host
Orbax writes each step to a temporary directory and renames it when complete: a killed run never leaves a
half-written step behind, and the latest finished step is what a restart resumes from.
"""
import os

import jax
import orbax.checkpoint as ocp

from jdit.models import family

PARAMS, MODEL, TRAIN, DATA = "params", "model", "train", "data"


def _manager(directory: str, item_names=(PARAMS, MODEL), **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory), item_names=item_names,
                               options=ocp.CheckpointManagerOptions(**options))


def latest_step(directory: str) -> int | None:
  if not os.path.isdir(directory):
    return None
  with _manager(directory) as manager:
    return manager.latest_step()


def is_jdit_checkpoint(directory: str) -> bool:
  """True when `directory` holds at least one finished jdit (Orbax) step."""
  return latest_step(directory) is not None


def save_pretrained(directory: str, model, params, step: int = 0) -> str:
  """Writes params and the model config as step `step` of `directory`; returns the step path."""
  with _manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params), MODEL: ocp.args.JsonSave(family.model_config(model))}))
    manager.wait_until_finished()
  return os.path.join(os.path.abspath(directory), str(step))


def load_pretrained(directory: str, step: int | None = None, **overrides) -> tuple:
  """(model, params) from a jdit checkpoint (converted or trained), any family; `overrides` change fields such as
  dtype (the parameters are brought into the layout of the overridden model)."""
  with _manager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory}: no jdit checkpoint found")
    config = manager.restore(step, args=ocp.args.Composite(**{MODEL: ocp.args.JsonRestore()}))[MODEL]
    abstract = family.abstract_params(family.from_config(config))
    restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract)}))
  model = family.from_config({**config, **overrides})
  return model, family.to_layout(restored[PARAMS], model)


class TrainCheckpointer:
  """Periodic, asynchronous training checkpoints that keep the last `keep` steps."""

  def __init__(self, directory: str, keep: int = 3):
    import grain  # noqa: F401  (registers grain's checkpoint handler with Orbax)
    self.manager = _manager(directory, (PARAMS, MODEL, TRAIN, DATA), max_to_keep=keep, create=True,
                            enable_async_checkpointing=True)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, model, iterator, force: bool = False) -> None:
    import grain
    step = int(jax.device_get(state.step))
    train = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    self.manager.save(step, force=force, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.ema_params), MODEL: ocp.args.JsonSave(family.model_config(model)),
        TRAIN: ocp.args.StandardSave(train), DATA: grain.checkpoint.CheckpointSave(iterator)}))

  def restore(self, abstract_state, iterator, step: int | None = None):
    """(state, iterator) restored into the shardings of `abstract_state` (a tree of ShapeDtypeStructs)."""
    import grain
    step = self.manager.latest_step() if step is None else step
    abstract_train = {"step": abstract_state.step, "params": abstract_state.params,
                      "opt_state": abstract_state.opt_state}
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardRestore(abstract_state.ema_params), TRAIN: ocp.args.StandardRestore(abstract_train),
        DATA: grain.checkpoint.CheckpointRestore(iterator)}))
    train = restored[TRAIN]
    state = abstract_state.replace(step=train["step"], params=train["params"], opt_state=train["opt_state"],
                                   ema_params=restored[PARAMS])
    return state, restored[DATA]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
