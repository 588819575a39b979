"""Model families behind one small interface; config.model.family names one. Consumers (training, checkpoints,
sampling, FLOP counts, tools, weight import) go through this module and never import a family.

A family is one module: jdit/models/<name>.py for the built-ins, or any importable module whose import path is
config.model.family (jdit.plugins). It defines
    MODEL                     its flax.linen class; the dataclass fields, each with a default and a comment, are
                              the family's config.model fields (declared once: jdit.models.fields derives the
                              config, the presets' resolution and the JSON checkpoints store)
    PRESETS                   {variant: {field: value}}: the named models; a field config.model leaves at None
                              takes the value of the preset config.model.variant names
    VARIANT                   the default variant
and optionally
    TINY                      config.model overrides of a tiny model of the family (tests, CPU demos)
    RECIPE                    {"diffusion": {...}, ...}: the family's own training recipe defaults (config.base)
    to_layout(params, model)  parameters brought into `model`'s layout (e.g. scanned or per-block blocks)
    TABLE, table_model(name)  the named models of the model table (tools/model_table.py)
    LORA_TARGETS              regular expressions of the parameter paths LoRA adapts by default (jdit.lora)
    block_tokens(intermediates, depth)  the tokens leaving a block, sown as "intermediates" (REPA, jdit.repa)
MODEL has FAMILY = "<name>", follows the conditioning contract (jdit.models.conditioning: condition_keys,
condition, forward, null_condition, supports_guidance, dummy_batch) and has
    __call__(x, t, ...)          the family's own forward (class-conditional families: (x, t, y, train=False))
    dummy_inputs(batch_size)     positional arguments of __call__ at the native input shape, for init
    input_hw, in_channels, learn_sigma, out_channels; size_multiple (input sides must be multiples of it)
    check_config()               ValueError naming the first invalid field
    describe()                   one line for messages
Its PyTorch weight import and reference, if any, live in jdit/convert/<name>.py (see jdit.convert).
"""
import flax.linen as nn
import jax
import ml_collections

from jdit import plugins
from jdit.models import fields
from jdit.nn import lora

BUILTINS = {name: f"jdit.models.{name}" for name in ("dit", "unet", "mmdit", "flux")}
FAMILIES = tuple(BUILTINS)
INTERFACE = ("MODEL", "PRESETS", "VARIANT")


def get(name: str):
  """The family module named `name` (a built-in, or an import path)."""
  return plugins.load("model.family", BUILTINS, name, INTERFACE)


def known(name: str) -> bool:
  return plugins.known(BUILTINS, name, INTERFACE)


def default_config(name: str) -> ml_collections.ConfigDict:
  """config.model for family `name`: the family field, the default variant, then every field of the family."""
  module = get(name)
  model_fields = fields.default_config(module.MODEL, module.PRESETS, module.VARIANT)
  config = ml_collections.ConfigDict({"family": name})
  for key in model_fields:  # references keep declared field types (e.g. object for a side or an (H, W) pair)
    config[key] = model_fields.get_ref(key)
  return config


def recipe(name: str) -> dict:
  """The family's training recipe defaults, by config section (e.g. MM-DiT: rectified flow)."""
  return getattr(get(name), "RECIPE", {})


def tiny(name: str) -> dict:
  """config.model overrides of a tiny model of the family (its smallest preset when it names none)."""
  module = get(name)
  return dict(getattr(module, "TINY", {"variant": module.VARIANT}))


def create(model_cfg):
  """The model described by config.model (a ConfigDict or dict with `family` and `variant` fields)."""
  values = dict(model_cfg)
  module = get(values.pop("family"))
  return fields.create(module.MODEL, module.PRESETS, values.pop("variant", module.VARIANT), **values)


def model_config(model) -> dict:
  """{"family": ..., the model's fields}: JSON-serializable, what checkpoints store."""
  return {"family": model.FAMILY, **fields.to_json(model)}


def from_config(stored: dict):
  """The model of a stored model_config (checkpoints written before families existed hold a DiT)."""
  stored = dict(stored)
  return fields.from_json(get(stored.pop("family", "dit")).MODEL, stored)


def to_layout(params, model):
  """`params` (of a model of the same family, any layout) in `model`'s parameter layout."""
  convert = getattr(get(model.FAMILY), "to_layout", None)
  return convert(params, model) if convert else params


def abstract_params(model):
  """The parameter tree of `model` as unboxed ShapeDtypeStructs (nothing is allocated)."""
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())["params"])


def apply(model, params, x, t, cond: dict, train: bool = False, rngs=None, adapters=None, tokens_at: int = 0):
  """The model's prediction for inputs x (B, H, W, C), timesteps t (B,) and the conditioning dict `cond`; with
  `adapters` (a "lora" collection), inside jdit.nn.lora.active(spec), the adapted model's. tokens_at = k > 0:
  (prediction, the (B, T, D) tokens leaving block k), from the family's block_tokens (REPA)."""
  variables = {"params": params} if adapters is None else {"params": params, lora.COLLECTION: adapters}
  if not tokens_at:
    return model.apply(variables, x, t, cond, train=train, rngs=rngs, method="forward")
  out, state = model.apply(variables, x, t, cond, train=train, rngs=rngs, method="forward", mutable=["intermediates"])
  return out, get(model.FAMILY).block_tokens(state["intermediates"], tokens_at)
