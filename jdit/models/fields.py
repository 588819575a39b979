"""A family's fields, declared once: the dataclass fields of its flax module (each with its default and a comment)
and its PRESETS (named models: field values). Everything else is derived here, the same way for every family:
config.model's defaults and field types, the model a config describes, and the JSON a checkpoint stores.

    config.model.<field> = PRESET (None)   take the value of the preset named by config.model.variant
"""
import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

PRESET = None  # config.model's "from the preset" value, for every family
_NOT_FIELDS = ("parent", "name")  # flax.linen's own dataclass fields


def declared(cls) -> list[dataclasses.Field]:
  """The family's fields: the dataclass fields of its flax module, in declaration order."""
  return [f for f in dataclasses.fields(cls) if f.name not in _NOT_FIELDS]


def preset_fields(presets: dict) -> set[str]:
  """The fields some preset sets: config.model leaves them at PRESET by default."""
  return set().union(*map(set, presets.values()))


def config_type(annotation) -> type:
  """The ml_collections field type of a dataclass annotation: int, float, bool, str, tuple, or object for unions
  (e.g. an input size that is a side or an (H, W) pair)."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    return object
  origin = typing.get_origin(annotation) or annotation
  return origin if origin in (int, float, bool, str, tuple) else object


def default_config(cls, presets: dict, variant: str) -> ml_collections.ConfigDict:
  """config.model of a family: `variant` (a preset name), then every field: PRESET where a preset sets it, else the
  dataclass default; each keeps its declared type, so --config.model.FIELD=VALUE parses."""
  from_preset = preset_fields(presets)
  config = ml_collections.ConfigDict({"variant": variant})
  for field in declared(cls):
    value = PRESET if field.name in from_preset else field.default
    config[field.name] = config_dict.FieldReference(value, field_type=config_type(field.type))
  return config


def create(cls, presets: dict, variant: str, **overrides):
  """The model of preset `variant` with every override that is not PRESET; ValueError naming the first invalid
  field (the family's check_config)."""
  if variant not in presets:
    raise ValueError(f"unknown {cls.__name__} variant {variant!r}; expected one of {', '.join(presets)}")
  values = {**presets[variant], **{k: v for k, v in overrides.items() if v is not PRESET}}
  unknown = set(values) - {f.name for f in declared(cls)}
  if unknown:
    raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
  model = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
  model.check_config()
  return model


def to_json(model) -> dict:
  """The model's fields as a JSON-serializable dict (tuples as lists): what checkpoints store."""
  return {f.name: _jsonable(getattr(model, f.name)) for f in declared(type(model))}


def from_json(cls, stored: dict):
  """Inverse of `to_json` (JSON turns tuples into lists); ValueError naming unknown fields."""
  unknown = set(stored) - {f.name for f in declared(cls)}
  if unknown:
    raise ValueError(f"unknown {cls.__name__} config field(s): {', '.join(sorted(unknown))}")
  return cls(**{k: _tuples(v) for k, v in stored.items()})


def _jsonable(value):
  return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
