"""jdit checkpoints on Orbax.

A checkpoint directory holds numbered steps; each step has the items
    params  the parameters to sample with (EMA parameters for training runs, converted weights otherwise)
    model   the model configuration, its family included (JSON; jdit.models.family.model_config)
    train   training only: {"step", "params", "opt_state"}
    data    training only: the grain iterator state of each host
    lora    LoRA runs only: the adapters' settings and their frozen base's path and content hash (JSON); params
            and train then hold the adapters, not the model (jdit/lora_base.py)
Orbax writes each step to a temporary directory and renames it when complete: a killed run never leaves a
half-written step behind. A finished step also gets a manifest of its file sizes (checkpoint_files.py).
Restoring walks back: the newest step that reads completely is used; newer unreadable ones (a truncated,
missing or garbled file: what preempted pods and full disks leave) are moved aside as STEP.corrupt with one line
naming the step and the file, never deleted; when none reads, CheckpointUnreadable lists what was tried and
nothing is moved.
"""
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jdit import checkpoint_files
from jdit.models import family

PARAMS, MODEL, TRAIN, DATA, LORA = "params", "model", "train", "data", "lora"


class CheckpointUnreadable(ValueError):
  """No step of a checkpoint directory can be read."""


class _ItemError(Exception):
  """Reading one item of a step failed (the item's name, the underlying error)."""

  def __init__(self, item: str, error: BaseException):
    super().__init__(item)
    self.item, self.error = item, error


def _read_item(manager, step: int, item: str, args):
  try:
    return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
  except Exception as e:  # any read failure of a finished step means its files are damaged
    raise _ItemError(item, e) from None


def _all_hosts(ok: bool) -> bool:
  """True when every host found the step readable (each host reads its own files)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def restore_newest_readable(directory: str, steps, read: Callable[[int], Any], log=print) -> tuple[int, Any]:
  """(step, read(step)) for the newest of `steps` whose files match their manifest and read completely. Newer
  unreadable steps are then moved aside, one line each naming the step and the file; when no step reads,
  CheckpointUnreadable lists what was tried and nothing is moved."""
  directory = os.path.abspath(directory)
  unreadable = []
  for step in sorted(steps, reverse=True):
    step_dir = os.path.join(directory, str(step))
    problem = checkpoint_files.damaged_file(step_dir)
    if problem is None:
      try:
        result = read(step)
      except _ItemError as e:
        problem = checkpoint_files.describe_error(e.error, step_dir, e.item)
    if _all_hosts(problem is None):
      for bad, why in unreadable:
        if jax.process_index() == 0:
          moved = checkpoint_files.move_aside(os.path.join(directory, str(bad)))
          log(f"checkpoint step {bad} is unreadable ({why}); moved it to {moved}, using step {step}")
      if unreadable and jax.process_count() > 1:
        multihost_utils.sync_global_devices("jdit_checkpoint_moved_aside")
      return step, result
    unreadable.append((step, problem or "unreadable on another host"))
  tried = "; ".join(f"step {step}: {why}" for step, why in unreadable) or "no finished steps"
  raise CheckpointUnreadable(f"{directory}: no readable checkpoint (tried {tried}); nothing was moved")


def _check_params_structure(directory: str, step: int, abstract, describe: str) -> None:
  """ValueError when the stored parameters of the train item differ in shape from `abstract`: the checkpoint
  belongs to another model (a config change, not damage: nothing is moved aside)."""
  from etils import epath
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / TRAIN)["params"]
  except Exception as e:
    raise _ItemError(TRAIN, e) from None
  shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(stored)}
  for key, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    name = jax.tree_util.keystr(key)
    if shapes.get(name, "absent") != tuple(leaf.shape):
      raise ValueError(f"checkpoint step {step} in {directory} belongs to another model: params{name} is "
                       f"{shapes.get(name, 'absent')} there, {tuple(leaf.shape)} for {describe}; train in a new "
                       "--workdir, or take its weights with --config.init_from")


def _manager(directory: str, item_names=(PARAMS, MODEL, LORA), **options) -> ocp.CheckpointManager:
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


def locate(path: str) -> tuple[str, int | None] | None:
  """(checkpoint directory, step or None for the newest) of a jdit checkpoint given as a checkpoint directory, a
  training run's workdir (its checkpoints/) or one step directory (DIR/checkpoints/400); None when it is none."""
  if not os.path.isdir(path):
    return None
  for directory in (path, os.path.join(path, "checkpoints")):
    if is_jdit_checkpoint(directory):
      return directory, None
  parent, name = os.path.split(os.path.normpath(path))
  if name.isdigit() and is_jdit_checkpoint(parent):
    with _manager(parent) as manager:
      if int(name) in manager.all_steps():
        return parent, int(name)
  return None


JDIT_FORMS = "a jdit checkpoint directory, a run's workdir (WORKDIR/checkpoints) or a step (WORKDIR/checkpoints/N)"


def _record_files(directory: str, step: int) -> None:
  """The manifest of a finished step (written by the first host; the filesystem is shared)."""
  step_dir = os.path.join(os.path.abspath(directory), str(step))
  if jax.process_index() == 0 and os.path.isdir(step_dir):
    checkpoint_files.write_manifest(step_dir)


def save_pretrained(directory: str, model, params, step: int = 0) -> str:
  """Writes params and the model config as step `step` of `directory`; returns the step path."""
  with _manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(params), MODEL: ocp.args.JsonSave(family.model_config(model))}))
    manager.wait_until_finished()
  _record_files(directory, step)
  return os.path.join(os.path.abspath(directory), str(step))


def _read_model_config(manager, step: int) -> dict:
  config = _read_item(manager, step, MODEL, ocp.args.JsonRestore())
  try:
    family.from_config(config)
  except Exception as e:  # JSON that is not a model configuration
    raise _ItemError(MODEL, e) from None
  return config


def _is_lora_step(directory: str, step: int) -> bool:
  return os.path.isdir(os.path.join(os.path.abspath(directory), str(step), LORA))


def lora_record(directory: str, step: int | None = None) -> dict | None:
  """The LoRA record of a checkpoint step (default: the newest), None when it is not a LoRA run's."""
  with _manager(directory) as manager:
    step = manager.latest_step() if step is None else step
    if step is None or not _is_lora_step(directory, step):
      return None
    return manager.restore(step, args=ocp.args.Composite(**{LORA: ocp.args.JsonRestore()}))[LORA]


def load_pretrained(directory: str, step: int | None = None, log=print, abstract=None, **overrides) -> tuple:
  """(model, params) from a jdit checkpoint (converted or trained), any family: the given step, else the newest
  readable one (restore_newest_readable); `overrides` change fields such as dtype (the parameters are brought
  into the layout of the overridden model). A LoRA run's checkpoint holds adapters: `abstract(model)` gives
  their tree (jdit.lora_base reads them so); without it, ValueError."""
  with _manager(directory) as manager:
    steps = manager.all_steps() if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"{directory}: no jdit checkpoint found")
    if abstract is None and _is_lora_step(directory, max(steps)):
      raise ValueError(f"{directory} is a LoRA run's checkpoint (adapters, not a model): sample it with "
                       "--mode=sample in its workdir, or take its adapters (WORKDIR/lora.safetensors, "
                       "tools/lora.py export)")

    def read(at: int):
      config = _read_model_config(manager, at)
      model = family.from_config(config)
      tree = family.abstract_params(model) if abstract is None else abstract(model)
      return config, _read_item(manager, at, PARAMS, ocp.args.StandardRestore(tree))

    step, (config, params) = restore_newest_readable(directory, steps, read, log)
  if jax.process_index() == 0:
    log(f"restored step {step} of {directory}")
  try:
    model = family.from_config({**config, **overrides})
  except ValueError as e:  # fields of another family (init_from a checkpoint of another model)
    raise ValueError(f"{directory} holds a {config.get('family', 'dit')!r} model: {e}") from None
  return model, (family.to_layout(params, model) if abstract is None else params)


class TrainCheckpointer:
  """Periodic, asynchronous training checkpoints that keep the last `keep` steps."""

  def __init__(self, directory: str, keep: int = 3):
    import grain  # noqa: F401  (registers grain's checkpoint handler with Orbax)
    self.directory = os.path.abspath(directory)
    self.manager = _manager(directory, (PARAMS, MODEL, TRAIN, DATA, LORA), max_to_keep=keep, create=True,
                            enable_async_checkpointing=True)
    self._unrecorded = None  # the step saved last, whose manifest waits for Orbax to finish it

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _record_finished(self) -> None:
    self.manager.wait_until_finished()
    if self._unrecorded is not None:
      _record_files(self.directory, self._unrecorded)
      self._unrecorded = None

  def save(self, state, model, iterator, force: bool = False, lora: dict | None = None) -> None:
    """Saves step state.step (the frozen base of a LoRA run is not saved: `lora`, its record, names it)."""
    import grain
    self._record_finished()  # Orbax finishes the previous save before starting this one anyway
    step = int(jax.device_get(state.step))
    train = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    items = {PARAMS: ocp.args.StandardSave(state.ema_params), MODEL: ocp.args.JsonSave(family.model_config(model)),
             TRAIN: ocp.args.StandardSave(train), DATA: grain.checkpoint.CheckpointSave(iterator)}
    if lora is not None:
      items[LORA] = ocp.args.JsonSave(lora)
    self.manager.save(step, force=force, args=ocp.args.Composite(**items))
    self._unrecorded = step

  def restore(self, abstract_state, iterator, model, log=print):
    """(state, iterator, step) of the newest readable step (restore_newest_readable), restored into the
    shardings of `abstract_state` (a tree of ShapeDtypeStructs); ValueError when it belongs to another model."""
    import grain
    abstract_train = {"step": abstract_state.step, "params": abstract_state.params,
                      "opt_state": abstract_state.opt_state}

    def read(step: int):
      _read_model_config(self.manager, step)
      _check_params_structure(self.directory, step, abstract_state.params, f"config.model ({model.describe()})")
      ema = _read_item(self.manager, step, PARAMS, ocp.args.StandardRestore(abstract_state.ema_params))
      train = _read_item(self.manager, step, TRAIN, ocp.args.StandardRestore(abstract_train))
      data = _read_item(self.manager, step, DATA, grain.checkpoint.CheckpointRestore(iterator))
      return abstract_state.replace(step=train["step"], params=train["params"], opt_state=train["opt_state"],
                                    ema_params=ema), data

    step, (state, iterator) = restore_newest_readable(self.directory, self.manager.all_steps(), read, log)
    self.manager.reload()  # steps moved aside are gone from its list
    return state, iterator, step

  def close(self) -> None:
    self._record_finished()
    self.manager.close()
