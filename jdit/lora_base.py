"""The frozen base of a LoRA run (config.lora.rank > 0): read from config.init_from (or the path a run's checkpoint
records), fingerprinted, kept in lora.base_dtype; the adapters alone are trained, checkpointed and exported.

    spec = lora_base.spec(config, model)                    # None unless config.lora.rank > 0
    base, digest = lora_base.load(path, model, shardings)   # the base's weights and their content hash
    lora_base.check(record, digest, path)                   # ValueError: not the base the adapters were trained on
    model, params = lora_base.merged_run(directory, config)  # a LoRA run's base with its EMA adapters merged
A run's checkpoint stores the record (checkpoint.LORA): the adapters' settings and the base's path and hash.
"""
import os

import jax
import jax.numpy as jnp

from jdit import checkpoint, lora
from jdit.fingerprint import fingerprint
from jdit.models import family

SETTINGS = ("rank", "alpha", "targets", "init", "dropout")  # the Spec fields a record keeps
ADAPTER_FILE = "lora.safetensors"  # a LoRA run's latest EMA adapters, in its workdir (diffusers / PEFT layout)


def spec(config, model) -> lora.Spec | None:
  """The adapters config.lora asks for on `model` (alpha 0: the rank; no targets: the family's), or None."""
  settings = config.get("lora")
  if not settings or not settings.rank:
    return None
  return lora.spec_for(model, settings.rank, settings.alpha or None, tuple(settings.targets), settings.init,
                       settings.dropout)


def record(adapters: lora.Spec, base_dtype: str, path: str, digest: str) -> dict:
  """What a LoRA run's checkpoint stores beside the adapters."""
  settings = {name: getattr(adapters, name) for name in SETTINGS}
  return {**settings, "targets": list(adapters.targets), "base_dtype": base_dtype, "base": path,
          "base_hash": digest}


def spec_of(stored: dict) -> lora.Spec:
  return lora.Spec(**{name: stored[name] for name in SETTINGS} | {"targets": tuple(stored["targets"])})


def load(path: str, model, shardings=None) -> tuple[dict, str]:
  """(the base weights for `model` from `path` (any importer: jdit checkpoints, official and diffusers files),
  placed in `shardings` when given; their content hash)."""
  from jdit import convert
  params = convert.load_placed(path, model, shardings)
  return params, fingerprint(params)


def cast(params, dtype: str):
  """The frozen base in its storage dtype (float leaves only)."""
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)


def base_path(config, stored: dict | None) -> str:
  """config.init_from, else the base the run's checkpoint names; ValueError when there is neither."""
  path = config.init_from or (stored or {}).get("base", "")
  if not path:
    raise ValueError(f"lora.rank={config.lora.rank} trains adapters on a frozen base: set config.init_from to "
                     "the base's weights")
  return path


def check(stored: dict | None, digest: str, path: str, settings=None) -> None:
  """ValueError when the loaded base (content hash `digest`) or config.lora (`settings`) is not what the run's
  checkpoint record `stored` was trained with."""
  if stored is None:
    return
  if stored["base_hash"] != digest:
    raise ValueError(f"config.init_from={path} is not the base these adapters were trained on (content hash "
                     f"{digest}; the checkpoint's base {stored['base']} has {stored['base_hash']})")
  if settings is not None and settings.base_dtype != stored["base_dtype"]:
    raise ValueError(f"lora.base_dtype={settings.base_dtype!r}: the run was trained with "
                     f"{stored['base_dtype']!r}")


def adapter_shapes(model, adapters: lora.Spec):
  """The adapters' tree of `model` as ShapeDtypeStructs (nothing is allocated)."""
  return jax.eval_shape(lambda p: lora.init(model, p, adapters, jax.random.key(0)), family.abstract_params(model))


def read_run(directory: str, log=print) -> tuple:
  """(record, Spec, model, newest EMA adapters) of a LoRA run's checkpoint directory; ValueError for another."""
  stored = checkpoint.lora_record(directory)
  if stored is None:
    raise ValueError(f"{directory}: not a LoRA run's checkpoint (no {checkpoint.LORA} record)")
  adapters = spec_of(stored)
  model, ema = checkpoint.load_pretrained(directory, log=log, abstract=lambda m: adapter_shapes(m, adapters))
  return stored, adapters, model, ema


def merged_run(directory: str, config, log=print) -> tuple:
  """(model, params) of a LoRA run's checkpoint directory: its base (config.init_from, else the recorded path;
  checked against the recorded hash) with the newest EMA adapters merged."""
  stored, adapters, model, ema = read_run(directory, log)
  path = base_path(config, stored)
  base, digest = load(path, model)
  check(stored, digest, path)
  log(f"merged the run's EMA adapters (rank {adapters.rank}) into its base {path}")
  return model, lora.merge(base, ema, adapters.scale)


def export(directory: str, out: str) -> dict:
  """Writes the newest EMA adapters of a LoRA run's checkpoint directory to `out` (diffusers / PEFT layout);
  returns the run's record."""
  stored, adapters, model, ema = read_run(directory, log=lambda _: None)
  lora.save_lora(model, ema, out, adapters)
  return stored


def write_adapter_file(workdir: str, model, ema_adapters, adapters: lora.Spec) -> str:
  """The run's latest EMA adapters as WORKDIR/lora.safetensors (replaced whole); returns the path."""
  path = os.path.join(workdir, ADAPTER_FILE)
  if jax.process_index() == 0:
    lora.save_lora(model, ema_adapters, path, adapters)
  return path
