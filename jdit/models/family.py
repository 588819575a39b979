"""Model families behind one small interface; config.model.family names one. Consumers (training, checkpoints,
sampling, FLOP counts, tools, weight import) go through this module and never import a family.

A family is a module `jdit/models/<name>.py` that defines
    default_config()             ml_collections.ConfigDict of the config.model fields, each with a comment
    create(model_cfg)            the model from those fields (a variant / preset name and overrides)
    model_config(model)          its fields as a JSON-serializable dict (stored in checkpoints)
    from_config(fields)          the inverse of model_config
    to_layout(params, model)     parameters brought into `model`'s layout (e.g. scanned or per-block blocks)
    TABLE                        the named models of the model table, and table_model(name) builds one
and a flax.linen model class with FAMILY = "<name>" that follows the conditioning contract
(jdit.models.conditioning: condition_keys, condition, forward, null_condition, supports_guidance,
dummy_batch) and has
    __call__(x, t, ...)          the family's own forward (class-conditional families: (x, t, y, train=False))
    dummy_inputs(batch_size)     positional arguments of __call__ at the native input shape, for init
    input_hw, in_channels, learn_sigma, out_channels; size_multiple (input sides must be multiples of it)
    check_config()               ValueError naming the first invalid field
    describe()                   one line for messages
Its PyTorch weight import, if any, lives in jdit/convert/<name>.py (see jdit.convert.load_checkpoint).
"""
import importlib

import flax.linen as nn
import jax
import ml_collections

FAMILIES = ("dit", "unet", "mmdit")


def get(name: str):
  """The family module named `name`."""
  if name not in FAMILIES:
    raise ValueError(f"model.family must be one of {FAMILIES}, got {name!r}")
  return importlib.import_module(f"jdit.models.{name}")


def default_config(name: str) -> ml_collections.ConfigDict:
  """config.model for family `name`: the family field, then the family's own fields."""
  fields = get(name).default_config()
  config = ml_collections.ConfigDict({"family": name})
  for key in fields:  # references keep declared field types (e.g. object for a side or an (H, W) pair)
    config[key] = fields.get_ref(key)
  return config


def create(model_cfg):
  """The model described by config.model (a ConfigDict or dict with a `family` field)."""
  fields = dict(model_cfg)
  return get(fields.pop("family")).create(fields)


def model_config(model) -> dict:
  """{"family": ..., the model's fields}: JSON-serializable, what checkpoints store."""
  return {"family": model.FAMILY, **get(model.FAMILY).model_config(model)}


def from_config(fields: dict):
  """The model of a stored model_config (checkpoints written before families existed hold a DiT)."""
  fields = dict(fields)
  return get(fields.pop("family", "dit")).from_config(fields)


def to_layout(params, model):
  """`params` (of a model of the same family, any layout) in `model`'s parameter layout."""
  return get(model.FAMILY).to_layout(params, model)


def abstract_params(model):
  """The parameter tree of `model` as unboxed ShapeDtypeStructs (nothing is allocated)."""
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"])


def apply(model, params, x, t, cond: dict, train: bool = False, rngs=None):
  """The model's prediction for inputs x (B, H, W, C), timesteps t (B,) and the conditioning dict `cond`."""
  return model.apply({"params": params}, x, t, cond, train=train, rngs=rngs, method="forward")
